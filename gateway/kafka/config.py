"""Where the log lives: the broker address and the two topic names every Kafka client shares."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_COMMANDS_TOPIC = "blacklist.commands"
DEFAULT_RANGES_TOPIC = "blacklist.ranges"


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split `HOST:PORT`, `[V6]:PORT` or `:PORT` into a host and a port number."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap: str
    commands_topic: str = DEFAULT_COMMANDS_TOPIC
    ranges_topic: str = DEFAULT_RANGES_TOPIC
    # Production: topics come from the topics job with the cluster's replication factor, so
    # no process ever creates the permanent command log with a default (RF 1) by accident.
    create_topics: bool = True
    replication_factor: int = 1
