"""Settings of `gateway serve`, parsed once by the CLI and passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kafka.config import KafkaConfig


@dataclass(frozen=True, slots=True)
class ServeConfig:
    kafka: KafkaConfig
    upstreams: tuple[str, ...]
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin_listen: tuple[str, int] = ("127.0.0.1", 8081)
    admin_token: str | None = field(default=None, repr=False)  # never in logs or reprs
    budget_ms: float = 100.0
    reject_status: int = 403
    timeout_status: int = 204
    upstream_error_status: int = 502
    trusted_proxies: tuple[str, ...] = ()
    openrtb: bool = False
    workers: int = 1
    snapshot: str | None = None
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 8 << 10
    max_in_flight: int = 512
    idle_timeout_s: float = 30.0
    request_timeout_s: float = 5.0  # a begun request must be fully received within this
    access_log: bool = False
    json_logs: bool = False
