"""The request path over real loopback sockets: blocking, forwarding, budget and limits.

The proxy runs in-process with an Index built directly (no Kafka); upstreams are real
aiohttp or raw asyncio servers; clients are raw sockets so bytes can be compared.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web
from helpers import eventually, free_port
from proxyrig import exchange, get, ranges, read_response, start_bidder

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

@pytest.mark.parametrize("timeout_status", [204, 504])
async def test_hanging_upstream_answers_timeout_status_and_abandons_it(gateway, hanging, timeout_status):
    """Outcomes only: the figures (budget + 5 ms) are measured in bench/, never asserted here."""
    host, port, proxy = await gateway([hanging.url], budget_ms=50, timeout_status=timeout_status)
    results = [await exchange(host, port, get()) for _ in range(3)]
    assert [(status, body) for [(status, _, body, _)] in results] == [(timeout_status, b"")] * 3
    assert proxy.stats.timeout == 3 and proxy.in_flight == 0
    await eventually(lambda: hanging.abandoned == 3, what="the gateway to close the hung upstream connections")


async def test_down_upstream_answers_error_status_without_waiting_for_the_budget(gateway):
    # A 10 s budget: an answer within exchange()'s 5 s shows the failure was not waited out.
    host, port, proxy = await gateway([f"http://127.0.0.1:{free_port()}"], budget_ms=10_000)
    assert (await exchange(host, port, get()))[0][0] == 502
    assert proxy.stats.upstream_error == 1 and proxy.pool.upstreams[0].ejected_until > 0
    host, port, _ = await gateway([f"http://127.0.0.1:{free_port()}"], openrtb=True, budget_ms=10_000)
    assert (await exchange(host, port, get()))[0][0] == 204


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
    host, port, proxy = await gateway([hanging.url], budget_ms=10_000, max_in_flight=2)
    waiting = [asyncio.create_task(exchange(host, port, get())) for _ in range(2)]
    await eventually(lambda: proxy.in_flight == 2, what="two requests in flight")
    assert (await exchange(host, port, get()))[0][0] == 503
    assert not any(w.done() for w in waiting)  # shed while the others still wait their 10 s budget
    assert proxy.stats.shed == 1
    for w in waiting:
        w.cancel()


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


# -- hardening (issue 11) --------------------------------------------------------------------

async def test_least_in_flight_sends_nothing_to_a_busy_upstream(gateway, hanging, bidder):
    """With one request hung on upstream A, every later one goes to B (round-robin would send half to A)."""
    host, port, proxy = await gateway([hanging.url, bidder.url], budget_ms=10_000)
    pending = []
    while hanging.received == 0:  # until one request sits on the hung upstream
        task = asyncio.create_task(exchange(host, port, get()))
        pending.append(task)
        await eventually(lambda: task.done() or hanging.received, what="a request answered by B or hung on A")
    results = [await exchange(host, port, get()) for _ in range(10)]
    assert [status for [(status, *_)] in results] == [200] * 10
    assert hanging.received == 1
    for task in pending:
        task.cancel()


async def test_non_default_reject_status(gateway, bidder):
    host, port, proxy = await gateway([bidder.url], ranges(("127.0.0.2", "127.0.0.2")), reject_status=451)
    [(status, headers, body, _)] = await exchange(host, port, get(), local="127.0.0.2")
    assert (status, body) == (451, b"") and not bidder.seen and proxy.stats.blocked == 1


async def test_a_post_is_never_sent_twice(gateway):
    """A reused upstream connection that takes a request and closes without a word: a GET is
    sent again on a fresh connection, a POST is not (the upstream may have acted on it) unless
    the operator allows it."""
    seen = []

    async def take_second_then_close(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ")[0])
        writer.transport.abort()

    server = await asyncio.start_server(take_second_then_close, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        for retry, expected in ((False, 502), (True, 200)):
            host, port, proxy = await gateway([url], retry_non_idempotent=retry)
            seen.clear()
            post = get(body=b"bid", method=b"POST")
            results = await exchange(host, port, get() + post, responses=2)
            assert [r[0] for r in results] == [200, expected]
            assert seen == ([b"GET", b"POST"] if not retry else [b"GET", b"POST", b"POST"])
        host, port, _ = await gateway([url])
        seen.clear()
        results = await exchange(host, port, get() * 2, responses=2)
        assert [r[0] for r in results] == [200, 200] and seen == [b"GET", b"GET", b"GET"]
    finally:
        server.close()


OPENRTB_UNREADABLE = {
    "invalid UTF-8": b'{"device": {"ip": "198.51.100.1"}, "x": "\xff"}',
    "duplicate key": b'{"device": {"ip": "192.0.2.7", "ip": "198.51.100.1"}}',  # json keeps the last
    "case-variant key": b'{"device": {"ip": "198.51.100.1"}, "Device": {"IP": "192.0.2.7"}}',
    "trailing data": b'{"device": {"ip": "198.51.100.1"}} {"device": {"ip": "192.0.2.7"}}',
    "huge integer": b'{"device": {"ip": "198.51.100.1"}, "n": ' + b"9" * 4300 + b"}",
    "NaN": b'{"device": {"ip": "198.51.100.1"}, "bidfloor": NaN}',
    "too deep": b'{"device": {"ip": "198.51.100.1"}, "x": ' + b"[" * 40 + b"]" * 40 + b"}",
    "device not an object": b'{"device": "192.0.2.7"}',
    "ip not an address": b'{"device": {"ip": "192.0.2.7x"}}',
}


@pytest.mark.parametrize("body", OPENRTB_UNREADABLE.values(), ids=OPENRTB_UNREADABLE.keys())
async def test_openrtb_fails_closed_on_bodies_a_bidder_could_read_otherwise(gateway, bidder, body):
    host, port, _ = await gateway([bidder.url], ranges(("192.0.2.0", "192.0.2.255")), openrtb=True)
    [(status, _, payload, _)] = await exchange(host, port, get("/bid", body=body, method=b"POST"))
    assert (status, payload) == (204, b"") and not bidder.seen


async def test_openrtb_reads_case_variants_zone_ids_and_gzip_like_a_bidder(gateway, bidder):
    import gzip

    index = ranges(("192.0.2.0", "192.0.2.255"), ("fe80::", "fe80::ffff"))
    host, port, _ = await gateway([bidder.url], index, openrtb=True, trusted_proxies=("127.0.0.1/32",))
    blocked = [
        get("/bid", body=b'{"Device": {"IP": "192.0.2.7"}}', method=b"POST"),
        get("/bid", body=b'{"device": {"ipv6": "fe80::1%eth0"}}', method=b"POST"),
        get("/bid", headers="Content-Encoding: gzip\r\n", body=gzip.compress(b'{"device": {"ip": "192.0.2.7"}}'),
            method=b"POST"),
        get("/bid", headers="Content-Encoding: br\r\n", body=b'{"device": {"ip": "198.51.100.1"}}', method=b"POST"),
        get("/bid", headers="X-Forwarded-For: fe80::2%eth0\r\n"),
    ]
    for request in blocked:
        [(status, *_)] = await exchange(host, port, request)
        assert status == 204, request
    allowed = gzip.compress(b'{"device": {"ipv6": "2001:db8::1%eth0"}}')
    [(status, *_)] = await exchange(host, port, get("/bid", headers="Content-Encoding: gzip\r\n", body=allowed,
                                                    method=b"POST"))
    assert status == 200 and len(bidder.seen) == 1


def proxy_v2(source: str, dest: str = "127.0.0.1", local: bool = False) -> bytes:
    import socket as s
    import struct

    body = s.inet_aton(source) + s.inet_aton(dest) + struct.pack("!HH", 40000, 8080)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 if local else 0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def test_proxy_protocol_from_trusted_peers_only(gateway, bidder):
    index = ranges(("192.0.2.0", "192.0.2.255"), ("127.0.0.2", "127.0.0.2"))
    host, port, _ = await gateway([bidder.url], index, proxy_protocol=True, trusted_proxies=("127.0.0.1/32",))
    v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8080\r\n"
    assert (await exchange(host, port, v1 + get()))[0][0] == 403
    assert (await exchange(host, port, proxy_v2("192.0.2.7") + get()))[0][0] == 403
    assert (await exchange(host, port, proxy_v2("198.51.100.1") + get()))[0][0] == 200
    assert bidder.seen[-1].raw_headers[-1] == (b"X-Forwarded-For", b"198.51.100.1")
    assert (await exchange(host, port, b"PROXY UNKNOWN\r\n" + get()))[0][0] == 200  # the peer itself
    assert (await exchange(host, port, proxy_v2("0.0.0.0", local=True) + get()))[0][0] == 200
    # A trusted peer without the header is refused; an untrusted peer cannot send one.
    assert (await exchange(host, port, get()))[0][0] == 400
    assert (await exchange(host, port, b"PROXY TCP4 198.51.100.1 127.0.0.1 1 2\r\n" + get(),
                           local="127.0.0.2"))[0][0] == 400
    assert (await exchange(host, port, get(), local="127.0.0.2"))[0][0] == 403
    assert len(bidder.seen) == 3


async def test_one_byte_chunks_are_gathered_and_their_count_bounded(gateway, bidder):
    from gateway.http.proxy import MAX_CHUNKS

    host, port, _ = await gateway([bidder.url], max_body_bytes=1 << 20)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    [(status, _, body, _)] = await exchange(host, port, head + b"1\r\nz\r\n" * 5000 + b"0\r\n\r\n")
    assert (status, body) == (200, b"bid:" + b"z" * 5000)
    [(status, *_)] = await exchange(host, port, head + b"1\r\nz\r\n" * (MAX_CHUNKS + 1) + b"0\r\n\r\n")
    assert status == 400 and len(bidder.seen) == 1


async def test_an_unfinished_header_line_is_bounded(gateway, bidder):
    """One endless header line, never ended: refused once it passes the limit, not held."""
    host, port, proxy = await gateway([bidder.url], max_header_bytes=1024)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 20000)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 ") and not bidder.seen


async def test_connections_beyond_the_worker_bound_are_closed(gateway, bidder):
    host, port, proxy = await gateway([bidder.url], max_connections=2)
    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    await eventually(lambda: len(proxy.connections) == 2, what="two connections")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(get())
    assert await asyncio.wait_for(reader.read(), 5) == b""
    for _, w in held:
        w.close()


async def test_request_bodies_share_a_per_worker_budget(gateway, bidder):
    host, port, proxy = await gateway([bidder.url], max_buffered_bytes=1500, max_body_bytes=1000)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 900)
    await eventually(lambda: proxy.buffered == 900, what="900 bytes gathered")
    [(status, *_)] = await exchange(host, port, get(body=b"b" * 800, method=b"POST"))
    assert status == 503 and proxy.buffered == 900
    writer.close()
    await eventually(lambda: proxy.buffered == 0, what="the budget given back")


async def test_a_body_still_arriving_when_the_budget_is_spent_is_cut_off(gateway, bidder):
    host, port, proxy = await gateway([bidder.url], budget_ms=50, request_timeout_s=30)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)  # the rest never comes
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    assert proxy.stats.timeout == 1 and not bidder.seen and proxy.buffered == 0


async def test_a_client_leaving_mid_body_is_no_error(gateway, bidder, caplog):
    """A client that goes away while its body arrives is routine: nothing forwarded, nothing
    logged as an error, its share of the body budget given back."""
    caplog.set_level(logging.WARNING)
    host, port, proxy = await gateway([bidder.url])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    await eventually(lambda: proxy.buffered == 10, what="the body to be gathered")
    writer.transport.abort()
    await eventually(lambda: proxy.buffered == 0, what="the budget given back")
    assert (await exchange(host, port, get()))[0][0] == 200  # the worker serves on
    assert not bidder.seen[:-1] and [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_long_target_gets_414_and_a_long_header_line_431(gateway, bidder):
    host, port, _ = await gateway([bidder.url], max_header_bytes=1024)
    assert (await exchange(host, port, get("/" + "a" * 2000)))[0][0] == 414
    assert (await exchange(host, port, get(headers=f"X-Line: {'l' * 2000}\r\n")))[0][0] == 431
    assert (await exchange(host, port, get("/" + "a" * 900)))[0][0] == 200
    assert len(bidder.seen) == 1


async def test_drain_lets_requests_in_flight_finish_and_closes_idle_connections(gateway):
    async def slow(request, body):
        await asyncio.sleep(0.3)
        return web.Response(body=b"late:" + body)

    bidder = await start_bidder(slow)
    try:
        host, port, proxy = await gateway([bidder.url])
        _, idle = await asyncio.open_connection(host, port)
        in_flight = [asyncio.create_task(exchange(host, port, get(body=b"%d" % i, method=b"POST"))) for i in range(4)]
        await eventually(lambda: len(bidder.seen) == 4, what="four requests at the bidder")
        assert await proxy.drain(5.0)
        results = await asyncio.gather(*in_flight)
        assert sorted(r[0][2] for r in results) == [b"late:%d" % i for i in range(4)]
        assert {r[0][1].get("connection") for r in results} == {"close"}  # no keep-alive while draining
        idle.close()
    finally:
        await bidder.runner.cleanup()
