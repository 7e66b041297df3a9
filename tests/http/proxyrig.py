"""The rig of the request-path tests: an in-process engine on loopback, real upstreams, raw clients.

The engine (`fast` or `aiohttp`, ENGINES; conftest.py runs each test on both) runs in-process with an Index built directly (no Kafka); upstreams are real
aiohttp or raw asyncio servers; clients are raw sockets so bytes can be compared.
"""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace

from aiohttp import web

from gateway.blacklist.addresses import parse_address
from gateway.blacklist.index import Index
from gateway.http.config import ServeConfig
from gateway.http.engines import ENGINES, engine_class
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


async def start_gateway(upstreams, index=None, ready=True, host="127.0.0.1", engine="fast", ssl=None, **settings):
    """An engine (`engine`: one of ENGINES) on a loopback socket: (server, proxy, port).

    The budget defaults to 5 s, not the product's 100 ms: a test of anything but the budget
    must not turn into a timing test on a loaded machine. Budget tests set `budget_ms`.
    With `ssl` (a server SSLContext) the port speaks HTTPS."""
    settings.setdefault("budget_ms", 5_000)
    assert engine in ENGINES
    config = ServeConfig(kafka=KafkaConfig("unused:9092"), upstreams=tuple(upstreams), **settings)
    view = SimpleNamespace(index=index or Index.build([]), ready=ready)
    proxy = engine_class(engine)(config, view)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.listen()
    server = await proxy.serve(sock, ssl=ssl)
    return server, proxy, sock.getsockname()[1]


OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Recorder:
    """A raw-socket upstream: records each request's bytes, answers each with `reply`."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.reply = OK_REPLY
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                while (end := buffer.find(b"\r\n\r\n")) >= 0:
                    match = re.search(rb"\r\ncontent-length: *(\d+)", buffer[: end + 2], re.I)
                    total = end + 4 + (int(match.group(1)) if match else 0)
                    if len(buffer) < total:
                        break
                    self.requests.append(buffer[:total])
                    buffer = buffer[total:]
                    writer.write(self.reply)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


async def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port (for started servers)."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True
