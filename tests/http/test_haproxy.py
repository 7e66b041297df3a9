"""The trailer bypass of issue 11, through a real HAProxy in front of the gateway.

HAProxy (Debian's 2.6) passes chunked trailers on to the server. A blacklisted client
that puts `X-Forwarded-For: <allowed address>` in a trailer must still be refused, and a
trailer must never reach the bidder as a header, whichever way HAProxy hands the client
address over: the shipped way (deploy/haproxy: `send-proxy-v2`, gateway
`--proxy-protocol`) or the X-Forwarded-For way (`option forwardfor`).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import eventually, free_port
from proxyrig import Recorder, listening, ranges, start_gateway

from gateway.broker import stop_pid

pytestmark = pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed (Debian package haproxy)")

CONFIG = """
global
    maxconn 100
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend bids
    bind 127.0.0.1:{port}
    {forwardfor}
    default_backend gateways
backend gateways
    server gateway 127.0.0.1:{gateway} {send_proxy}
"""

CLIENT = "127.0.0.2"  # blacklisted
ALLOWED = "127.0.0.3"


@pytest.fixture(params=["send-proxy-v2", "forwardfor"])
async def chain(request, tmp_path: Path):
    """client -> HAProxy -> gateway (in-process) -> recording upstream; yields (port, recorder)."""
    recorder = Recorder()
    upstream = await recorder.start()
    proxy_protocol = request.param == "send-proxy-v2"
    server, proxy, gateway = await start_gateway(
        [f"http://127.0.0.1:{upstream}"], ranges((CLIENT, CLIENT)),
        trusted_proxies=("127.0.0.1/32",), proxy_protocol=proxy_protocol)
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG.format(port=port, gateway=gateway, send_proxy="send-proxy-v2" if proxy_protocol else "",
                                 forwardfor="" if proxy_protocol else "option forwardfor"))
    process = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await eventually(lambda: listening(port), timeout=10, what="haproxy to listen")
        yield port, recorder
    finally:
        stop_pid(process, timeout=5)
        server.close()
        await proxy.drain(0.1)
        recorder.close()


async def post(port: int, source: str, trailer: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(b"POST /bid HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    return head


async def test_a_trailer_cannot_unblock_a_client_behind_haproxy(chain):
    port, recorder = chain
    head = await post(port, CLIENT, b"X-Forwarded-For: 1.2.3.4\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    assert recorder.requests == []


async def test_a_trailer_never_reaches_the_bidder_as_a_header(chain):
    port, recorder = chain
    head = await post(port, ALLOWED, b"X-Forwarded-For: 1.2.3.4\r\nX-Evil: 1\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    [request] = recorder.requests
    assert b"X-Evil" not in request and b"1.2.3.4" not in request
    assert request.endswith(b"\r\nContent-Length: 5\r\n\r\nhello")
    xff = [line for line in request.split(b"\r\n") if line.lower().startswith(b"x-forwarded-for:")]
    assert xff and xff[0].split(b":", 1)[1].split(b",")[0].strip() == ALLOWED.encode()
