"""The request path over real loopback sockets: blocking, forwarding, budget and limits.

The proxy runs in-process with an Index built directly (no Kafka); upstreams are real
aiohttp or raw asyncio servers; clients are raw sockets so bytes can be compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from aiohttp import web
from helpers import free_port

from gateway.blacklist.addresses import parse_address
from gateway.blacklist.index import Index
from gateway.http.config import ServeConfig
from gateway.http.proxy import Proxy
from gateway.kafka.config import KafkaConfig


def ranges(*cidr_pairs: tuple[str, str]) -> Index:
    out = []
    for first, last in cidr_pairs:
        version, start = parse_address(first)
        out.append((version, start, parse_address(last)[1]))
    return Index.build(sorted(out))


@dataclass
class Bidder:
    """A real aiohttp upstream that records what it received."""

    port: int
    seen: list = field(default_factory=list)
    peers: set = field(default_factory=set)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_bidder(handler=None, port: int = 0) -> Bidder:
    bidder = Bidder(port=0)

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        bidder.seen.append(SimpleNamespace(
            method=request.method, path=request.path_qs, raw_headers=request.raw_headers, body=body))
        bidder.peers.add(request.transport.get_extra_info("peername")[1])
        if handler is not None:
            return await handler(request, body)
        return web.Response(body=b"bid:" + body, headers={"X-Bidder": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    bidder.runner = runner
    bidder.port = site._server.sockets[0].getsockname()[1]
    return bidder



@pytest.fixture
async def bidder():
    b = await start_bidder()
    yield b
    await b.runner.cleanup()


@pytest.fixture
async def hanging():
    """URL of an upstream that accepts and reads requests but never answers."""
    writers = []

    async def hang(reader, writer):
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    for writer in writers:
        writer.transport.abort()


@pytest.fixture
async def gateway():
    """Factory: start a Proxy on a loopback socket; returns (host, port, proxy)."""
    started = []

    async def start(upstreams, index=None, ready=True, host="127.0.0.1", **settings):
        config = ServeConfig(kafka=KafkaConfig("unused:9092"), upstreams=tuple(upstreams), **settings)
        view = SimpleNamespace(index=index or Index.build([]), ready=ready)
        proxy = Proxy(config, view)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, 0))
        sock.listen()
        server = await proxy.serve(sock)
        started.append((server, proxy))
        return host, sock.getsockname()[1], proxy

    yield start
    for server, proxy in started:
        server.close()
        await proxy.drain(0.1)


async def exchange(host, port, data: bytes, local=None, responses=1, timeout=5.0) -> list[tuple[int, dict, bytes, bytes]]:
    """Send raw bytes; read `responses` responses: (status, lower-cased headers, body, raw head)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0) if local else None)
    try:
        writer.write(data)
        return [await asyncio.wait_for(read_response(reader), timeout) for _ in range(responses)]
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return await read_response(reader)
    length = int(headers.get("content-length", 0))
    body = await reader.readexactly(length)
    return status, headers, body, head


def get(path="/", headers="", body=b"", method=b"GET") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method.decode()} {path} HTTP/1.1\r\nHost: gw\r\n{headers}{length}\r\n".encode() + body


# -- blocking ----------------------------------------------------------------------------

async def test_blocked_peer_gets_reject_status_and_upstream_is_not_called(gateway, bidder):
    host, port, proxy = await gateway([bidder.url], ranges(("127.0.0.2", "127.0.0.2")))
    [(status, _, body, _)] = await exchange(host, port, get(body=b"secret"), local="127.0.0.2")
    assert (status, body) == (403, b"")
    [(status, _, body, _)] = await exchange(host, port, get(body=b"hello"), local="127.0.0.1")
    assert (status, body) == (200, b"bid:hello")
    assert [s.body for s in bidder.seen] == [b"hello"]
    assert (proxy.stats.blocked, proxy.stats.forwarded) == (1, 1)


async def test_ipv6_peer_blocked_and_allowed(gateway, bidder):
    host, port, _ = await gateway([bidder.url], ranges(("::1", "::1")), host="::1")
    [(status, *_)] = await exchange(host, port, get())
    assert status == 403
    host, port, _ = await gateway([bidder.url], ranges(("::2", "::ffff")), host="::1")
    [(status, *_)] = await exchange(host, port, get())
    assert status == 200


async def test_ipv4_mapped_peer_on_dual_stack_listener_is_looked_up_as_ipv4(gateway, bidder):
    host, port, _ = await gateway([bidder.url], ranges(("127.0.0.3", "127.0.0.3")), host="::")
    [(status, *_)] = await exchange("127.0.0.1", port, get(), local="127.0.0.3")
    assert status == 403
    [(status, *_)] = await exchange("127.0.0.1", port, get(), local="127.0.0.1")
    assert status == 200


async def test_xff_counts_only_from_trusted_proxies(gateway, bidder):
    index = ranges(("127.0.0.4", "127.0.0.4"), ("192.0.2.0", "192.0.2.255"))
    host, port, _ = await gateway([bidder.url], index, trusted_proxies=("127.0.0.1/32",))
    blocked_client = get(headers="X-Forwarded-For: 192.0.2.5\r\n")
    # From the trusted proxy: the forwarded client is judged.
    assert (await exchange(host, port, blocked_client, local="127.0.0.1"))[0][0] == 403
    # The client spoofed a blocked address left of its real one: not blocked.
    spoof = get(headers="X-Forwarded-For: 192.0.2.5, 198.51.100.1\r\n")
    assert (await exchange(host, port, spoof, local="127.0.0.1"))[0][0] == 200
    # From an untrusted peer, XFF neither blocks an allowed peer nor unblocks a blocked one.
    assert (await exchange(host, port, blocked_client, local="127.0.0.2"))[0][0] == 200
    unblock = get(headers="X-Forwarded-For: 198.51.100.1\r\n")
    assert (await exchange(host, port, unblock, local="127.0.0.4"))[0][0] == 403


async def test_openrtb_device_ip_blocked_gets_no_bid(gateway, bidder):
    index = ranges(("192.0.2.0", "192.0.2.255"), ("2001:db8::", "2001:db8::ffff"), ("127.0.0.5", "127.0.0.5"))
    host, port, _ = await gateway([bidder.url], index, openrtb=True)
    for device in ({"ip": "192.0.2.7"}, {"ipv6": "2001:db8::7"}):
        body = json.dumps({"id": "1", "device": device}).encode()
        [(status, _, payload, _)] = await exchange(host, port, get("/bid", body=body, method=b"POST"))
        assert (status, payload) == (204, b"")
    allowed = json.dumps({"id": "2", "device": {"ip": "198.51.100.1"}}).encode()
    assert (await exchange(host, port, get("/bid", body=allowed, method=b"POST")))[0][0] == 200
    assert (await exchange(host, port, get("/bid", body=allowed, method=b"POST"), local="127.0.0.5"))[0][0] == 204
    assert [s.body for s in bidder.seen] == [allowed]


# -- forwarding ------------------------------------------------------------------------------

async def test_request_round_trips_byte_for_byte_without_hop_by_hop_headers(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    body = bytes(range(256)) * 40
    request = (
        b"PUT /path/x%20y?q=1&q=2&e=%C3%A9 HTTP/1.1\r\nHost: client.example\r\n"
        b"X-MiXeD-Case: a  b\r\nConnection: keep-alive, X-Hop\r\nX-Hop: gone\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Forwarded-For: 198.51.100.7\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    ) + body
    [(status, _, payload, _)] = await exchange(host, port, request)
    assert (status, payload) == (200, b"bid:" + body)
    [seen] = bidder.seen
    assert (seen.method, seen.path, seen.body) == ("PUT", "/path/x%20y?q=1&q=2&e=%C3%A9", body)
    headers = list(seen.raw_headers)
    assert (b"X-MiXeD-Case", b"a  b") in headers
    assert (b"Content-Type", b"application/octet-stream") in headers
    assert (b"Host", f"127.0.0.1:{bidder.port}".encode()) in headers
    assert (b"X-Forwarded-For", b"198.51.100.7, 127.0.0.1") in headers
    names = {name.lower() for name, _ in headers}
    assert not names & {b"x-hop", b"keep-alive", b"te", b"proxy-authorization", b"connection"}


async def test_chunked_request_body_is_forwarded_whole(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    request = (b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [(status, _, payload, _)] = await exchange(host, port, request)
    assert (status, payload) == (200, b"bid:hello world")
    assert (b"Content-Length", b"11") in list(bidder.seen[0].raw_headers)


async def test_response_headers_and_chunked_body_round_trip(gateway):
    chunks = [b"{\"seatbid\":", b"[" * 3, bytes(range(1, 200)), b"]" * 3 + b"}"]

    async def chunked(request, body):
        response = web.StreamResponse(headers={"X-Odd-Case": "Va  lue", "Keep-Alive": "timeout=9"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    upstream = await start_bidder(chunked)
    try:
        host, port, _ = await gateway([upstream.url])
        [(status, headers, payload, head)] = await exchange(host, port, get())
        assert (status, payload) == (200, b"".join(chunks))
        assert b"\r\nX-Odd-Case: Va  lue\r\n" in head
        assert headers["content-length"] == str(len(payload))
        assert "transfer-encoding" not in headers and "keep-alive" not in headers
    finally:
        await upstream.runner.cleanup()


async def test_keep_alive_connections_are_reused(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    results = await exchange(host, port, get() * 5, responses=5)
    results += await exchange(host, port, get() * 5, responses=5)
    assert [r[0] for r in results] == [200] * 10
    assert len(bidder.peers) == 1


async def test_pipelined_requests_are_answered_in_order(gateway, bidder):
    host, port, _ = await gateway([bidder.url], ranges(("127.0.0.2", "127.0.0.2")))
    batch = b"".join(get(f"/{i}", body=str(i).encode(), method=b"POST") for i in range(4))
    results = await exchange(host, port, batch, responses=4)
    assert [r[2] for r in results] == [b"bid:0", b"bid:1", b"bid:2", b"bid:3"]


async def test_expect_100_continue_is_answered(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    status, _, body, _ = await asyncio.wait_for(read_response(reader), 2)
    writer.close()
    assert (status, body) == (200, b"bid:ok")


async def test_head_request_keeps_upstream_length_without_body(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + get())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 4\r\n" in head
    status, _, body, _ = await asyncio.wait_for(read_response(reader), 2)  # same connection still in sync
    writer.close()
    assert (status, body) == (200, b"bid:")


# -- budget and upstream failures ------------------------------------------------------------

async def timed(host, port, data):
    start = time.perf_counter()
    [(status, _, body, _)] = await exchange(host, port, data)
    return status, body, time.perf_counter() - start


@pytest.mark.parametrize("timeout_status", [204, 504])
async def test_hanging_upstream_answers_timeout_status_within_budget(gateway, hanging, timeout_status):
    host, port, proxy = await gateway([hanging], budget_ms=50, timeout_status=timeout_status)
    results = [await timed(host, port, get()) for _ in range(3)]
    assert {(status, body) for status, body, _ in results} == {(timeout_status, b"")}
    elapsed = sorted(seconds for *_, seconds in results)
    # Never before the budget; within budget + 5 ms (best of 3: one sample can lose the CPU).
    assert elapsed[0] >= 0.050 and elapsed[0] < 0.055 and elapsed[-1] < 0.1, elapsed
    assert proxy.stats.timeout == 3


async def test_down_upstream_answers_error_status_at_once(gateway):
    host, port, _ = await gateway([f"http://127.0.0.1:{free_port()}"])
    status, _, elapsed = await timed(host, port, get())
    assert status == 502 and elapsed < 0.02
    host, port, _ = await gateway([f"http://127.0.0.1:{free_port()}"], openrtb=True)
    status, _, elapsed = await timed(host, port, get())
    assert status == 204 and elapsed < 0.02


async def test_upstream_breaking_mid_response_is_an_upstream_error(gateway):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        host, port, proxy = await gateway([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"])
        [(status, *_)] = await exchange(host, port, get())
        assert status == 502 and proxy.stats.upstream_error == 1
    finally:
        server.close()


async def test_stale_keep_alive_connection_is_retried_on_a_fresh_one(gateway):
    """An upstream that closes a kept-alive connection when the next request arrives."""
    async def one_per_connection(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(one_per_connection, "127.0.0.1", 0)
    try:
        host, port, _ = await gateway([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"])
        results = await exchange(host, port, get() * 3, responses=3)
        assert [(r[0], r[2]) for r in results] == [(200, b"ok")] * 3
    finally:
        server.close()


async def test_two_upstreams_one_down_all_requests_succeed(gateway, bidder):
    host, port, _ = await gateway([f"http://127.0.0.1:{free_port()}", bidder.url])
    results = await asyncio.gather(*(exchange(host, port, get()) for _ in range(20)))
    assert [r[0][0] for r in results] == [200] * 20


async def test_least_in_flight_spreads_and_an_ejected_upstream_returns(gateway):
    slow_port = free_port()
    fast = await start_bidder()
    host, port, proxy = await gateway([f"http://127.0.0.1:{slow_port}", fast.url])
    proxy.pool.eject_s = 0.2
    for _ in range(3):  # the down one gets picked, fails to connect, is ejected; retried on the other
        assert (await exchange(host, port, get()))[0][0] == 200
    assert proxy.pool.upstreams[0].ejected_until > 0
    back = await start_bidder(port=slow_port)
    try:
        await asyncio.sleep(0.25)
        results = await asyncio.gather(*(exchange(host, port, get()) for _ in range(20)))
        assert [r[0][0] for r in results] == [200] * 20
        assert back.seen and fast.seen  # both take traffic again
    finally:
        await back.runner.cleanup()
        await fast.runner.cleanup()


# -- limits and readiness ------------------------------------------------------------------

async def test_body_too_large_gets_413(gateway, bidder):
    host, port, _ = await gateway([bidder.url], max_body_bytes=1000)
    [(status, *_)] = await exchange(host, port, get(body=b"x" * 1001, method=b"POST"))
    assert status == 413
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    [(status, *_)] = await exchange(host, port, chunked)
    assert status == 413
    assert (await exchange(host, port, get(body=b"x" * 1000, method=b"POST")))[0][0] == 200
    assert len(bidder.seen) == 1


async def test_headers_too_large_get_431(gateway, bidder):
    host, port, _ = await gateway([bidder.url], max_header_bytes=4096)
    [(status, *_)] = await exchange(host, port, get(headers=f"X-Big: {'a' * 5000}\r\n"))
    assert status == 431
    [(status, *_)] = await exchange(host, port, get(headers="".join(f"X-{i}: {'b' * 60}\r\n" for i in range(80))))
    assert status == 431
    assert not bidder.seen


async def test_requests_beyond_max_in_flight_are_shed_at_once(gateway, hanging):
    host, port, proxy = await gateway([hanging], budget_ms=300, max_in_flight=2)
    waiting = [asyncio.create_task(timed(host, port, get())) for _ in range(2)]
    while proxy.in_flight < 2:
        await asyncio.sleep(0.001)
    status, _, elapsed = await timed(host, port, get())
    assert status == 503 and elapsed < 0.05  # at once, not after the 300 ms budget
    assert [(await w)[0] for w in waiting] == [204, 204]
    assert proxy.stats.shed == 1


async def test_not_ready_answers_503_with_retry_after(gateway, bidder):
    ready = asyncio.Event()
    host, port, proxy = await gateway([bidder.url], ready=ready)
    [(status, headers, *_)] = await exchange(host, port, get())
    assert status == 503 and headers["retry-after"] == "1"
    ready.set()
    assert (await exchange(host, port, get()))[0][0] == 200
    assert proxy.stats.not_ready == 1


async def test_idle_and_slow_clients_are_let_go(gateway, bidder):
    host, port, _ = await gateway([bidder.url], idle_timeout_s=0.2, request_timeout_s=0.2)
    reader, writer = await asyncio.open_connection(host, port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed without a word
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    data = await asyncio.wait_for(reader.read(), 2)
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_malformed_and_upgrade_requests_are_refused(gateway, bidder):
    host, port, _ = await gateway([bidder.url])
    assert (await exchange(host, port, b"GARBAGE\r\n\r\n"))[0][0] == 400
    upgrade = get(headers="Connection: Upgrade\r\nUpgrade: websocket\r\n")
    assert (await exchange(host, port, upgrade))[0][0] == 501
    assert not bidder.seen


async def test_access_log_when_switched_on(gateway, bidder, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    host, port, _ = await gateway([bidder.url], ranges(("127.0.0.2", "127.0.0.2")), access_log=True)
    await exchange(host, port, get("/a?b=1"), local="127.0.0.2")
    await exchange(host, port, get("/c"), local="127.0.0.1")
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert [(r.getMessage(), r.peer, r.status) for r in records] == [
        ("GET /a?b=1 403", "127.0.0.2", 403), ("GET /c 200", "127.0.0.1", 200)]
