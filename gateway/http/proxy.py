"""The fast engine: an asyncio protocol over httptools in front of the decision core.

A raw asyncio protocol rather than aiohttp's server: measured here on a trivial answer,
aiohttp's low-level server costs ~27 µs of CPU per request against ~7 µs for this. Each
client connection carries one request at a time and is itself the exchange the upstream
client calls back, so a forwarded request allocates no task, future or request object.
What to decide (client address, blacklist, readiness, shedding, resending) lives in
decision.py, the HTTP rules and answers it shares with the aiohttp engine (aioengine.py) in
wire.py; this module is HTTP/1.1 framing and bounded buffering.

HTTP/1.1 behaviour (README "Front door: HTTP conformance and limits" lists each choice):
- The decision is taken when the headers are complete. A blocked (or not-ready) request
  with a body is answered at once with `Connection: close` and its body is never read;
  one without a body is answered in turn and the connection kept.
- Trailer fields are never headers: counted against the header limit, then dropped.
- Pipelined requests are answered in order, one at a time; reading pauses while one is
  in flight, while the queue is full, and while the client does not read its answers.
- A request that is refused (400, 413, 431, ...) after an answer still owed gets its
  refusal after that answer, then the connection closes.
- Chunked request bodies are forwarded with a Content-Length. A request that came with
  framing (Content-Length, even 0, or chunked) is forwarded with a Content-Length.
- `Expect: 100-continue` (HTTP/1.1 only) is answered with 100 Continue once the request
  is allowed and is the one being served; never to an HTTP/1.0 client.
- Upgrade / CONNECT: 501. TRACE: 405. HTTP versions other than 1.0/1.1: 505. Transfer
  codings other than exactly `chunked`: 501; with HTTP/1.0: 400. Host missing (1.1),
  repeated or malformed: 400. Absolute-form targets become origin-form (userinfo: 400).
  Header names with an underscore are dropped (nginx `underscores_in_headers off`).
- A request not fully received within `request_timeout_s`: 408, closed; a body still
  arriving when the budget is spent: the timeout status, closed, the rest never read; a
  connection idle for `idle_timeout_s`: closed. All checked by one sweeper per worker.
- The response to the client is sent only when the whole upstream response is in, with
  a Content-Length; so the timeout status can still be sent right up to the deadline.
- A failed attempt is sent again (another upstream, or a fresh connection) while time is
  left only when decision.Core.resendable says it may (a POST only if it provably never
  reached the upstream, unless `--retry-non-idempotent`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from ssl import SSLContext

import httptools

from . import proxyproto
from .config import ServeConfig
from .decision import IDEMPOTENT, Core, LatencyHistogram, Stats, View, peer_address
from .upstream import OK, TIMEOUT, Upstream, UpstreamConnection
from .wire import CLOSE as _CLOSE
from .wire import CONTINUE as _CONTINUE
from .wire import KEEP_ALIVE as _KEEP_ALIVE
from .wire import MAX_CHUNKS, Answers, origin_form, response_bytes, valid_host
from .wire import SPECIAL as _SPECIAL

__all__ = ["ACCESS", "HttpConnection", "LatencyHistogram", "Proxy", "Stats", "View"]

# Requests are logged only here; silent unless the access log is switched on (control/logs.py).
ACCESS = logging.getLogger("gateway.access")
log = logging.getLogger(__name__)

SLICE = 8192  # bytes fed to the parser at a time: bounds what one read can queue or buffer
MAX_QUEUED = 16  # pipelined requests queued before parsing stops (plus what the slice in hand holds)


class Proxy(Core):
    """Per-worker state of the fast engine and the factory of client connections."""

    def __init__(self, config: ServeConfig, view: View, stats: Stats | None = None) -> None:
        super().__init__(config, view, stats)
        self.access_log = config.access_log and ACCESS.isEnabledFor(logging.INFO)
        self.connections: set[HttpConnection] = set()
        self._answers = Answers()
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------
    async def serve(self, sock: socket.socket, ssl: SSLContext | None = None) -> asyncio.Server:
        """Accept clients on a listening socket (over TLS with `ssl`); starts the idle/slow sweeper."""
        server = await self.listen(lambda: HttpConnection(self), sock, ssl)
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

    async def _sweep(self) -> None:
        idle_s = self.config.idle_timeout_s
        request_s = self.config.request_timeout_s
        budget = self.budget
        period = min(0.5, idle_s / 4, request_s / 4, max(budget, 0.05))
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.reading and now - conn.t0 > request_s:
                    conn.fail(408)
                elif conn.reading and not conn.in_headers and now - conn.t0 > budget:
                    # A body still arriving past the deadline can never be answered in time:
                    # answer now and stop reading it (a trickled body costs a read per segment).
                    self.stats.timeout += 1
                    conn.final(self.timeout_status)
                elif not conn.busy and not conn.reading and now - conn.last > idle_s:
                    conn.close()

    def remember_host(self, host: bytes) -> None:
        if len(self.valid_hosts) >= 1024:
            self.valid_hosts.clear()
        self.valid_hosts.add(host)

    # -- canned answers ---------------------------------------------------------------
    def response(self, status: int, extra: bytes = b"") -> tuple[bytes, bytes, bytes]:
        """An empty-bodied answer as (plain, keep-alive, close) variants, cached (wire.Answers)."""
        return self._answers(status, extra)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing a connection already answered."""


class HttpConnection(asyncio.Protocol):
    """One client connection, and the exchange of its current forwarded request."""

    __slots__ = (
        "proxy", "loop", "transport", "parser", "peer", "peer_b", "peer_trusted", "closed", "halted",
        "preamble", "held", "queue", "replaying", "write_paused", "continue_due",
        # the request being parsed
        "reading", "in_headers", "t0", "method", "url", "headers", "header_bytes", "head_bytes", "body",
        "body_size", "xff", "hop", "ka", "expect", "host", "hosts", "te", "length", "encoding", "chunks",
        "verdict", "http10", "keep_alive",
        # the request being answered
        "busy", "last", "request_line", "keep", "x_ka", "head", "tail", "is_head", "idempotent", "seq",
        "deadline", "timer", "upstream", "upstream_conn", "attempts", "sent",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.halted = False  # nothing more is read from this connection
        self.preamble: bytes | None = None  # PROXY protocol header being received
        self.held: bytes | None = None  # received, not yet parsed: the queue is full
        self.queue: deque = deque()  # pipelined requests (tuples) and final answers (bytes)
        self.replaying = False
        self.write_paused = False
        self.continue_due = False
        self.busy = False  # a complete request is being answered
        self.reading = False  # a request has begun and is not complete
        self.in_headers = False
        self.t0 = self.last = 0.0
        self.body_size = 0
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: Upstream | None = None
        self.upstream_conn: UpstreamConnection | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        proxy = self.proxy
        if len(proxy.connections) >= proxy.max_connections:
            self.closed = True
            proxy.stats.rejected += 1
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.set_peer(peer[0] if peer else "")
        self.last = self.loop.time()
        if proxy.proxy_protocol and self.peer_trusted:
            self.preamble = b""
            self.reading = True  # the request timeout covers the PROXY header too
            self.t0 = self.last
        proxy.connections.add(self)

    def set_peer(self, address: str) -> None:
        self.peer = address = peer_address(address)
        self.peer_b = address.encode()
        self.peer_trusted = self.proxy.trusted(address)

    def data_received(self, data: bytes) -> None:
        if len(data) <= SLICE and self.held is None and self.preamble is None and not self.halted:
            self.feed(data)  # the common case: one request, or a piece of a body
            return
        if self.halted or self.closed:
            return
        if self.preamble is not None:
            data = self.read_preamble(data)
            if not data:
                return
        if self.held is not None:  # the queue is full: keep it for later (reading is paused)
            self.held += data
            return
        if len(data) <= SLICE:
            self.feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self.held is not None:
                self.held = bytes(view[start:])
                return
            self.feed(view[start : start + SLICE])
            if self.halted or self.closed:
                return

    def feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self.halted:
                self.parse_failed(exc)
        else:
            if self.in_headers:
                # httptools holds a header line until it ends: bound that too (one slice of slack).
                self.head_bytes += len(data)
                if self.head_bytes > self.proxy.max_header + SLICE:
                    self.fail(431)

    def parse_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):  # CONNECT
            self.fail(501)
        elif isinstance(exc, httptools.HttpParserCallbackError):  # not a refusal of ours: a bug
            log.exception("request parsing failed", extra={"peer": self.peer})
            self.fail(500)
        else:
            self.fail(400)

    def read_preamble(self, data: bytes) -> bytes | None:
        """Take the PROXY protocol header off the stream; the rest, if any, is HTTP."""
        buffered = self.preamble + data
        try:
            parsed = proxyproto.parse(buffered)
        except proxyproto.Invalid:
            self.preamble = None
            self.fail(400)
            return None
        if parsed is None:
            self.preamble = buffered
            return None
        source, length = parsed
        self.preamble = None
        self.reading = False
        if source is not None:
            self.set_peer(source)
        return buffered[length:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.closed = True
        self.proxy.connections.discard(self)
        # A forwarded request still runs to its end (so its upstream connection stays
        # reusable); its answer is dropped.

    def pause_writing(self) -> None:
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.next()

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.reading = True
        self.in_headers = True
        self.t0 = self.loop.time()
        self.url = b""
        self.headers = []
        self.header_bytes = self.head_bytes = self.body_size = self.hosts = self.chunks = self.verdict = 0
        self.length = -1
        self.body = self.xff = self.hop = self.host = self.te = self.encoding = self.expect = None
        self.ka = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.proxy.max_header:
            self.refuse(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Header bytes are checked once complete (431); meanwhile feed() bounds them by the raw
        # bytes read. Trailers count against the same limit, checked as they come.
        self.header_bytes += len(name) + len(value) + 4
        if not self.in_headers:  # a trailer field (RFC 9112 7.1.2): never a header, dropped
            if self.header_bytes > self.proxy.max_header:
                self.refuse(431)
            return
        lower = name.lower()
        if lower not in _SPECIAL:
            if b"_" not in name:  # nginx's underscores_in_headers off: X_Forwarded_For is dropped
                self.headers.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"host":
            self.hosts += 1
            self.host = value
        elif lower == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif lower == b"content-length":
            self.length = int(value.strip(b" \t"))  # digits: the parser checked them
            if self.length > self.proxy.max_body:
                self.refuse(413)
        elif lower == b"transfer-encoding":
            self.te = value if self.te is None else self.te + b", " + value
        elif lower == b"connection":
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"keep-alive":
                    self.ka = True
                elif token != b"close":
                    self.hop = (self.hop or set()) | {token}
        elif lower == b"expect":
            self.expect = value
        elif lower == b"content-encoding":
            self.encoding = value
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        self.in_headers = False
        if self.header_bytes > self.proxy.max_header:
            self.refuse(431)
        parser = self.parser
        # The parser takes 0.9, 1.0, 1.1 and 2.0 only, and keeps alive by default only 1.1:
        # that skips get_http_version() (which builds a string) for most requests.
        self.keep_alive = keep_alive = parser.should_keep_alive()
        if keep_alive and not self.ka:
            self.http10 = http10 = False
        else:
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                self.refuse(505)
            self.http10 = http10 = version == "1.0"
        if parser.should_upgrade():  # Upgrade, CONNECT
            self.refuse(501)
        if self.hosts != 1:
            if self.hosts or not http10:
                self.refuse(400)
        elif self.host not in self.proxy.valid_hosts:
            if not valid_host(self.host):
                self.refuse(400)
            self.proxy.remember_host(self.host)
        self.method = method = parser.get_method()
        if self.url[0] != 47 and not (self.url == b"*" and method == b"OPTIONS"):
            url = origin_form(self.url)
            if url is None:
                self.refuse(400)
            self.url = url
        if method == b"TRACE":
            self.refuse(405)
        if self.te is not None:
            if http10:
                self.refuse(400)
            if self.te.strip().lower() != b"chunked":
                self.refuse(501)
        if self.hop:  # Connection names further hop-by-hop headers: drop them
            drop = self.hop
            self.headers = [h for h in self.headers if h.partition(b":")[0].lower() not in drop]
        expect = self.expect
        if expect is not None and not http10 and expect.lower() != b"100-continue":
            self.refuse(417)
        status = self.proxy.screen(self.peer, self.peer_trusted, self.xff)
        if status:
            if self.te is not None or self.length > 0:  # never read the body of a refused request
                self.final(status)
                raise _Stop
            self.verdict = status  # answered in turn; the connection stays usable
            return
        if expect is not None and not http10:
            if self.busy or self.queue:
                self.continue_due = True  # after the answers still owed
            else:
                self.transport.write(_CONTINUE)

    def on_chunk_header(self) -> None:
        self.chunks += 1
        if self.chunks > MAX_CHUNKS:
            self.refuse(400)

    def on_body(self, body: bytes) -> None:
        proxy = self.proxy
        size = len(body)
        self.body_size += size
        proxy.buffered += size
        if self.body_size > proxy.max_body:
            self.refuse(413)
        if proxy.buffered > proxy.max_buffered:
            self.refuse(503)
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.reading = False
        self.continue_due = False
        body = self.body
        if body is not None:
            body = body[0] if len(body) == 1 else b"".join(body)
            self.release()
        elif self.te is not None or self.length == 0:
            body = b""
        request = (
            self.t0, self.method, self.url, self.headers, body, self.xff,
            self.keep_alive and not self.proxy.draining, self.ka, self.verdict, self.encoding,
        )
        if self.busy or self.queue:
            self.queue.append(request)
            self.transport.pause_reading()
            if len(self.queue) >= MAX_QUEUED:
                self.held = b""  # parse nothing more until the queue drains
        else:
            self.handle(request)

    # -- the request path -------------------------------------------------------------
    def handle(self, request: tuple) -> None:
        t0, method, url, headers, body, xff, keep, ka, verdict, encoding = request
        proxy = self.proxy
        self.keep = keep
        self.x_ka = ka
        self.busy = True
        if proxy.access_log:
            self.request_line = (method, url)
        status = verdict or (proxy.openrtb and proxy.screen_body(body, encoding))
        if status or proxy.in_flight >= proxy.max_in_flight:  # proxy.admit(), inlined
            self.answer(status or proxy.admit())
            return
        self.deadline = deadline = t0 + proxy.budget
        if self.loop.time() >= deadline:
            proxy.stats.timeout += 1
            self.answer(proxy.timeout_status)
            return
        self.is_head = method == b"HEAD"
        self.idempotent = method in IDEMPOTENT
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
        self.proxy.end(self, OK, now)
        proxy = self.proxy
        proxy.stats.forwarded += 1
        proxy.stats.latency.observe(now - self.t0)
        proxy.stats.upstream_latency.observe(now - self.sent)
        if proxy.draining:
            self.keep = False
        connection = (_KEEP_ALIVE if self.x_ka else b"") if self.keep else _CLOSE
        self.write(response_bytes(status, headers, body, connection))

    def upstream_error(self, failure: int) -> None:
        now = self.loop.time()
        proxy = self.proxy
        if proxy.resend(self, failure, now):
            return
        proxy.end(self, failure, now)
        proxy.stats.upstream_error += 1
        proxy.stats.latency.observe(now - self.t0)
        self.answer(proxy.error_status)

    def on_deadline(self) -> None:
        self.timer = None
        conn = self.upstream_conn
        if conn is not None:
            conn.abandon()
        now = self.loop.time()
        self.proxy.end(self, TIMEOUT, now)
        proxy = self.proxy
        proxy.stats.timeout += 1
        proxy.stats.latency.observe(now - self.t0)
        self.answer(proxy.timeout_status)

    # -- answers ------------------------------------------------------------------------
    def answer(self, status: int) -> None:
        """An empty-bodied answer to the request being served."""
        if self.proxy.draining:
            self.keep = False
        self.write(self.proxy.response(status)[(1 if self.x_ka else 0) if self.keep else 2])

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
        if self.queue or self.held is not None or self.write_paused or self.continue_due:
            self.next()
        elif not self.halted:
            self.transport.resume_reading()

    def next(self) -> None:
        """Serve queued requests in turn, then read again (unless the client does not read)."""
        if self.replaying:  # nested answers return to the loop below
            return
        self.replaying = True
        queue = self.queue
        while queue and not self.busy and not self.closed and not self.write_paused:
            item = queue.popleft()
            if type(item) is bytes:  # a final answer: then close
                self.transport.write(item)
                self.close()
            else:
                self.handle(item)
        self.replaying = False
        if self.busy or self.closed or self.write_paused or queue:
            return
        if self.continue_due and self.reading:
            self.continue_due = False
            self.transport.write(_CONTINUE)
        held = self.held
        if held is not None:
            self.held = None
            if held:
                self.data_received(held)
            if self.busy or self.closed or self.queue or self.held is not None:
                return
        if not self.halted:
            self.transport.resume_reading()

    def final(self, status: int) -> None:
        """Answer `status` and close, after the answers still owed; read nothing more."""
        self.halted = True
        self.release()
        self.reading = False
        data = self.proxy.response(status)[2]
        if self.busy or self.queue:
            self.transport.pause_reading()
            self.queue.append(data)
        elif not self.closed:
            self.transport.write(data)
            self.close()

    def fail(self, status: int) -> None:
        """Refuse the request being read (400, 408, 413, 431, ...): answer and close."""
        self.proxy.stats.rejected += 1
        self.final(status)

    def refuse(self, status: int) -> None:
        """From a parser callback: refuse the request and stop parsing the connection."""
        self.fail(status)
        raise _Stop

    def release(self) -> None:
        """Give back the worker's body budget held by the request being read."""
        if self.body_size:
            self.proxy.buffered -= self.body_size
            self.body_size = 0

    def log_access(self, response: bytes) -> None:
        method, url = self.request_line
        ACCESS.info("%s %s %s", method.decode("latin-1"), url.decode("latin-1"), response[9:12].decode(), extra={
            "peer": self.peer, "status": int(response[9:12]), "ms": round((self.last - self.t0) * 1000, 3)})

    def close(self) -> None:
        if not self.closed:
            self.release()
            self.closed = True
            self.reading = False
            self.transport.close()
            self.proxy.connections.discard(self)
