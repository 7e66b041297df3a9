"""Settings of `gateway serve`, parsed once by the CLI and passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kafka.config import KafkaConfig
from .tls import TlsFiles


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
    proxy_protocol: bool = False  # trusted peers must start with a PROXY v1/v2 header
    retry_non_idempotent: bool = False  # resend a POST whose reused connection died (may duplicate it)
    max_connections: int = 4096  # per worker; more are closed at accept (nginx worker_connections)
    max_buffered_bytes: int = 64 << 20  # per worker: request bodies being gathered, all connections
    max_response_header_bytes: int = 16 << 10  # upstream response head; larger: 502
    engine: str = "fast"  # front-door engine: "fast" (httptools) or "aiohttp" (http/engines.py)
    access_log: bool = False
    mode: str = "enforce"  # "shadow": forward requests the blacklist would refuse, counted as shadow_blocked
    admin_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (actor name, token), never logged
    max_prefix_v4: int = 8  # POST /admin/commands refuses a wider BLACKLIST unless forced
    max_prefix_v6: int = 32
    json_logs: bool = False
    tls: TlsFiles | None = None  # the proxy port speaks HTTPS with these files
    admin_tls: TlsFiles | None = None  # the admin listener speaks HTTPS (client CA optional)
