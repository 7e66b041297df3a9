"""The decision core of the request path, shared by every front-door engine.

Who the client is (peer, PROXY protocol, trusted X-Forwarded-For, OpenRTB device
addresses), whether it is blocked, whether the worker can take the request (readiness,
in-flight bound), and whether a failed upstream attempt may be sent again. No sockets
and no HTTP framing here: the fast engine (proxy.py) and any other engine call these
per request, so both decide alike and count in the same Stats.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from bisect import bisect_left
from ssl import SSLContext
from typing import Any, Protocol

from . import openrtb
from .clientip import ClientIP
from .config import ServeConfig
from .upstream import CONNECT, STALE, Pool

_OUTCOMES = ("forwarded", "blocked", "timeout", "upstream_error", "shed", "not_ready", "rejected", "shadow_blocked")
SHADOW_LOG_EVERY = 100  # --mode shadow logs the first would-be-blocked request, then one in this many

log = logging.getLogger(__name__)

# RFC 9110 9.2.2: a request with one of these methods may be sent again after a failure.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"))


def peer_address(address: str) -> str:
    """A socket peer address as the index and the trusted-proxy check want it.

    Every engine and the aiohttp middleware call this, so they judge one client alike: an
    IPv4-mapped peer (`::ffff:a.b.c.d`, from a dual-stack listener) is its IPv4 address (the
    IPv4 trie holds its ranges), and a link-local zone id (`fe80::1%eth0`) names our
    interface, not the client, so it is dropped. IPv4 text passes with one test.
    """
    if ":" in address:
        address = address.partition("%")[0]
        if address.startswith("::ffff:") and "." in address:
            address = address[7:]
    return address


class View(Protocol):
    """What the core needs of the follower: the lookup index and readiness."""

    index: Any  # .blocks(ip: str) -> bool
    ready: Any  # bool, or an asyncio.Event set once bootstrapped


class LatencyHistogram:
    """Cumulative-free bucket counts of response latency (seconds): one bisect per sample."""

    __slots__ = ("bounds", "counts", "sum")

    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.105, 0.25, 1.0)

    def __init__(self, bounds: tuple[float, ...] = BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last bucket: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class Stats:
    """Per-worker counters as plain integers; exported by whoever wires metrics."""

    __slots__ = (*_OUTCOMES, "latency", "upstream_latency", "blocked_by")

    def __init__(self) -> None:
        for outcome in _OUTCOMES:
            setattr(self, outcome, 0)
        self.blocked_by: dict[str, int] = {}  # client address -> refusals; the metrics flush takes it (top ranges)
        self.latency = LatencyHistogram()  # request in -> response out, for requests sent upstream
        self.upstream_latency = LatencyHistogram()  # request sent upstream -> its response in

    def outcomes(self) -> dict[str, int]:
        return {outcome: getattr(self, outcome) for outcome in _OUTCOMES}


class Core:
    """Per-worker decision state: view, resolver, budget, limits and the upstream pool."""

    def __init__(self, config: ServeConfig, view: View, stats: Stats | None = None) -> None:
        self.config = config
        self.view = view
        self.stats = stats or Stats()
        self.loop = asyncio.get_running_loop()
        self.pool = Pool(config.upstreams, max_response_header_bytes=config.max_response_header_bytes)
        self.resolver = ClientIP(config.trusted_proxies)
        self.budget = config.budget_ms / 1000.0
        self.openrtb = config.openrtb
        self.proxy_protocol = config.proxy_protocol
        self.retry_non_idempotent = config.retry_non_idempotent
        self.reject_status = 204 if config.openrtb else config.reject_status
        self.error_status = 204 if config.openrtb else config.upstream_error_status
        self.timeout_status = config.timeout_status
        self.max_body = config.max_body_bytes
        self.max_header = config.max_header_bytes
        self.max_in_flight = config.max_in_flight
        self.max_attempts = len(config.upstreams) + 1
        self.shadow = getattr(config, "mode", "enforce") == "shadow"  # forward would-be-blocked, count them
        self.in_flight = 0
        self._ready = False
        # The front door's books, kept alike by both engines:
        self.max_connections = config.max_connections
        self.max_buffered = config.max_buffered_bytes
        self.buffered = 0  # request body bytes being gathered, over all connections
        self.valid_hosts: set[bytes] = set()  # Host values seen valid: a set lookup, not a regex, per request
        self.draining = False

    async def listen(self, protocol_factory: Any, sock: socket.socket, ssl: SSLContext | None) -> asyncio.AbstractServer:
        """Accept an engine's clients on a listening socket (over TLS with `ssl`).

        A TLS handshake must end within the request timeout: until it does, the connection is
        not the engine's (no connection_made), so nothing else would bound it. So must the TLS
        close (our close_notify, the client's answer): until then the connection still counts
        against max_connections (uvloop's default wait is 30 s)."""
        timeout = self.config.request_timeout_s
        tls = {"ssl": ssl, "ssl_handshake_timeout": timeout, "ssl_shutdown_timeout": timeout} if ssl else {}
        return await self.loop.create_server(protocol_factory, sock=sock, backlog=4096, **tls)

    def ready(self) -> bool:
        """Whether the view is bootstrapped (cached once true: readiness is never lost)."""
        if not self._ready:
            ready = self.view.ready
            self._ready = bool(ready.is_set() if isinstance(ready, asyncio.Event) else ready)
        return self._ready

    def trusted(self, address: str) -> bool:
        """Whether a canonical peer address is a configured proxy (XFF, PROXY protocol)."""
        resolver = self.resolver
        return bool(address) and resolver.any_trusted and resolver.is_trusted(address)

    def blocks(self, address: str) -> bool:
        """Index lookup that fails closed: an address the index cannot take is blocked."""
        try:
            return self.view.index.blocks(address)
        except (ValueError, TypeError, KeyError):
            return True

    def screen(self, peer: str, peer_trusted: bool, xff: bytes | None) -> int:
        """Decide on the headers alone: 0 to go on, else the status to answer at once."""
        if not self._ready and not self.ready():
            self.stats.not_ready += 1
            return 503
        client = self.resolver.resolve(peer, xff.decode("latin-1")) if peer_trusted and xff is not None else peer
        try:  # self.blocks(), inlined: this runs for every request
            blocked = self.view.index.blocks(client)
        except (ValueError, TypeError, KeyError):
            blocked = True
        if blocked:
            stats = self.stats
            by = stats.blocked_by
            by[client] = by.get(client, 0) + 1
            if self.shadow:
                return self._shadowed(client)
            stats.blocked += 1
            return self.reject_status
        return 0

    def _shadowed(self, client: str) -> int:
        """--mode shadow: the blacklist would refuse this client; count it, log a sample, let it through."""
        self.stats.shadow_blocked += 1
        if self.stats.shadow_blocked % SHADOW_LOG_EVERY == 1:
            log.info("shadow mode: forwarded a request the blacklist would refuse",
                     extra={"client": client, "shadow_blocked": self.stats.shadow_blocked})
        return 0

    def screen_body(self, body: bytes | None, content_encoding: bytes | None) -> int:
        """OpenRTB mode, once the body is in: 0 to go on, else the reject status (fail closed)."""
        if body is None and content_encoding is None:
            return 0
        try:
            addresses = openrtb.device_addresses(body or b"", content_encoding, self.max_body)
        except openrtb.Unreadable:
            addresses = None
        if addresses is None:  # unreadable: fail closed in both modes (not a blacklist decision)
            self.stats.blocked += 1
            return self.reject_status
        hits = [a for a in addresses if self.blocks(a)]
        if hits:
            by = self.stats.blocked_by
            for address in hits:
                by[address] = by.get(address, 0) + 1
            if self.shadow:
                return self._shadowed(hits[0])
            self.stats.blocked += 1
            return self.reject_status
        return 0

    def admit(self) -> int:
        """0 when the worker can take one more request upstream, else 503 (shed fast)."""
        if self.in_flight >= self.max_in_flight:
            self.stats.shed += 1
            return 503
        return 0

    def resend(self, exchange: Any, failure: int, now: float) -> bool:
        """After a failed attempt: send the request again while time is left, another attempt is
        allowed and `resendable` says it may (another upstream, or a fresh connection after a
        stale one). True when it went again; else the engine ends it with the error status.
        `exchange` is an engine's forwarded request (upstream.Exchange plus the fields here)."""
        if now < exchange.deadline and exchange.attempts < self.max_attempts and self.resendable(
                failure, exchange.idempotent):
            pool = self.pool
            previous = exchange.upstream
            pool.done(previous, failure, now)
            upstream = pool.pick(now)
            if failure == STALE or upstream is not previous:
                exchange.attempts += 1
                exchange.upstream = upstream
                exchange.upstream_conn = None
                exchange.sent = now
                pool.send(upstream, exchange, now, fresh=failure == STALE)
                return True
            exchange.upstream = None  # accounted above; nowhere else to try
        return False

    def end(self, exchange: Any, outcome: int, now: float) -> None:
        """Close the books on a forwarded request, whatever its outcome: its deadline timer,
        the in-flight count and the upstream's health (upstream.Pool.done)."""
        exchange.seq += 1  # a connect still in progress now parks its connection
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        self.in_flight -= 1
        if exchange.upstream is not None:
            self.pool.done(exchange.upstream, outcome, now)
        exchange.upstream = None
        exchange.upstream_conn = None

    def resendable(self, failure: int, idempotent: bool) -> bool:
        """Whether a failed attempt may be sent again: only if it provably never reached the
        upstream (connect failed), or the method is idempotent and the reused keep-alive
        connection died before any response byte, or the operator allows resending."""
        if failure == CONNECT:
            return True
        return failure == STALE and (idempotent or self.retry_non_idempotent)
