"""The request path: parse, find the client, block or forward within the budget.

A raw asyncio protocol over httptools rather than aiohttp's server: measured here on a
trivial answer, aiohttp's low-level server costs ~27 µs of CPU per request against ~7 µs
for this, and the whole forwarded request has 60 µs. Each client connection carries one
request at a time and is itself the exchange the upstream client calls back, so a
forwarded request allocates no task, future or request object.

HTTP/1.1 behaviour where the issue is silent:
- Pipelined requests are answered in order, one at a time (reading pauses meanwhile).
- Chunked request bodies are accepted and forwarded with a Content-Length.
- `Expect: 100-continue` is answered with 100 Continue when the announced length is
  within the limit (413 otherwise), before the request is judged.
- Upgrade / CONNECT: 501, connection closed. Malformed requests: 400, closed.
- A request not fully received within `request_timeout_s`: 408, closed; a connection idle
  for `idle_timeout_s`: closed. Both checked by one sweeper per worker, not per request.
- The response to the client is sent only when the whole upstream response is in, with
  a Content-Length; so the timeout status can still be sent right up to the deadline.
- A request whose connect failed, or whose reused keep-alive connection died before any
  response byte, is sent again (another upstream, or a fresh connection) while time is
  left: the upstream cannot have answered it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from bisect import bisect_left
from collections import deque
from http import HTTPStatus
from typing import Any, Protocol

import httptools

from .clientip import ClientIP, canonical
from .config import ServeConfig
from .upstream import BROKEN, OK, STALE, TIMEOUT, Pool, Upstream, UpstreamConnection

# Requests are logged only here; silent unless the access log is switched on (control/logs.py).
ACCESS = logging.getLogger("gateway.access")

# Request headers that are not passed on as received: hop-by-hop ones (RFC 9110 7.6.1),
# framing (recomputed), Host (set per upstream), X-Forwarded-For (appended to), Expect
# (answered here).
_NOT_FORWARDED = frozenset(
    b"connection keep-alive proxy-connection transfer-encoding te trailer upgrade "
    b"proxy-authenticate proxy-authorization content-length host x-forwarded-for expect".split()
)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY_STATUS = frozenset((204, 304))
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_OUTCOMES = ("forwarded", "blocked", "timeout", "upstream_error", "shed", "not_ready", "rejected")


class View(Protocol):
    """What the proxy needs of the follower: the lookup index and readiness."""

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

    __slots__ = (*_OUTCOMES, "latency", "upstream_latency")

    def __init__(self) -> None:
        for outcome in _OUTCOMES:
            setattr(self, outcome, 0)
        self.latency = LatencyHistogram()  # request in -> response out, for requests sent upstream
        self.upstream_latency = LatencyHistogram()  # request sent upstream -> its response in

    def outcomes(self) -> dict[str, int]:
        return {outcome: getattr(self, outcome) for outcome in _OUTCOMES}


class Proxy:
    """Per-worker state of the request path and the factory of client connections."""

    def __init__(self, config: ServeConfig, view: View, stats: Stats | None = None) -> None:
        self.config = config
        self.view = view
        self.stats = stats or Stats()
        self.loop = asyncio.get_running_loop()
        self.pool = Pool(config.upstreams)
        self.resolver = ClientIP(config.trusted_proxies)
        self.budget = config.budget_ms / 1000.0
        self.openrtb = config.openrtb
        self.reject_status = 204 if config.openrtb else config.reject_status
        self.error_status = 204 if config.openrtb else config.upstream_error_status
        self.timeout_status = config.timeout_status
        self.max_body = config.max_body_bytes
        self.max_header = config.max_header_bytes
        self.max_in_flight = config.max_in_flight
        self.max_attempts = len(config.upstreams) + 1
        self.access_log = config.access_log and ACCESS.isEnabledFor(logging.INFO)
        self.in_flight = 0
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self._ready = False
        self._responses: dict[tuple[int, bytes], tuple[bytes, bytes, bytes]] = {}
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------
    async def serve(self, sock: socket.socket) -> asyncio.Server:
        """Accept clients on a bound listening socket; starts the idle/slow sweeper."""
        server = await self.loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=4096)
        self._sweeper = self.loop.create_task(self._sweep())
        return server

    async def drain(self, timeout_s: float) -> bool:
        """Stop keep-alive, close idle connections, let in-flight requests finish.

        True when every connection ended within `timeout_s`. The caller closes the
        listening server first.
        """
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy and not conn.reading:
                conn.close()
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        for conn in list(self.connections):
            conn.close()
        self.pool.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        return not self.connections

    def ready(self) -> bool:
        """Whether the view is bootstrapped (cached once true: readiness is never lost)."""
        if not self._ready:
            ready = self.view.ready
            self._ready = bool(ready.is_set() if isinstance(ready, asyncio.Event) else ready)
        return self._ready

    async def _sweep(self) -> None:
        idle_s = self.config.idle_timeout_s
        request_s = self.config.request_timeout_s
        period = min(0.5, idle_s / 4, request_s / 4)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.reading and now - conn.t0 > request_s:
                    self.stats.rejected += 1
                    conn.reject(408)
                elif not conn.busy and not conn.reading and now - conn.last > idle_s:
                    conn.close()

    # -- canned answers ---------------------------------------------------------------
    def response(self, status: int, extra: bytes = b"") -> tuple[bytes, bytes, bytes]:
        """An empty-bodied answer as (plain, keep-alive, close) variants, cached."""
        cached = self._responses.get((status, extra))
        if cached is None:
            length = b"" if status in _NO_BODY_STATUS else b"Content-Length: 0\r\n"
            head = b"HTTP/1.1 %d %s\r\n%s%s" % (status, _REASONS.get(status, b""), extra, length)
            cached = (head + b"\r\n", head + _KEEP_ALIVE + b"\r\n", head + _CLOSE + b"\r\n")
            self._responses[(status, extra)] = cached
        return cached

    def openrtb_blocked(self, body: bytes | None) -> bool:
        """Whether the OpenRTB bid request names a blocked device.ip / device.ipv6."""
        if not body:
            return False
        try:
            device = json.loads(body).get("device")
        except (ValueError, AttributeError):
            return False
        if not isinstance(device, dict):
            return False
        index = self.view.index
        for key in ("ip", "ipv6"):
            value = device.get(key)
            if isinstance(value, str):
                address = canonical(value)
                if address is not None and index.blocks(address):
                    return True
        return False


class _Stop(Exception):
    """Raised in a parser callback to stop parsing a connection just answered and closed."""


class HttpConnection(asyncio.Protocol):
    """One client connection, and the exchange of its current forwarded request."""

    __slots__ = (
        "proxy", "loop", "transport", "parser", "peer", "peer_b", "peer_trusted", "closed",
        "busy", "reading", "in_headers", "t0", "last", "url", "headers", "header_bytes",
        "raw_bytes", "body", "body_size", "xff", "conn_keep_alive", "extra_hop", "expect", "queue",
        "replaying", "request_line", "seq", "head", "tail", "is_head",
        "keep", "deadline", "timer", "upstream", "upstream_conn", "attempts", "sent",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.busy = False  # a complete request is being answered
        self.reading = False  # a request has begun and is not complete
        self.in_headers = False
        self.t0 = self.last = 0.0
        self.queue: deque | None = None  # pipelined requests waiting their turn
        self.replaying = False
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: Upstream | None = None
        self.upstream_conn: UpstreamConnection | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        address = peer[0].partition("%")[0] if peer else ""
        if address.startswith("::ffff:") and "." in address:
            address = address[7:]
        self.peer = address
        self.peer_b = address.encode()
        resolver = self.proxy.resolver
        self.peer_trusted = bool(address) and resolver.any_trusted and resolver.is_trusted(address)
        self.last = self.loop.time()
        self.proxy.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self.closed:
                self.proxy.stats.rejected += 1
                self.reject(501)
        except httptools.HttpParserError:  # also a _Stop raised in a callback
            if not self.closed:
                self.proxy.stats.rejected += 1
                self.reject(400)
        else:
            if self.in_headers:
                # httptools buffers a header line until it ends: bound that too. The count
                # may include the previous request's tail, hence the read-size slack.
                self.raw_bytes += len(data)
                if self.raw_bytes > self.proxy.max_header + 262144:
                    self.proxy.stats.rejected += 1
                    self.reject(431)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.connections.discard(self)
        # A forwarded request still runs to its end (so its upstream connection stays
        # reusable); its answer is dropped.

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.busy:
            self.transport.resume_reading()

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.reading = True
        self.in_headers = True
        self.t0 = self.loop.time()
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.raw_bytes = 0
        self.expect = False
        self.body = None
        self.body_size = 0
        self.xff = None
        self.conn_keep_alive = False
        self.extra_hop = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        lower = name.lower()
        if lower not in _NOT_FORWARDED:
            self.headers.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif lower == b"content-length":
            if value.isdigit() and int(value) > self.proxy.max_body:
                self.refuse(413)
        elif lower == b"connection":
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"keep-alive":
                    self.conn_keep_alive = True
                elif token != b"close":
                    self.extra_hop = (self.extra_hop or set()) | {token}
        elif lower == b"expect":
            if value.lower() != b"100-continue":
                self.refuse(417)
            self.expect = True

    def on_headers_complete(self) -> None:
        self.in_headers = False
        if self.header_bytes > self.proxy.max_header:
            self.refuse(431)
        if self.extra_hop:  # Connection names further hop-by-hop headers: drop them
            drop = self.extra_hop
            self.headers = [h for h in self.headers if h.partition(b":")[0].lower() not in drop]
        if self.expect and not self.parser.should_upgrade():
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.proxy.max_body:
            self.refuse(413)
        self.body = body if self.body is None else self.body + body

    def on_message_complete(self) -> None:
        self.reading = False
        if self.parser.should_upgrade():
            self.refuse(501)
        request = (
            self.t0, self.parser.get_method(), self.url, self.headers, self.body, self.xff,
            self.parser.should_keep_alive() and not self.proxy.draining, self.conn_keep_alive,
        )
        if self.busy:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(request)
            self.transport.pause_reading()
        else:
            self.handle(request)

    # -- the request path -------------------------------------------------------------
    def handle(self, request: tuple) -> None:
        t0, method, url, headers, body, xff, keep, conn_keep_alive = request
        proxy = self.proxy
        stats = proxy.stats
        self.keep = keep
        self.busy = True
        if proxy.access_log:
            self.request_line = (method, url)
        if not proxy.ready():
            stats.not_ready += 1
            self.answer(proxy.response(503, b"Retry-After: 1\r\n"), conn_keep_alive)
            return
        if self.peer_trusted and xff is not None:
            client = proxy.resolver.resolve(self.peer, xff.decode("latin-1"))
        else:
            client = self.peer
        index = proxy.view.index
        if index.blocks(client) or (proxy.openrtb and proxy.openrtb_blocked(body)):
            stats.blocked += 1
            self.answer(proxy.response(proxy.reject_status), conn_keep_alive)
            return
        if proxy.in_flight >= proxy.max_in_flight:
            stats.shed += 1
            self.answer(proxy.response(503), conn_keep_alive)
            return
        self.deadline = deadline = t0 + proxy.budget
        if self.loop.time() >= deadline:
            stats.timeout += 1
            self.answer(proxy.response(proxy.timeout_status), conn_keep_alive)
            return
        self.conn_keep_alive = conn_keep_alive
        self.is_head = method == b"HEAD"
        self.head = b"%s %s HTTP/1.1\r\n%s" % (method, url, b"".join(headers))
        forwarded = self.peer_b if xff is None else xff + b", " + self.peer_b
        if body is None:
            self.tail = b"X-Forwarded-For: %s\r\n\r\n" % forwarded
        else:
            self.tail = b"X-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n%s" % (forwarded, len(body), body)
        self.attempts = 1
        self.seq += 1
        proxy.in_flight += 1
        self.timer = self.loop.call_at(deadline, self.on_deadline)
        self.upstream = upstream = proxy.pool.pick(t0)
        self.sent = t0
        proxy.pool.send(upstream, self, t0)

    def upstream_response(self, status: int, headers: bytes, body: bytes | None) -> None:
        now = self.loop.time()
        self._end(OK, now)
        proxy = self.proxy
        proxy.stats.forwarded += 1
        proxy.stats.latency.observe(now - self.t0)
        proxy.stats.upstream_latency.observe(now - self.sent)
        if proxy.draining:
            self.keep = False
        connection = (_KEEP_ALIVE if self.conn_keep_alive else b"") if self.keep else _CLOSE
        if body is None or status in _NO_BODY_STATUS:  # HEAD (length kept) or no body
            data = b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, _REASONS.get(status, b""), headers, connection)
        else:
            data = b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
                status, _REASONS.get(status, b""), headers, connection, len(body), body)
        self.write(data)

    def upstream_error(self, failure: int) -> None:
        now = self.loop.time()
        proxy = self.proxy
        pool = proxy.pool
        if failure != BROKEN and now < self.deadline and self.attempts < proxy.max_attempts:
            previous = self.upstream
            pool.done(previous, failure, now)
            upstream = pool.pick(now)
            if failure == STALE or upstream is not previous:  # send it again
                self.attempts += 1
                self.upstream = upstream
                self.upstream_conn = None
                self.sent = now
                pool.send(upstream, self, now, fresh=failure == STALE)
                return
            self.upstream = None  # accounted above; nowhere else to try
        self._end(failure, now)
        proxy.stats.upstream_error += 1
        proxy.stats.latency.observe(now - self.t0)
        self.answer(proxy.response(proxy.error_status), self.conn_keep_alive)

    def on_deadline(self) -> None:
        self.timer = None
        conn = self.upstream_conn
        if conn is not None:
            conn.abandon()
        now = self.loop.time()
        self._end(TIMEOUT, now)
        proxy = self.proxy
        proxy.stats.timeout += 1
        proxy.stats.latency.observe(now - self.t0)
        self.answer(proxy.response(proxy.timeout_status), self.conn_keep_alive)

    def _end(self, outcome: int, now: float) -> None:
        """Close the books on the forwarded request, whatever its outcome."""
        self.seq += 1  # a connect still in progress now parks its connection
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.proxy.in_flight -= 1
        if self.upstream is not None:
            self.proxy.pool.done(self.upstream, outcome, now)
        self.upstream = None
        self.upstream_conn = None

    # -- answers ------------------------------------------------------------------------
    def answer(self, variants: tuple[bytes, bytes, bytes], conn_keep_alive: bool) -> None:
        if self.proxy.draining:
            self.keep = False
        self.write(variants[(1 if conn_keep_alive else 0) if self.keep else 2])

    def write(self, data: bytes) -> None:
        """Send the answer to the current request, then take the next (or close)."""
        self.busy = False
        if self.closed:
            return
        self.last = self.loop.time()
        self.transport.write(data)
        if self.proxy.access_log:
            self.log_access(data)
        if not self.keep:
            self.close()
            return
        queue = self.queue
        if queue is None or self.replaying:  # nested answers return to the loop below
            return
        self.replaying = True
        while queue and not self.busy and not self.closed:
            self.handle(queue.popleft())
        self.replaying = False
        if not queue and not self.busy and not self.closed:
            self.transport.resume_reading()

    def refuse(self, status: int) -> None:
        """From a parser callback: reject the request and stop parsing the connection."""
        self.proxy.stats.rejected += 1
        self.reject(status)
        raise _Stop

    def log_access(self, response: bytes) -> None:
        method, url = self.request_line
        ACCESS.info("%s %s %s", method.decode("latin-1"), url.decode("latin-1"), response[9:12].decode(), extra={
            "peer": self.peer, "status": int(response[9:12]), "ms": round((self.last - self.t0) * 1000, 3)})

    def reject(self, status: int) -> None:
        """Answer a request that will not be read to its end, and close."""
        if not self.closed and not self.busy:
            self.transport.write(self.proxy.response(status)[2])
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reading = False
            self.transport.close()
            self.proxy.connections.discard(self)
