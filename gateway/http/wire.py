"""HTTP/1.1 bytes both front-door engines share: which request headers are not passed on
as received, what a valid Host and target are, and the empty-bodied answers.

The engines frame requests differently (httptools callbacks, aiohttp's parser), but what
they refuse, what they forward and the bytes of their own answers must not drift apart:
a rule fixed in one place is fixed for both, and one conformance suite checks both.
"""

from __future__ import annotations

import re
from http import HTTPStatus

# Request headers that are not passed on as received: hop-by-hop ones (RFC 9110 7.6.1),
# framing (recomputed), Host (set per upstream), X-Forwarded-For (appended to), Expect
# (answered here), and those read here and then forwarded (Content-Encoding).
SPECIAL = frozenset(
    b"connection keep-alive proxy-connection transfer-encoding te trailer upgrade proxy-authenticate "
    b"proxy-authorization content-length host x-forwarded-for expect content-encoding".split()
)
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
NO_BODY_STATUS = frozenset((204, 304))
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CLOSE = b"Connection: close\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_CHUNKS = 16384  # chunks per request body (1-byte chunks cost a callback, or a read, each)

# RFC 3986 host (reg-name, IPv4 or [IPv6]) with an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?").fullmatch


def origin_form(target: bytes) -> bytes | None:
    """The origin-form (path and query) of an absolute-form target, or None if invalid."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = len(rest)
    for stop in (b"/", b"?"):
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if b"@" in authority or not valid_host(authority):
        return None
    return path if path.startswith(b"/") else b"/" + path


def valid_host(host: bytes) -> bool:
    return _HOST(host) is not None and b".." not in host


class Answers:
    """Empty-bodied answers as (plain, keep-alive, close) variants, built once per status."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[int, bytes], tuple[bytes, bytes, bytes]] = {}

    def __call__(self, status: int, extra: bytes = b"") -> tuple[bytes, bytes, bytes]:
        cached = self._cache.get((status, extra))
        if cached is None:
            if status == 503 and not extra:
                extra = b"Retry-After: 1\r\n"
            length = b"" if status in NO_BODY_STATUS else b"Content-Length: 0\r\n"
            head = b"HTTP/1.1 %d %s\r\n%s%s" % (status, REASONS.get(status, b""), extra, length)
            cached = (head + b"\r\n", head + KEEP_ALIVE + b"\r\n", head + CLOSE + b"\r\n")
            self._cache[(status, extra)] = cached
        return cached


def response_bytes(status: int, headers: bytes, body: bytes | None, connection: bytes) -> bytes:
    """An upstream's complete response as sent to the client, with a Content-Length."""
    if body is None or status in NO_BODY_STATUS:  # HEAD (length kept) or no body
        return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, REASONS.get(status, b""), headers, connection)
    return b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
        status, REASONS.get(status, b""), headers, connection, len(body), body)
