"""HTTP conformance of the front door, byte for byte.

Each case is the exact bytes a client sends, the exact bytes the upstream must receive
(or that it receives nothing), and the exact answer the client must get. The upstream is
a recording raw-socket server on loopback; the gateway is each real engine in turn (fast,
aiohttp: one suite; where aiohttp cannot match a byte-level behaviour, the case carries
its outcome and the reason, and the security rules hold in both). Where
nginx is installed, the differential variant sends the same bytes through nginx
(`proxy_pass`, realip + geo for the blacklist) and checks the same outcome (statuses, and
whether the upstream was reached), except where a case documents why we differ.

The peer (127.0.0.1) is a trusted proxy; 192.0.2.0/24 is blacklisted; the body limit is
1000 bytes and the header limit 1024.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE
from helpers import eventually, free_port
from proxyrig import OK_REPLY, Recorder, listening, ranges, start_gateway

from gateway.broker import stop_pid
from gateway.http.proxy import MAX_QUEUED, SLICE

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def canned(status: int, reason: str, close: bool = True, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\n"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n").encode()


def up(head: str, body: bytes = b"") -> bytes:
    """A request as the gateway forwards it; {up} is the upstream's host:port."""
    return head.encode() + body


XFF = "X-Forwarded-For: 127.0.0.1\r\n"
GZIPPED = gzip.compress(b"ab", mtime=0)  # 22 bytes


@dataclass
class Case:
    name: str
    send: bytes
    upstream: list[bytes]  # exact requests the upstream receives; [] = nothing at all
    answer: bytes  # exact bytes the client gets
    closes: bool = False  # the gateway closes the connection after the answer
    reply: bytes = OK_REPLY  # what the upstream answers
    nginx: tuple[int, ...] | None = None  # nginx's statuses, where we differ on purpose
    nginx_reaches: bool | None = None  # whether nginx reaches the upstream, where we differ
    why: str = ""
    # The aiohttp engine's outcome where it cannot match the fast engine byte for byte:
    # overrides of upstream/answer/closes, with the reason in aiohttp_why (never a skip).
    aiohttp: dict | None = None
    aiohttp_why: str = ""

    def on(self, engine: str) -> Case:
        """The case as `engine` must pass it."""
        if engine == "aiohttp" and self.aiohttp:
            assert self.aiohttp_why, f"{self.name}: an engine difference needs its reason"
            return replace(self, **self.aiohttp)
        return self


CASES = [
    Case("plain GET", b"GET /a?b=1 HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET /a?b=1 HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK),
    # Item 1: a trailer never acts as a header, is never forwarded, and is bounded.
    Case("trailer XFF cannot unblock", b"POST / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 192.0.2.9\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
         [], canned(403, "Forbidden"), closes=True),
    Case("trailers are dropped", b"POST / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 198.51.100.1\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-Forwarded-For: 192.0.2.9\r\nX-Evil: 1\r\n\r\n",
         [up("POST / HTTP/1.1\r\nHost: {up}\r\nX-Forwarded-For: 198.51.100.1, 127.0.0.1\r\n"
             "Content-Length: 2\r\n\r\n", b"ab")], OK),
    Case("trailers count against the header limit", b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"1\r\na\r\n0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 90) for i in range(12)) + b"\r\n",
         [], canned(431, "Request Header Fields Too Large"), closes=True,
         nginx=(200,), nginx_reaches=True, why="nginx does not bound trailers by its header buffers",
         aiohttp={"upstream": [up("POST / HTTP/1.1\r\nHost: {up}\r\nX-Forwarded-For: 127.0.0.1\r\n"
                                  "Content-Length: 1\r\n\r\n", b"a")], "answer": OK, "closes": False},
         aiohttp_why="aiohttp's parser drops trailers, bounding them by its line and header-count limits "
                     "(test_a_trailer_flood_is_refused), not by the header byte limit; like nginx"),
    # Item 2: blocked, the body is never read (the answer comes before the body is sent).
    Case("blocked with a body unsent", b"POST / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 192.0.2.9\r\n"
         b"Content-Length: 900\r\n\r\n", [], canned(403, "Forbidden"), closes=True),
    Case("blocked without a body keeps the connection", b"GET / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 192.0.2.9\r\n\r\n"
         b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET /next HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], canned(403, "Forbidden", close=False) + OK,
         nginx=(403,), nginx_reaches=False, why="nginx closes after a 403 from `return` when pipelined"),
    Case("several X-Forwarded-For lines are one list", b"GET / HTTP/1.1\r\nHost: gw\r\n"
         b"X-Forwarded-For: 192.0.2.9\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n",
         [up("GET / HTTP/1.1\r\nHost: {up}\r\nX-Forwarded-For: 192.0.2.9, 198.51.100.1, 127.0.0.1\r\n\r\n")], OK),
    Case("several X-Forwarded-For lines, blocked rightmost", b"GET / HTTP/1.1\r\nHost: gw\r\n"
         b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 192.0.2.9\r\n\r\n", [],
         canned(403, "Forbidden", close=False)),
    # Item 5: absolute-form and Host.
    Case("absolute-form becomes origin-form", b"GET http://evil.example/admin?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET /admin?x=1 HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK),
    Case("absolute-form without a path", b"GET http://evil.example HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK),
    Case("absolute-form with userinfo", b"GET http://user:pw@evil.example/ HTTP/1.1\r\nHost: gw\r\n\r\n",
         [], canned(400, "Bad Request"), closes=True),
    Case("Host missing", b"GET / HTTP/1.1\r\n\r\n", [], canned(400, "Bad Request"), closes=True),
    Case("Host repeated", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [], canned(400, "Bad Request"), closes=True),
    Case("Host malformed", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", [], canned(400, "Bad Request"), closes=True),
    Case("Host empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", [], canned(400, "Bad Request"), closes=True),
    Case("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n", 1),
         closes=True),
    Case("origin-form must start with a slash", b"GET foo HTTP/1.1\r\nHost: gw\r\n\r\n", [],
         canned(400, "Bad Request"), closes=True),
    Case("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"OPTIONS * HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK,
         nginx=(400,), nginx_reaches=False, why="nginx refuses asterisk-form; RFC 9112 3.2.4 allows it for OPTIONS"),
    # Item 7.
    Case("bad follow-up keeps the answer in flight", b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\nGARBAGE\r\n\r\n",
         [up(f"GET /a HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK + canned(400, "Bad Request"), closes=True,
         aiohttp={"upstream": [], "answer": canned(400, "Bad Request")},
         aiohttp_why="aiohttp's parser fails the whole read that holds a bad request, so a good request "
                     "pipelined in the same read is refused too: stricter, nothing unchecked is forwarded"),
    Case("HTTP/1.0 keep-alive is said", b"GET / HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")],
         OK.replace(b"OK\r\n", b"OK\r\nConnection: keep-alive\r\n", 1)),
    Case("no 100 Continue to HTTP/1.0", b"POST / HTTP/1.0\r\nHost: gw\r\nExpect: 100-continue\r\n"
         b"Content-Length: 2\r\n\r\nab",
         [up(f"POST / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}Content-Length: 2\r\n\r\n", b"ab")],
         OK.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n", 1), closes=True),
    Case("HTTP/1.0 with chunked", b"POST / HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
         [], canned(400, "Bad Request"), closes=True),
    Case("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n", [],
         canned(505, "HTTP Version Not Supported"), closes=True),
    Case("Transfer-Encoding identity, chunked", b"POST / HTTP/1.1\r\nHost: gw\r\n"
         b"Transfer-Encoding: identity, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", [],
         canned(501, "Not Implemented"), closes=True),
    Case("TRACE", b"TRACE / HTTP/1.1\r\nHost: gw\r\n\r\n", [], canned(405, "Method Not Allowed"), closes=True),
    Case("underscore header names are dropped", b"GET / HTTP/1.1\r\nHost: gw\r\nX_Forwarded_For: 192.0.2.9\r\n"
         b"X-Ok: 1\r\n\r\n", [up(f"GET / HTTP/1.1\r\nX-Ok: 1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK),
    Case("Content-Length with a trailing space, too large", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000 \r\n\r\n",
         [], canned(413, "Request Entity Too Large"), closes=True),
    Case("POST with Content-Length: 0", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
         [up(f"POST / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}Content-Length: 0\r\n\r\n")], OK),
    Case("an encoded body is forwarded as received", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Encoding: gzip\r\n"
         b"Content-Length: 22\r\n\r\n" + GZIPPED,
         [up(f"POST / HTTP/1.1\r\nContent-Encoding: gzip\r\nHost: {{up}}\r\n{XFF}Content-Length: 22\r\n\r\n",
             GZIPPED)], OK),
    Case("Connection names hop-by-hop headers", b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
         b"Keep-Alive: 5\r\nTE: trailers\r\nX-Ok: 2\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nX-Ok: 2\r\nHost: {{up}}\r\n{XFF}\r\n")], OK),
    # Smuggling: every framing ambiguity is refused; nothing reaches the upstream.
    Case("Content-Length and Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [], canned(400, "Bad Request"), closes=True),
    Case("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
         [], canned(400, "Bad Request"), closes=True),
    Case("space before the colon", b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
         [], canned(400, "Bad Request"), closes=True),
    Case("obsolete line folding", b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n b\r\n\r\n", [],
         canned(400, "Bad Request"), closes=True),
    Case("Transfer-Encoding: xchunked", b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
         [], canned(501, "Not Implemented"), closes=True,
         aiohttp={"answer": canned(400, "Bad Request")},
         aiohttp_why="aiohttp's parser refuses an unknown transfer coding itself, as a bad request"),
    Case("Upgrade", b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", [],
         canned(501, "Not Implemented"), closes=True,
         nginx=(200,), nginx_reaches=True, why="nginx passes Upgrade only when configured; it forwards without it"),
    Case("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", [],
         canned(501, "Not Implemented"), closes=True, nginx=(400,), why="nginx: 400 for CONNECT"),
    # Item 8: upstream trailers never become response headers.
    Case("upstream trailers are dropped", b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], OK,
         reply=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nSet-Cookie: a=b\r\n\r\n",
         nginx=(200,)),
    Case("upstream header too large", b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
         [up(f"GET / HTTP/1.1\r\nHost: {{up}}\r\n{XFF}\r\n")], canned(502, "Bad Gateway", close=False),
         reply=b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 20000 + b"\r\nContent-Length: 2\r\n\r\nok"),
]


async def send(port: int, data: bytes, want: int, closes: bool, ssl=None) -> tuple[bytes, bool]:
    """Send `data` (over TLS with `ssl`, a client SSLContext); read `want` bytes (or to EOF);
    then whether the peer closed."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ssl), 5)
    try:
        writer.write(data)
        received = b""
        while len(received) < want:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                return received, True
            received += chunk
        if closes:
            rest = await asyncio.wait_for(reader.read(65536), 5)
            return received + rest, rest == b""
        return received, False
    finally:
        writer.close()


async def send_for(port: int, data: bytes, count: int) -> bytes:
    """Send `data`; read until `count` final responses are complete, or EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        received = b""
        while len(statuses(received)) < count:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()


@pytest.fixture
async def recorder():
    rec = Recorder()
    port = await rec.start()
    rec.port = port
    yield rec
    rec.close()


@pytest.fixture
async def front(recorder, engine):
    server, proxy, port = await start_gateway(
        [f"http://127.0.0.1:{recorder.port}"], ranges(("192.0.2.0", "192.0.2.255")), engine=engine,
        trusted_proxies=("127.0.0.1/32",), max_body_bytes=1000, max_header_bytes=1024)
    yield port, proxy
    server.close()
    await proxy.drain(0.1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case(case: Case, front, recorder, engine) -> None:
    port, proxy = front
    case = case.on(engine)
    recorder.reply = case.reply
    answer, closed = await send(port, case.send, len(case.answer), case.closes)
    assert answer == case.answer
    assert closed == case.closes
    hostport = f"127.0.0.1:{recorder.port}".encode()
    assert recorder.requests == [r.replace(b"{up}", hostport) for r in case.upstream]
    assert proxy.buffered == 0  # every body byte counted against the worker is given back


# -- cases with steps -------------------------------------------------------------------------

async def test_every_empty_post_is_forwarded_like_the_first(front, recorder):
    """A POST with Content-Length: 0, three times in one worker, forwards three times.

    aiohttp hands every bodiless request one shared empty stream whose end-of-chunk state
    outlives the request: read again, it reports endless empty chunks (the second such POST
    got 400 for too many chunks)."""
    port, _ = front
    for _ in range(3):
        answer, _ = await send(port, b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n", len(OK), False)
        assert answer == OK
    assert len(recorder.requests) == 3


async def test_a_trailer_flood_is_refused(front, recorder):
    """Trailers are bounded in both engines (fast: the header byte limit; aiohttp: its count of
    header fields): a flood of them is refused and nothing reaches the upstream."""
    port, proxy = front
    flood = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 40) for i in range(300))
    data = b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + flood + b"\r\n"
    answer, closed = await send(port, data, 1 << 16, closes=False)
    assert statuses(answer) in ((431,), (400,)) and closed
    assert not recorder.requests and proxy.buffered == 0


async def test_blocked_body_is_never_read(front, recorder):
    """The answer comes while the body is unsent; what the client sends next is never parsed."""
    port, proxy = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 192.0.2.9\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 900\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == canned(403, "Forbidden")  # no 100, then EOF
    writer.close()
    assert not recorder.requests and proxy.stats.blocked == 1 and proxy.buffered == 0


async def test_100_continue_comes_after_the_answer_in_flight(front, recorder):
    port, _ = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: gw\r\n\r\n"
                 b"POST /second HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    expected = OK + b"HTTP/1.1 100 Continue\r\n\r\n"
    received = b""
    while len(received) < len(expected):
        received += await asyncio.wait_for(reader.read(65536), 5)
    assert received == expected
    writer.write(b"ab")
    assert await asyncio.wait_for(reader.readexactly(len(OK)), 5) == OK
    writer.close()
    assert [r.split(b" ")[1] for r in recorder.requests] == [b"/first", b"/second"]


async def test_non_reading_pipeliner_is_held_to_a_bounded_queue(front, recorder, engine):
    """3,000 pipelined GETs, answers never read: the worker parses only what it can answer.

    The queue holds at most MAX_QUEUED requests plus those of the slice in hand (the
    shortest request is 18 bytes); the rest waits in the kernel, not in the worker."""
    port, proxy = front
    answer = b"x" * 4096
    recorder.reply = b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + answer
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.transport.set_write_buffer_limits(high=1 << 22)
    writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n" * 3000)
    [conn] = await eventually(lambda: list(proxy.connections), what="the connection")

    def stuck() -> bool:  # the client's receive window is full: the gateway stopped writing
        return conn.write_paused if engine == "fast" else conn.writing_paused

    await eventually(stuck, what="the gateway to stop writing to a client that does not read")
    if engine == "fast":
        assert len(conn.queue) <= MAX_QUEUED + SLICE // 18 and len(conn.held or b"") < (1 << 20)
    else:  # aiohttp's queue of parsed requests; it stops reading when full
        assert len(conn._messages) <= MAX_MSG_QUEUE_SIZE + SLICE // 18
    assert conn.transport.get_write_buffer_size() < (1 << 20)
    assert len(recorder.requests) < 3000
    # Reading the answers lets it go on to the end; requests that waited past the budget
    # in the queue get the timeout status (204) without an upstream call.
    answers: list[int] = []
    rest = b""
    while len(answers) < 3000:
        found, rest = take_statuses(rest + await asyncio.wait_for(reader.read(1 << 20), 5))
        answers += found
    writer.close()
    assert len(answers) == 3000 and set(answers) <= {200, 204}
    assert answers.count(200) <= len(recorder.requests) <= 3000


# -- the same cases through nginx -------------------------------------------------------------

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 1000;
    large_client_header_buffers 4 1k;
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Forwarded-For;
    real_ip_recursive on;
    geo $blocked {{ default 0; 192.0.2.0/24 1; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($blocked) {{ return 403; }}
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def statuses(data: bytes) -> tuple[int, ...]:
    """Status codes of the final responses in `data` (bodies skipped by Content-Length)."""
    return tuple(take_statuses(data)[0])


def take_statuses(data: bytes) -> tuple[list[int], bytes]:
    """The statuses of the complete final responses at the start of `data`, and the rest
    (so a reader of many answers parses each byte once)."""
    found = []
    at = 0
    while data.startswith(b"HTTP/1.", at) and (end := data.find(b"\r\n\r\n", at)) > 0:
        head = data[at:end]
        status = int(head.split(b" ")[1])
        match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        total = end + 4 + (int(match.group(1)) if match else 0)
        if len(data) < total:
            break
        at = total
        if status != 100:
            found.append(status)
    return found, data[at:]


@pytest.fixture
async def nginx(recorder, tmp_path: Path):
    if not shutil.which("nginx"):
        pytest.skip("nginx not installed (Debian package nginx)")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, port=port, upstream=recorder.port))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)

    try:
        await eventually(lambda: listening(port), timeout=10, what="nginx to listen")
        yield port
    finally:
        stop_pid(proc, timeout=5)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case_against_nginx(case: Case, nginx, recorder, engine) -> None:
    """Same bytes through nginx: the engine's statuses and upstream reached or not (what
    test_case holds it to), unless the case documents why that engine differs."""
    recorder.reply = case.reply
    ours = case.on(engine)
    expected = case.nginx or statuses(case.answer)
    answer = await send_for(nginx, case.send, len(expected))
    assert statuses(answer) == expected, case.why or answer[:200]
    reaches = case.nginx_reaches if case.nginx_reaches is not None else bool(case.upstream)
    assert bool(recorder.requests) == reaches, case.why
    if (statuses(ours.answer), bool(ours.upstream)) != (statuses(answer), bool(recorder.requests)):
        assert case.why or ours is not case, f"{engine} differs from nginx without a reason"
