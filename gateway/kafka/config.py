"""Where the log lives and how to reach it: the broker address, the two topic names, and the
security settings (TLS, SASL) every Kafka client of this package shares (gateway/kafka/clients.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_COMMANDS_TOPIC = "blacklist.commands"
DEFAULT_RANGES_TOPIC = "blacklist.ranges"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split `HOST:PORT`, `[V6]:PORT` or `:PORT` into a host and a port number."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


class KafkaSettingsError(ValueError):
    """Security settings that cannot work together (said before any connection is tried)."""


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap: str
    commands_topic: str = DEFAULT_COMMANDS_TOPIC
    ranges_topic: str = DEFAULT_RANGES_TOPIC
    # Production: topics come from the topics job with the cluster's replication factor, so
    # no process ever creates the permanent command log with a default (RF 1) by accident.
    create_topics: bool = True
    replication_factor: int = 1
    # How to reach the brokers (Amazon MSK, Confluent Cloud, Aiven: SASL_SSL; self-managed: often mTLS).
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    # Never in repr (so never in a log line or a traceback that prints the config).
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None  # None: the system's trust store
    ssl_certfile: str | None = None  # client certificate (mutual TLS), PEM
    ssl_keyfile: str | None = None  # its private key, PEM
    ssl_check_hostname: bool = True  # off only by an explicit, loud choice

    def __post_init__(self) -> None:
        check_security(self)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def check_security(config: KafkaConfig) -> None:
    """Refuse settings that would silently connect with less security than asked (fail closed):
    TLS files with a protocol that does not use TLS, SASL settings without SASL, half a client
    certificate, SASL without its mechanism, user or password."""
    protocol = config.security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        raise KafkaSettingsError(f"security protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, got {protocol!r}")
    tls_files = [name for name, value in (("CA file", config.ssl_cafile), ("client certificate", config.ssl_certfile),
                                          ("client key", config.ssl_keyfile)) if value]
    if tls_files and not config.uses_tls:
        raise KafkaSettingsError(f"{' and '.join(tls_files)} given, but security protocol {protocol} does not use TLS"
                                 " (use SSL or SASL_SSL)")
    if not config.ssl_check_hostname and not config.uses_tls:
        raise KafkaSettingsError(f"hostname verification can only be turned off with TLS (security protocol {protocol})")
    if bool(config.ssl_certfile) != bool(config.ssl_keyfile):
        raise KafkaSettingsError("a client certificate needs both its certificate and its key file")
    sasl_given = [name for name, value in (("SASL mechanism", config.sasl_mechanism),
                                           ("SASL username", config.sasl_username),
                                           ("SASL password", config.sasl_password)) if value]
    if not config.uses_sasl:
        if sasl_given:
            raise KafkaSettingsError(f"{' and '.join(sasl_given)} given, but security protocol {protocol} does not use"
                                     " SASL (use SASL_SSL or SASL_PLAINTEXT)")
        return
    if config.sasl_mechanism not in SASL_MECHANISMS:
        raise KafkaSettingsError(f"security protocol {protocol} needs a SASL mechanism: one of"
                                 f" {', '.join(SASL_MECHANISMS)}, got {config.sasl_mechanism!r}")
    if not config.sasl_username:
        raise KafkaSettingsError(f"security protocol {protocol} needs a SASL username")
    if not config.sasl_password:
        raise KafkaSettingsError(f"security protocol {protocol} needs a SASL password (from the environment or a file)")
