"""A lean HTTP/1.1 client for the bidders: pooled keep-alive connections over httptools.

Callback style, no task or future per request: the proxy's per-connection exchange
hands a request to an `UpstreamConnection`, whose parser calls the exchange back with
the whole response (bidder answers are small; buffering lets the proxy still answer
with the timeout status if the deadline passes mid-response). A connection goes back
to the pool only after a complete response the upstream allowed to keep alive;
anything else (error, timeout, HEAD, read-until-close) closes it. The response head
is bounded (`max_response_header_bytes`, else BROKEN: 502) and trailer fields are
dropped: they never become response headers.

Several upstreams: least in flight, rotating among ties; a connect failure or a run of
failures ejects an upstream for a while, after which it is tried again.
"""

from __future__ import annotations

import asyncio
from typing import Protocol
from urllib.parse import urlsplit

import httptools

# Response headers that describe one hop, never passed on (RFC 9110 7.6.1), plus the
# framing this client recomputes.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection transfer-encoding te trailer upgrade "
    b"proxy-authenticate proxy-authorization content-length".split()
)


# Failures, as the upstream client reports them and the pool accounts them.
OK = 0
CONNECT = 1  # could not connect: the upstream is down; eject it at once
STALE = 2  # a reused keep-alive connection died before any response byte: not its fault
BROKEN = 3  # broken or unparsable response, or too large: counts toward ejection
TIMEOUT = 4  # the deadline passed first: counts toward ejection


class _Stop(Exception):
    """Raised in a parser callback to stop reading a response already failed."""


class Exchange(Protocol):
    """What a request in the proxy looks like to the upstream client."""

    upstream_conn: UpstreamConnection | None
    seq: int  # bumped per request, so late connects can tell they are no longer wanted
    head: bytes  # request line and headers, without Host and the final CRLF
    tail: bytes  # trailing headers, final CRLF and body
    is_head: bool  # HEAD: the response has no body whatever its headers say

    def upstream_response(self, status: int, headers: bytes, body: bytes | None) -> None:
        """A complete response: headers are `Name: value\\r\\n` lines without framing ones;
        body None (HEAD) means the headers keep the upstream's Content-Length."""

    def upstream_error(self, failure: int) -> None:
        """The request failed: CONNECT or STALE (the upstream cannot have seen it, so it
        may be sent again) or BROKEN (it may have)."""


class Upstream:
    """One bidder origin: address, idle connections, load and health."""

    __slots__ = ("url", "host", "port", "host_line", "idle", "in_flight", "fails", "ejected_until")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST[:PORT], got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_line = b"Host: " + parts.netloc.encode("idna") + b"\r\n"
        self.idle: list[UpstreamConnection] = []
        self.in_flight = 0
        self.fails = 0
        self.ejected_until = 0.0

    def __repr__(self) -> str:
        return f"Upstream({self.url!r}, in_flight={self.in_flight}, fails={self.fails})"


class Pool:
    """The upstreams of one worker and their keep-alive connections."""

    def __init__(
        self,
        urls: tuple[str, ...] | list[str],
        *,
        connect_timeout_s: float = 1.0,
        max_idle_s: float = 4.0,
        max_idle_per_upstream: int = 512,
        max_response_bytes: int = 16 << 20,
        max_response_header_bytes: int = 16 << 10,
        eject_s: float = 2.0,
        max_fails: int = 3,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream is needed")
        self.upstreams = [Upstream(url) for url in urls]
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_s = max_idle_s  # below common server keep-alive timeouts (5 s and up)
        self.max_idle_per_upstream = max_idle_per_upstream
        self.max_response_bytes = max_response_bytes
        self.max_response_header_bytes = max_response_header_bytes
        self.eject_s = eject_s
        self.max_fails = max_fails
        self._turn = 0
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task] = set()

    def pick(self, now: float) -> Upstream:
        """The upstream to try: least in flight among those not ejected."""
        upstreams = self.upstreams
        count = len(upstreams)
        if count == 1:
            return upstreams[0]
        self._turn = turn = (self._turn + 1) % count
        best = None
        for i in range(count):
            upstream = upstreams[(turn + i) % count]
            if upstream.ejected_until <= now and (best is None or upstream.in_flight < best.in_flight):
                best = upstream
        if best is None:  # all ejected: try the one due back first
            best = min(upstreams, key=lambda u: u.ejected_until)
        return best

    def send(self, upstream: Upstream, exchange: Exchange, now: float, fresh: bool = False) -> None:
        """Start the exchange on a pooled connection, or a new one (`fresh`: never reuse)."""
        upstream.in_flight += 1
        if not fresh:
            idle = upstream.idle
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < self.max_idle_s and conn.transport is not None:
                    conn.send(exchange)
                    return
                conn.close()
        task = self._loop.create_task(self._connect(upstream, exchange, exchange.seq))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def done(self, upstream: Upstream, outcome: int, now: float) -> None:
        """Account the end of one `send`: success resets health, failures may eject."""
        upstream.in_flight -= 1
        if outcome == OK:
            upstream.fails = 0
        elif outcome != STALE:
            upstream.fails += 1
            if outcome == CONNECT or upstream.fails >= self.max_fails:
                upstream.ejected_until = now + self.eject_s

    async def _connect(self, upstream: Upstream, exchange: Exchange, seq: int) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self._loop.create_connection(
                    lambda: UpstreamConnection(self, upstream), upstream.host, upstream.port
                )
        except (OSError, TimeoutError):
            if exchange.seq == seq:
                exchange.upstream_error(CONNECT)
            return
        if exchange.seq == seq:
            conn.send(exchange, reused=False)
        else:  # the request ended (deadline) while connecting: keep the connection
            conn.release()

    def close(self) -> None:
        """Close idle connections and give up connects in progress."""
        for upstream in self.upstreams:
            while upstream.idle:
                upstream.idle.pop().close()
        for task in self._connecting:
            task.cancel()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one exchange at a time."""

    __slots__ = (
        "pool", "upstream", "transport", "parser", "exchange", "reused", "received",
        "headers", "body", "size", "framed", "head_only", "idle_since", "status", "in_head", "head_bytes", "head_raw",
    )

    def __init__(self, pool: Pool, upstream: Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.reused = False
        self.received = False
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.size = 0
        self.framed = False
        self.head_only = False
        self.idle_since = 0.0
        self.status = 0
        self.in_head = False
        self.head_bytes = 0
        self.head_raw = 0

    # -- driven by the pool and the proxy --------------------------------------------
    def send(self, exchange: Exchange, reused: bool = True) -> None:
        self.exchange = exchange
        exchange.upstream_conn = self
        self.reused = reused
        self.received = False
        self.transport.write(b"".join((exchange.head, self.upstream.host_line, exchange.tail)))

    def release(self) -> None:
        """Back to the pool after a complete, keep-alive response."""
        idle = self.upstream.idle
        if self.transport is None or len(idle) >= self.pool.max_idle_per_upstream:
            self.close()
            return
        self.idle_since = self.pool._loop.time()
        idle.append(self)

    def abandon(self) -> None:
        """The exchange gave up (deadline): the response was not read, so never reuse."""
        self.exchange = None
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # bytes nobody asked for: the stream is out of sync
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(BROKEN)
            return
        if self.in_head:  # a partial header line is held by the parser: bound it too
            self.head_raw += len(data)
            if self.head_raw > 2 * self.pool.max_response_header_bytes:
                self._fail(BROKEN)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        try:
            self.upstream.idle.remove(self)
        except ValueError:
            pass
        if self.exchange is not None:
            if self.status and not self.framed and self.status not in (204, 304):
                self._complete(keep=False)  # no length, not chunked: the body ran to the close
            else:
                self._fail(STALE if self.reused and not self.received else BROKEN)

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.exchange is None:  # a response nobody asked for
            self.close()
            return
        self.headers = []
        self.body = []
        self.size = 0
        self.framed = False
        self.head_only = self.exchange.is_head
        self.status = 0
        self.in_head = True
        self.head_bytes = self.head_raw = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.pool.max_response_header_bytes:
            self._fail(BROKEN)
            raise _Stop
        if not self.in_head:  # a trailer field: never a response header
            return
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"content-length" or lower == b"transfer-encoding":
                self.framed = True
                if self.head_only and lower == b"content-length":
                    self.headers.append(b"%s: %s\r\n" % (name, value))
            return
        self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0  # trailers get a budget of their own
        status = self.parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103): wait for the final response
            return
        self.status = status
        if self.head_only and self.exchange is not None:
            self._complete(keep=False)  # httptools cannot skip a HEAD body: drop the connection

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.pool.max_response_bytes:
            self._fail(BROKEN)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status and self.exchange is not None:
            self._complete(keep=self.parser.should_keep_alive())

    # -- endings ------------------------------------------------------------------------
    def _complete(self, keep: bool) -> None:
        exchange = self.exchange
        self.exchange = None
        status, headers = self.status, b"".join(self.headers)
        body = None if self.head_only else b"".join(self.body)
        self.status = 0
        if keep:
            self.release()
        else:
            self.close()
        exchange.upstream_response(status, headers, body)

    def _fail(self, failure: int) -> None:
        exchange = self.exchange
        self.exchange = None
        self.close()
        if exchange is not None:
            exchange.upstream_error(failure)
