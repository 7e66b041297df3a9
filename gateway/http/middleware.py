"""Inline filtering for aiohttp applications: the blacklist as a middleware, no proxy hop.

A bidder written in aiohttp can enforce the blacklist itself: `setup_blacklist` runs a
follower of the view on the application's lifecycle (`cleanup_ctx`) and puts a middleware
in front of every handler that answers blacklisted clients at once, with the gateway's
rules:

- 503 with `Retry-After: 1` until the follower has read the view to its end (DESIGN
  invariant 3): an app that answered before would let blacklisted clients through.
- The client is the peer address as every engine reads it (decision.peer_address: IPv4-mapped
  peers count as IPv4, zone ids are dropped);
  `X-Forwarded-For` (all its header lines, joined in order) only when the peer is a
  configured trusted proxy, walked right to left past trusted proxies (gateway.http.clientip).
- Blocked: the reject status (403; 204 suits OpenRTB bidders) before the handler runs.
  The body is never read: when it has not fully arrived, the answer closes the connection,
  so aiohttp does not linger reading (and discarding) what the client still sends.

    from aiohttp import web
    from gateway.http.middleware import setup_blacklist

    app = web.Application()
    setup_blacklist(app, "kafka:9092", trusted_proxies=["10.0.0.0/8"])
    web.run_app(app)

The allowed path costs one attribute check, the peer string aiohttp already has, one trie
lookup and one integer increment; metrics are read from those integers when Prometheus
scrapes (`gateway_requests_total{outcome}` and the view gauges, the names `gateway serve`
exports), so nothing else runs per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..kafka.config import KafkaConfig
from ..kafka.follower import Follower
from .clientip import ClientIP
from .decision import peer_address

log = logging.getLogger("gateway.middleware")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What this middleware can count, under the label values `gateway serve` uses: `forwarded`
# is a request handed on to the app's handler, `rejected` one without a peer address.
OUTCOMES = ("forwarded", "blocked", "not_ready", "rejected")
STOP_TIMEOUT_S = 5.0
# The follower's fetch loop costs ~0.5 ms of CPU per round trip, busy or idle: 52 ms per second
# at `gateway serve`'s 10 ms, 7.6 ms at 100 ms (measured on the 2-core dev machine). A bidder's
# CPU is its product, so the inline follower polls at 100 ms. Apache Kafka answers a waiting
# fetch as soon as a record arrives, so this delays nothing there; Tansu (the development
# broker) holds an empty fetch for the whole wait, so there it adds up to 100 ms of propagation.
FETCH_MAX_WAIT_MS = 100


class InlineBlacklist:
    """The follower, the client-address rules and the counters of one aiohttp application.

    Use `setup_blacklist` to install it, or add `middleware` (outermost, so nothing runs
    before it and nobody rewrites `request.remote` first) and `cleanup_ctx` yourself.
    `exempt`: paths that skip the filter, for probes and /metrics that must answer while
    the view bootstraps; they are checked only on the way to a refusal, never on the
    allowed path. `registry`: where the metrics go (None: nowhere). `fetch_max_wait_ms`: see
    FETCH_MAX_WAIT_MS.
    """

    def __init__(
        self,
        kafka: KafkaConfig | str,
        *,
        trusted_proxies: Iterable[str] = (),
        reject_status: int = 403,
        exempt: Iterable[str] = (),
        registry: CollectorRegistry | None = REGISTRY,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
    ) -> None:
        self.kafka = KafkaConfig(kafka) if isinstance(kafka, str) else kafka
        self.reject_status = reject_status
        self.exempt = frozenset(exempt)
        self.registry = registry
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.follower: Follower | None = None  # one per app lifecycle, made by cleanup_ctx
        self.forwarded = self.blocked = self.not_ready = self.rejected = 0
        self._resolver = ClientIP(trusted_proxies)
        self._xff = self._resolver.any_trusted
        self._ready = False
        self._started = time.time()

    # -- what handlers may ask --------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the view is bootstrapped (readiness is never lost once reached)."""
        if not self._ready and self.follower is not None and self.follower.ready.is_set():
            self._ready = True
        return self._ready

    def client_address(self, request: web.Request) -> str:
        """The address the blacklist judges for this request ("" when the peer has none)."""
        peer = request.remote or ""
        if ":" in peer:  # IPv6 text; the common IPv4 peer pays this one test
            peer = peer_address(peer)
        if self._xff and peer and self._resolver.is_trusted(peer):
            lines = request.headers.getall("X-Forwarded-For", ())
            if lines:
                return self._resolver.resolve(peer, ", ".join(lines))
        return peer

    def blocks(self, address: str) -> bool:
        """Whether an IPv4 or IPv6 address (its text) is blacklisted; False for anything else.

        For addresses found elsewhere than the connection, e.g. an OpenRTB `device.ip`
        the handler has parsed anyway. False until the view is bootstrapped.
        """
        if self.follower is None:
            return False
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self.follower.index.blocks(str(ip))

    # -- the middleware ---------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._ready or self.ready:
            client = self.client_address(request)
            if client:
                if not self.follower.index.blocks(client):
                    self.forwarded += 1
                    return await handler(request)
                if request.path in self.exempt:
                    return await handler(request)
                self.blocked += 1
                return await _refuse(request, self.reject_status)
            if request.path in self.exempt:
                return await handler(request)
            if not self.rejected:
                log.warning("a request without a peer address (unix socket?) was refused: "
                            "the blacklist filter judges IP peers only")
            self.rejected += 1
            return await _refuse(request, self.reject_status)
        if request.path in self.exempt:
            return await handler(request)
        self.not_ready += 1
        return await _refuse(request, 503, {"Retry-After": "1"})

    # -- the lifecycle ----------------------------------------------------------------
    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Run a follower of the view while the app runs; register the metrics meanwhile."""
        self.follower = follower = Follower(self.kafka, fetch_max_wait_ms=self.fetch_max_wait_ms)
        self._ready = False
        self._started = time.time()
        task = asyncio.create_task(follower.run(), name="gateway-inline-follower")
        collector = _Collector(self)
        if self.registry is not None:
            self.registry.register(collector)
        try:
            yield
        finally:
            if self.registry is not None:
                self.registry.unregister(collector)
            follower.stop()
            try:
                await asyncio.wait_for(task, STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("the blacklist follower did not stop within %s s; cancelled", STOP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a failed follower must not fail the app's shutdown
                log.exception("the blacklist follower failed")


BLACKLIST = web.AppKey("gateway_blacklist", InlineBlacklist)


def setup_blacklist(app: web.Application, kafka: KafkaConfig | str, **options) -> InlineBlacklist:
    """Install inline filtering on `app`: the middleware outermost, the follower on its lifecycle.

    `options` are InlineBlacklist's. Handlers reach the filter as `request.app[BLACKLIST]`.
    """
    guard = InlineBlacklist(kafka, **options)
    app.middlewares.insert(0, guard.middleware)
    app.cleanup_ctx.append(guard.cleanup_ctx)
    app[BLACKLIST] = guard
    return guard


async def _refuse(request: web.Request, status: int, headers: dict[str, str] | None = None) -> web.Response:
    """An empty answer. When the body has not fully arrived, the answer is sent here and the
    connection closed at once: left to aiohttp, it would linger reading the body to discard it."""
    response = web.Response(status=status, headers=headers)
    if request.content.is_eof():
        return response
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # closes the transport once the answer is flushed
    return response


class _Collector:
    """Prometheus collector read at scrape time: the request path only bumps integers."""

    def __init__(self, guard: InlineBlacklist) -> None:
        self.guard = guard

    def collect(self) -> Iterable:
        guard = self.guard
        requests = CounterMetricFamily("gateway_requests", "Requests by outcome.", labels=["outcome"])
        for outcome in OUTCOMES:
            requests.add_metric([outcome], getattr(guard, outcome))
        yield requests
        yield GaugeMetricFamily("gateway_ready", "1 when the view is bootstrapped.", value=1 if guard.ready else 0)
        follower = guard.follower
        if follower is None:
            return
        ranges = GaugeMetricFamily("gateway_ranges", "Ranges in the view.", labels=["family"])
        for family in (4, 6):
            ranges.add_metric([str(family)], follower.view.count(family))
        yield ranges
        yield GaugeMetricFamily("gateway_view_applied_offset", "Next view offset to apply.",
                                value=sum(follower.applied_offsets.values()))
        if follower.lag is not None:
            yield GaugeMetricFamily("gateway_view_lag_records", "View records not yet applied.", value=follower.lag)
        yield GaugeMetricFamily("gateway_view_age_seconds", "Seconds since the view was last known current.",
                                value=_age(follower, guard._started))
        poison = CounterMetricFamily("gateway_poison_records", "Unparseable records skipped.", labels=["reader"])
        poison.add_metric(["follower"], follower.poison)
        yield poison


def _age(follower: Follower, started: float) -> float:
    """The rule of `gateway serve`'s gauge: since the broker's last answer when nothing was left
    to apply, else since the last record applied, and never before the app started."""
    now = time.time()
    marks = [started]
    if follower.last_update is not None:
        marks.append(follower.last_update)
    since_contact = follower.seconds_since_contact()
    if since_contact is not None and follower.lag == 0:
        marks.append(now - since_contact)
    return max(0.0, now - max(marks))

