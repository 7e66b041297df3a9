"""Kafka over real TLS for tests: Tansu behind HAProxy terminating TLS, advertising HAProxy's address.

Tansu's own TLS listener did not answer aiokafka (see DESIGN "Components that are real"), so
HAProxy (Debian package, installed by dev.py) terminates TLS and forwards plain TCP to Tansu,
and Tansu tells clients to connect to HAProxy: every connection a client makes after the
bootstrap (the metadata's broker address) goes over TLS too. Certificates come from trustme.

Two frontends on one broker:
- `tls`: certificate for 127.0.0.1 and localhost, client certificate required (mutual TLS);
  the broker advertises this one.
- `by_name`: certificate for `localhost` only, no client certificate: connecting to it as
  127.0.0.1 is a hostname mismatch, the case of --kafka-ssl-no-check-hostname.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme
from helpers import free_port

from gateway.broker import Broker, start_broker, stop_pid


@dataclass(frozen=True)
class TlsKafka:
    broker: Broker
    host: str
    port: int  # the TLS (mutual) frontend the broker advertises
    by_name_port: int  # a frontend whose certificate names only `localhost`
    ca: Path  # the CA that signed both server certificates and the client certificate
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody uses: trusting it instead is "an untrusted certificate"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def args(self, *, ca: Path | None = None, client_cert: bool = True) -> list[str]:
        """The `gateway` flags for this broker over mutual TLS."""
        args = ["--kafka", self.bootstrap, "--kafka-security-protocol", "SSL", "--kafka-ssl-cafile", str(ca or self.ca)]
        if client_cert:
            args += ["--kafka-ssl-certfile", str(self.client_cert), "--kafka-ssl-keyfile", str(self.client_key)]
        return args

    def env(self, *, ca: Path | None = None) -> dict[str, str]:
        """The same settings as GATEWAY_* variables (what a unit file or a pod sets)."""
        return {"GATEWAY_KAFKA": self.bootstrap, "GATEWAY_KAFKA_SECURITY_PROTOCOL": "SSL",
                "GATEWAY_KAFKA_SSL_CAFILE": str(ca or self.ca), "GATEWAY_KAFKA_SSL_CERTFILE": str(self.client_cert),
                "GATEWAY_KAFKA_SSL_KEYFILE": str(self.client_key)}


def haproxy_config(server_pem: Path, by_name_pem: Path, ca: Path, port: int, by_name_port: int, backend: int) -> str:
    return f"""global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend tls
    bind 127.0.0.1:{port} ssl crt {server_pem} ca-file {ca} verify required
    default_backend tansu

frontend by_name
    bind 127.0.0.1:{by_name_port} ssl crt {by_name_pem}
    default_backend tansu

backend tansu
    server tansu 127.0.0.1:{backend}
"""


def _tls_answers(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            with context.wrap_socket(raw):
                return True
    except OSError:
        return False


@contextmanager
def tls_kafka(folder: Path, broker_args: tuple[str, ...] = ()) -> Iterator[TlsKafka]:
    """Tansu + HAProxy on loopback, both stopped by PID on the way out (`broker_args`: more Tansu
    flags, e.g. `--authentication` for SASL behind the TLS)."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        raise RuntimeError("haproxy is not installed: run `python3 dev.py` as root (it installs the Debian package)")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    by_name = ca.issue_cert("localhost")
    client = ca.issue_cert("gateway-client@example.test")
    files = {name: folder / name for name in ("ca.pem", "other-ca.pem", "server.pem", "by-name.pem",
                                              "client.crt", "client.key")}
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    other.cert_pem.write_to_path(str(files["other-ca.pem"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(files["server.pem"]))
    by_name.private_key_and_cert_chain_pem.write_to_path(str(files["by-name.pem"]))
    client.cert_chain_pems[0].write_to_path(str(files["client.crt"]))
    client.private_key_pem.write_to_path(str(files["client.key"]))
    port, by_name_port = free_port(), free_port()
    broker = start_broker(advertised=f"127.0.0.1:{port}", extra_args=broker_args)
    try:
        config = folder / "haproxy.cfg"
        config.write_text(haproxy_config(files["server.pem"], files["by-name.pem"], files["ca.pem"], port,
                                         by_name_port, broker.port))
        with open(folder / "haproxy.log", "w") as log:
            proxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not (_tls_answers(port, files["ca.pem"]) and _tls_answers(by_name_port, files["ca.pem"])):
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not start: {(folder / 'haproxy.log').read_text()[-2000:]}")
                time.sleep(0.05)
            yield TlsKafka(broker, "127.0.0.1", port, by_name_port, files["ca.pem"], files["client.crt"],
                           files["client.key"], files["other-ca.pem"])
        finally:
            stop_pid(proxy)
    finally:
        broker.stop()
