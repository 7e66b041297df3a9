"""The aiohttp engine: aiohttp's low-level server in front of the decision core.

What the product card asks for: an aiohttp reverse proxy. aiohttp frames the requests (its
C parser, keep-alive, pipelining in order, back-pressure on the message queue); one
catch-all handler on `aiohttp.web.Server` (the low-level server: no router, no middleware
chain, no Application) applies the same rules as the fast engine (wire.py), asks the same
decision core (decision.py) and forwards through the same pooled upstream client
(upstream.py), not `ClientSession`: that client is what makes a minimal aiohttp proxy cost
3-4x the CPU (bench/RESULTS.md).

Where it departs from aiohttp's own answer path, and why:
- Answers are written as bytes, as the fast engine writes them, through a tiny response
  object aiohttp drives like a `StreamResponse` (`prepare`, `write_eof`, `keep_alive`).
  The upstream's headers arrive as raw lines; parsing them into a multidict only for
  aiohttp to serialize them again would cost more than the rest of the handler, and would
  add `Date`, `Server` and `Content-Type` the bidder never sent.
- aiohttp's parse-error answers (400 with a text body) are replaced by the canned ones
  of the fast engine, so a refusal reads the same whichever engine is on.
- `auto_decompress` is off: the body is forwarded as received, Content-Encoding and all
  (OpenRTB mode decodes a copy to check it, fail-closed, as the fast engine does).
- A refused request with a body still to come is answered with `Connection: close` and
  the connection closed: aiohttp would otherwise linger reading the body to discard it.

Where it cannot match the fast engine byte for byte, it holds the same security rules:
- Trailer fields never act as headers: the decision is taken from the headers before the
  body is read; aiohttp's parser drops trailers (each line bounded by its line limit; they
  are not counted against the header limit, as nginx does not count them either).
- Ambiguous framing is refused by aiohttp's parser before the handler runs (400; the fast
  engine answers 501 for an unknown transfer coding that aiohttp already rejects as 400).
- Every bound holds: header bytes (431), body (413, chunk count 400), per-worker body
  budget (503), request time (408), body time (the timeout status), idle time,
  connections per worker, pipelined requests (aiohttp's queue) and unread answers
  (the handler waits for the client to drain its answers before taking the next).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as _ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from . import proxyproto
from .config import ServeConfig
from .decision import IDEMPOTENT, Core, Stats, View, peer_address
from .proxy import ACCESS
from .upstream import OK, TIMEOUT, Upstream, UpstreamConnection
from .wire import (
    CLOSE,
    CONTINUE,
    KEEP_ALIVE,
    MAX_CHUNKS,
    SPECIAL,
    Answers,
    origin_form,
    response_bytes,
    valid_host,
)

__all__ = ["AiohttpEngine"]

log = logging.getLogger(__name__)


class AiohttpEngine(Core):
    """Per-worker state of the aiohttp engine; same interface as proxy.Proxy."""

    def __init__(self, config: ServeConfig, view: View, stats: Stats | None = None) -> None:
        super().__init__(config, view, stats)
        self.access_log = config.access_log and ACCESS.isEnabledFor(logging.INFO)
        self.response = Answers()
        self.server = _Server(self)
        self._sweeper: asyncio.Task | None = None

    @property
    def connections(self) -> list[RequestHandler]:
        return self.server.connections

    # -- lifecycle --------------------------------------------------------------------
    async def serve(self, sock: socket.socket, ssl: _ssl.SSLContext | None = None) -> asyncio.AbstractServer:
        """Accept clients on a listening socket (TLS when `ssl` is given); starts the sweeper."""
        server = await self.listen(self.server, sock, ssl)
        self._sweeper = self.loop.create_task(self._sweep())
        return server

    async def drain(self, timeout_s: float) -> bool:
        """Stop keep-alive, let in-flight requests finish within `timeout_s`, close the rest.

        True when every connection ended in time. The caller closes the listening server first.
        """
        self.draining = True
        for conn in self.server.connections:
            if not conn._request_in_progress and not conn.since:  # idle: nothing owed, nothing begun
                conn.force_close()
        deadline = self.loop.time() + timeout_s
        while self.server.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        drained = not self.server.connections
        for conn in self.server.connections:
            conn.force_close()
        self.pool.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        return drained

    async def _sweep(self) -> None:
        """408 for a request not fully received in time (aiohttp has no such timer)."""
        request_s = self.config.request_timeout_s
        period = min(0.5, request_s / 4)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in self.server.connections:
                if conn.since and not conn._request_in_progress and now - conn.since > request_s:
                    self.stats.rejected += 1
                    conn.final(self.response(408)[2])

    # -- the request path -------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> _Answer:
        conn: _Connection = request.protocol  # type: ignore[assignment]
        t0 = conn.since or self.loop.time()
        conn.since = 0.0
        message = request._message
        headers: list[bytes] = []
        xff = host = te = expect = encoding = None
        hop: set[bytes] | None = None
        hosts = size = 0
        length = -1
        ka = False
        for name, value in message.raw_headers:
            size += len(name) + len(value) + 4
            lower = name.lower()
            if lower not in SPECIAL:
                if b"_" not in name:  # nginx's underscores_in_headers off: X_Forwarded_For is dropped
                    headers.append(b"%s: %s\r\n" % (name, value))
            elif lower == b"host":
                hosts += 1
                host = value
            elif lower == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lower == b"content-length":
                length = int(value.strip(b" \t"))  # digits: the parser checked them
            elif lower == b"transfer-encoding":
                te = value if te is None else te + b", " + value
            elif lower == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token == b"keep-alive":
                        ka = True
                    elif token != b"close":
                        hop = (hop or set()) | {token}
            elif lower == b"expect":
                expect = value
            elif lower == b"content-encoding":
                encoding = value
                headers.append(b"%s: %s\r\n" % (name, value))
        # The checks of the fast engine's on_headers_complete, in the same order.
        if size > self.max_header:
            return self.refuse(431)
        if length > self.max_body:
            return self.refuse(413)
        version = message.version
        if version[0] != 1 or version[1] > 1:
            return self.refuse(505)
        http10 = version[1] == 0
        method = message.method
        if message.upgrade or method == "CONNECT":
            return self.refuse(501)
        if hosts != 1:
            if hosts or not http10:
                return self.refuse(400)
        elif host not in self.valid_hosts:
            if not valid_host(host):
                return self.refuse(400)
            if len(self.valid_hosts) >= 1024:
                self.valid_hosts.clear()
            self.valid_hosts.add(host)
        url = message.path.encode("utf-8", "surrogateescape")
        if url[:1] != b"/" and not (url == b"*" and method == "OPTIONS"):
            url = origin_form(url)
            if url is None:
                return self.refuse(400)
        if method == "TRACE":
            return self.refuse(405)
        if te is not None:
            if http10:
                return self.refuse(400)
            if te.strip().lower() != b"chunked":
                return self.refuse(501)
        if hop:
            headers = [h for h in headers if h.partition(b":")[0].lower() not in hop]
        if expect is not None and not http10 and expect.lower() != b"100-continue":
            return self.refuse(417)
        keep = not message.should_close and not self.draining
        status = self.screen(conn.peer, conn.peer_trusted, xff)
        if status:
            if te is not None or length > 0:  # never read the body of a refused request
                return self.answer(request, status, False, ka)
            return self.answer(request, status, keep, ka)
        body = None
        if te is not None or length >= 0:
            if expect is not None and not http10 and conn.transport is not None:
                conn.transport.write(CONTINUE)
            # Content-Length: 0 has nothing to read, and aiohttp's stream for it is one object
            # shared by every request, whose end state a read would leave for the next one.
            body = b"" if length == 0 and te is None else await self.read_body(request, conn, t0, length)
            if type(body) is _Answer:
                return body
        status = status or (self.openrtb and self.screen_body(body, encoding))
        if status or self.in_flight >= self.max_in_flight:  # self.admit(), inlined
            return self.answer(request, status or self.admit(), keep, ka)
        deadline = t0 + self.budget
        if self.loop.time() >= deadline:
            self.stats.timeout += 1
            return self.answer(request, self.timeout_status, keep, ka)
        forwarded = conn.peer_b if xff is None else xff + b", " + conn.peer_b
        forward = _Forward(self, t0, deadline, method)
        forward.head = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), url, b"".join(headers))
        if body is None:
            forward.tail = b"X-Forwarded-For: %s\r\n\r\n" % forwarded
        else:
            forward.tail = b"X-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n%s" % (forwarded, len(body), body)
        status, head, payload = await forward.start()
        if payload is _ERROR:
            return self.answer(request, status, keep, ka)
        if self.draining:
            keep = False
        connection = (KEEP_ALIVE if ka else b"") if keep else CLOSE
        answer = _Answer(response_bytes(status, head, payload, connection), keep, status)
        if self.access_log:
            self.log_access(request, conn, status, t0)
        return answer

    async def read_body(self, request: web.BaseRequest, conn: _Connection, t0: float, length: int) -> Any:
        """The whole body, or the answer that ends the request: 413, 400 (too many chunks),
        503 (the worker's body budget is spent) or the timeout status (the budget is spent
        while the body still arrives: the rest is never read)."""
        content = request.content
        pieces: list[bytes] = []
        size = chunks = 0
        try:
            async with asyncio.timeout_at(t0 + self.budget):
                while True:
                    data, end_of_chunk = await content.readchunk()
                    if end_of_chunk:
                        chunks += 1
                        if chunks > MAX_CHUNKS:
                            return self.fail(400, size)
                    if not data:
                        if end_of_chunk:
                            continue
                        break
                    size += len(data)
                    self.buffered += len(data)
                    if size > self.max_body:
                        return self.fail(413, size)
                    if self.buffered > self.max_buffered:
                        return self.fail(503, size)
                    pieces.append(data)
        except TimeoutError:
            self.buffered -= size
            self.stats.timeout += 1
            return _Answer(self.response(self.timeout_status)[2], False, self.timeout_status)
        except (ConnectionError, HttpProcessingError):  # the client left, or its body is malformed
            self.buffered -= size
            return _Answer(b"", False, 400)  # aiohttp answers a malformed body itself, once
        except BaseException:
            self.buffered -= size
            raise
        self.buffered -= size
        if length >= 0 and size != length:  # the client went away mid-body
            return _Answer(b"", False, 400)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def fail(self, status: int, gathered: int) -> _Answer:
        self.buffered -= gathered
        return self.refuse(status)

    def refuse(self, status: int) -> _Answer:
        """Refuse the request (400, 413, 431, ...): answer and close."""
        self.stats.rejected += 1
        return _Answer(self.response(status)[2], False, status)

    def answer(self, request: web.BaseRequest, status: int, keep: bool, ka: bool) -> _Answer:
        """An empty-bodied answer; the connection stays open when `keep`."""
        if self.draining:
            keep = False
        if self.access_log:
            self.log_access(request, request.protocol, status, self.loop.time())
        return _Answer(self.response(status)[(1 if ka else 0) if keep else 2], keep, status)

    def log_access(self, request: web.BaseRequest, conn: _Connection, status: int, t0: float) -> None:
        ACCESS.info("%s %s %s", request.method, request.raw_path, status, extra={
            "peer": conn.peer, "status": status, "ms": round((self.loop.time() - t0) * 1000, 3)})


_ERROR = object()  # the payload of a forward that ended in an error or timeout status


class _Forward:
    """One forwarded request as the upstream client sees it (upstream.Exchange), resolved
    into a future the handler awaits: (status, headers, body) or (status, b"", _ERROR)."""

    __slots__ = (
        "engine", "future", "t0", "deadline", "head", "tail", "is_head", "idempotent", "seq", "timer",
        "upstream", "upstream_conn", "attempts", "sent",
    )

    def __init__(self, engine: AiohttpEngine, t0: float, deadline: float, method: str) -> None:
        self.engine = engine
        self.t0 = t0
        self.deadline = deadline
        self.is_head = method == "HEAD"
        self.idempotent = method.encode() in IDEMPOTENT
        self.seq = 0
        self.attempts = 1
        self.upstream: Upstream | None = None
        self.upstream_conn: UpstreamConnection | None = None

    def start(self) -> asyncio.Future:
        engine = self.engine
        loop = engine.loop
        self.future = loop.create_future()
        engine.in_flight += 1
        self.timer = loop.call_at(self.deadline, self.on_deadline)
        self.upstream = upstream = engine.pool.pick(self.t0)
        self.sent = self.t0
        engine.pool.send(upstream, self, self.t0)
        return self.future

    def upstream_response(self, status: int, headers: bytes, body: bytes | None) -> None:
        engine = self.engine
        now = engine.loop.time()
        engine.end(self, OK, now)
        engine.stats.forwarded += 1
        engine.stats.latency.observe(now - self.t0)
        engine.stats.upstream_latency.observe(now - self.sent)
        if not self.future.done():
            self.future.set_result((status, headers, body))

    def upstream_error(self, failure: int) -> None:
        engine = self.engine
        now = engine.loop.time()
        if engine.resend(self, failure, now):
            return
        engine.end(self, failure, now)
        engine.stats.upstream_error += 1
        engine.stats.latency.observe(now - self.t0)
        if not self.future.done():
            self.future.set_result((engine.error_status, b"", _ERROR))

    def on_deadline(self) -> None:
        self.timer = None
        conn = self.upstream_conn
        if conn is not None:
            conn.abandon()
        engine = self.engine
        now = engine.loop.time()
        engine.end(self, TIMEOUT, now)
        engine.stats.timeout += 1
        engine.stats.latency.observe(now - self.t0)
        if not self.future.done():
            self.future.set_result((engine.timeout_status, b"", _ERROR))


class _Answer:
    """A complete answer as bytes, driven by aiohttp like a StreamResponse.

    aiohttp calls `prepare` then `write_eof` and reads `keep_alive` to decide whether to
    read the next request. Writing waits while the client does not read its answers, so
    a pipelining client that never reads holds at most one transport buffer of answers."""

    __slots__ = ("data", "keep_alive", "status")

    def __init__(self, data: bytes, keep_alive: bool, status: int) -> None:
        self.data = data
        self.keep_alive = keep_alive
        self.status = status

    async def prepare(self, request: web.BaseRequest) -> None:
        conn = request.protocol
        transport = conn.transport
        if transport is None:
            return
        if self.data:
            transport.write(self.data)
        if not self.keep_alive:
            conn.force_close()  # closes once the answer is flushed; never lingers on a body
        elif conn.writing_paused:
            await conn._drain_helper()

    async def write_eof(self, data: bytes = b"") -> None:
        pass


class _Connection(RequestHandler):
    """aiohttp's connection handler plus what the gateway needs of a connection: the client
    address (PROXY protocol included), a bound on connections and the request timer."""

    __slots__ = ("engine", "peer", "peer_b", "peer_trusted", "preamble", "since")

    def __init__(self, manager: _Server, engine: AiohttpEngine, **kwargs: Any) -> None:
        super().__init__(manager, loop=engine.loop, **kwargs)
        self.engine = engine
        self.peer = ""
        self.peer_b = b""
        self.peer_trusted = False
        self.preamble: bytes | None = None  # PROXY protocol header being received
        self.since = 0.0  # when the request being received began; 0: none

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        engine = self.engine
        super().connection_made(transport)
        if len(engine.server._connections) > engine.max_connections:
            engine.stats.rejected += 1
            self.force_close()
            return
        peer = transport.get_extra_info("peername")
        self.set_peer(peer[0] if peer else "")
        if engine.proxy_protocol and self.peer_trusted:
            self.preamble = b""
            self.since = self._loop.time()  # the request timeout covers the PROXY header too

    def set_peer(self, address: str) -> None:
        self.peer = address = peer_address(address)
        self.peer_b = address.encode()
        self.peer_trusted = self.engine.trusted(address)

    def data_received(self, data: bytes) -> None:
        if self.preamble is not None:
            data = self.read_preamble(data)
            if not data:
                return
        if not self.since and not self._request_in_progress:
            self.since = now = self._loop.time()
            # The idle timer must not close a request being received: the sweeper's 408 does.
            self._next_keepalive_close_time = now + self.engine.config.request_timeout_s + 1.0
        super().data_received(data)

    def read_preamble(self, data: bytes) -> bytes | None:
        """Take the PROXY protocol header off the stream; the rest, if any, is HTTP."""
        buffered = self.preamble + data
        try:
            parsed = proxyproto.parse(buffered)
        except proxyproto.Invalid:
            self.preamble = None
            self.engine.stats.rejected += 1
            self.final(self.engine.response(400)[2])
            return None
        if parsed is None:
            self.preamble = buffered
            return None
        source, length = parsed
        self.preamble = None
        if source is not None:
            self.set_peer(source)
        return buffered[length:]

    def final(self, data: bytes) -> None:
        """Send a last answer outside a request (408, a bad PROXY header) and close."""
        if self.transport is not None:
            self.transport.write(data)
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> _Answer:
        """The fast engine's canned refusal instead of aiohttp's text page; 431/414 for lines
        past the limits (aiohttp says 400)."""
        if isinstance(exc, LineTooLong):  # the limit it names tells the target from a header line
            status = 414 if exc.args[1] == self.engine.config.max_header_bytes + 1 else 431
        elif status >= 500:
            log.error("request handling failed", exc_info=exc, extra={"peer": self.peer})
        self.engine.stats.rejected += 1
        return _Answer(self.engine.response(status)[2], False, status)


class _Server(web.Server):
    """aiohttp's low-level server making gateway connections, with the engine's limits."""

    def __init__(self, engine: AiohttpEngine) -> None:
        config = engine.config
        super().__init__(
            engine.handle,
            loop=engine.loop,
            access_log=None,
            keepalive_timeout=config.idle_timeout_s,
            max_line_size=config.max_header_bytes + 1,  # one more than a field: see handle_error
            max_field_size=config.max_header_bytes,
            lingering_time=0,
            auto_decompress=False,
        )
        self.engine = engine

    def __call__(self) -> _Connection:
        return _Connection(self, self.engine, **self._kwargs)
