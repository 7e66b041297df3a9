"""TLS for the proxy port and the admin listener: server contexts, and their reload on SIGHUP.

One place decides what "secure by default" means here: the standard library's
server-side default (TLS 1.2 or newer, its cipher list with forward secrecy and AEAD
only, no compression), renegotiation off, ALPN `http/1.1` (neither listener speaks h2).

Reload rebuilds a trial context from the files first, and only when the whole pair (and
the client CA) loads does it load them into the live context. OpenSSL copies the
certificate into each connection when the connection is made, so new handshakes get the
new certificate while open connections go on untouched. A pair that does not load leaves
the live context exactly as it was: one ERROR line, the old certificate keeps serving.
Key material is never logged; only file paths and OpenSSL's reason.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

log = logging.getLogger(__name__)

ALPN = ["http/1.1"]


class TlsError(Exception):
    """A certificate, key or CA file could not be used; str() is the one line to show."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of a listener's certificate chain (PEM), private key (PEM) and optional client CA."""

    cert: str
    key: str
    client_ca: str | None = None  # when set, clients must present a certificate it signed


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A fresh server-side context loaded from `files`, or TlsError (one line, no key material)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    _load(context, files)
    if files.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(context: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS certificate {files.cert} with key {files.key}: {_reason(exc)}") from None
    if files.client_ca:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load TLS client CA {files.client_ca}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):  # OpenSSL gives no reason for a file that is not PEM at all
        return exc.reason or "not a PEM file OpenSSL can read"
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)).lower()
    return str(exc)


class Reloadable:
    """A listener's live context and the files it reloads from on SIGHUP."""

    def __init__(self, files: TlsFiles, name: str) -> None:
        self.files = files
        self.name = name  # "proxy" or "admin", for the log lines
        self.context = server_context(files)  # TlsError at startup: the caller refuses to start

    def reload(self) -> bool:
        """Load the files again for new handshakes; on any failure keep the old ones and log one ERROR."""
        try:
            server_context(self.files)  # the whole pair must load before the live context is touched
            _load(self.context, self.files)
        except TlsError as exc:
            log.error("%s TLS reload failed, still serving the previous certificate: %s", self.name, exc)
            return False
        log.info("%s TLS certificate reloaded", self.name, extra={"cert": self.files.cert})
        return True
