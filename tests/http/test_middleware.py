"""Inline filtering in an aiohttp app: examples/aiohttp_bidder.py as a real process.

Real broker (conftest's), a real `gateway materialize` process, the example bidder as a
subprocess following the view, and raw HTTP/1.1 over loopback from chosen source addresses
(127.0.0.x binds on Linux loopback), so the peer and every header byte are the test's.

One materializer and one example bidder serve the module: 127.0.0.1 and ::1 are
blacklisted once; 127.0.0.3 is the example's trusted proxy. The example listens on an
IPv4 socket and on a dual-stack [::] socket, where IPv4 clients arrive as ::ffff:a.b.c.d.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import helpers
import pytest
from aiohttp import web
from helpers import eventually, running, wait_until

from gateway.http.middleware import setup_blacklist
from gateway.kafka.config import KafkaConfig, parse_hostport
from gateway.kafka.publisher import Publisher

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aiohttp_bidder.py"
BID_REQUEST = b'{"id": "r1", "imp": [{"id": "i1"}]}'
TRUSTED = "127.0.0.3"


def example_args(bootstrap: str, kafka: KafkaConfig, *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--kafka", bootstrap, "--commands-topic", kafka.commands_topic,
            "--ranges-topic", kafka.ranges_topic, *extra]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def call(port: int, source: str = "127.0.0.1", *, path: str = "/bid", body: bytes | None = BID_REQUEST,
               headers: tuple[str, ...] = (), timeout: float = 10.0) -> Answer:
    """One request on its own connection from `source`, read to the server's close."""
    host = "::1" if ":" in source else "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        lines = [f"{'GET' if body is None else 'POST'} {path} HTTP/1.1", "Host: bidder", "Connection: close", *headers]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse(data)


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return Answer(int(status_line.split()[1]), fields, body)


def get(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


@dataclass
class Inline:
    bootstrap: str
    kafka: KafkaConfig
    port4: int  # IPv4 listener
    port6: int  # dual-stack listener
    logs: Path


@pytest.fixture(scope="module")
def inline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory):
    tag = uuid.uuid4().hex[:8]
    kafka = KafkaConfig(kafka_bootstrap, f"t-middleware-{tag}.commands", f"t-middleware-{tag}.ranges")
    logs = tmp_path_factory.mktemp("middleware")
    port4, port6 = helpers.free_port(), helpers.free_port("::")
    topics = ["--commands-topic", kafka.commands_topic, "--ranges-topic", kafka.ranges_topic]
    with running([sys.executable, "-m", "gateway", "materialize", "--kafka", kafka_bootstrap, *topics],
                 logs / "materializer.log"), \
         running(example_args(kafka_bootstrap, kafka, "--listen", f"127.0.0.1:{port4}", "--listen", f"[::]:{port6}",
                              "--trusted-proxy", f"{TRUSTED}/32"), logs / "example.log"):
        wait_until(lambda: get(f"http://127.0.0.1:{port4}/readyz"), what="the example bidder ready")

        async def blacklist() -> None:
            async with Publisher(kafka) as publisher:
                await publisher.publish("BLACKLIST 127.0.0.1")
                await publisher.publish("BLACKLIST ::1")

            async def enforced() -> bool:
                return (await call(port4)).status == 403 and (await call(port6, "::1")).status == 403

            await eventually(enforced, what="127.0.0.1 and ::1 refused")

        asyncio.run(blacklist())
        yield Inline(kafka_bootstrap, kafka, port4, port6, logs)


@pytest.fixture(params=["ipv4", "dual-stack"])
def port(request: pytest.FixtureRequest, inline: Inline) -> int:
    """Each rule on the IPv4 listener and on the dual-stack one (IPv4 peers as ::ffff:a.b.c.d)."""
    return inline.port4 if request.param == "ipv4" else inline.port6


async def test_a_blacklisted_peer_is_refused_and_others_get_a_bid(port):
    refused = await call(port, "127.0.0.1")
    assert (refused.status, refused.body) == (403, b"")
    allowed = await call(port, "127.0.0.2")
    assert allowed.status == 200
    assert json.loads(allowed.body)["seatbid"][0]["bid"][0]["impid"] == "i1"


async def test_ipv6_peers_are_looked_up_in_the_ipv6_trie(inline):
    assert (await call(inline.port6, "::1")).status == 403
    # ::1 and 127.0.0.1 are blacklisted; ::ffff:127.0.0.2 (an IPv4 client on the dual-stack socket) is not.
    assert (await call(inline.port6, "127.0.0.2")).status == 200


async def test_x_forwarded_for_counts_only_from_a_trusted_peer_walked_from_the_right(port):
    xff = "X-Forwarded-For: "
    # An untrusted peer's X-Forwarded-For is ignored, whatever it says.
    assert (await call(port, "127.0.0.2", headers=(xff + "127.0.0.1",))).status == 200
    assert (await call(port, "127.0.0.1", headers=(xff + "127.0.0.4",))).status == 403
    # From the trusted proxy: the rightmost entry that is not a trusted proxy is the client.
    assert (await call(port, TRUSTED, headers=(xff + "127.0.0.1",))).status == 403
    assert (await call(port, TRUSTED, headers=(xff + f"127.0.0.4, 127.0.0.1, {TRUSTED}",))).status == 403
    # Entries left of the first untrusted one could be the client's own: never believed.
    assert (await call(port, TRUSTED, headers=(xff + "127.0.0.1, 127.0.0.4",))).status == 200
    assert (await call(port, TRUSTED)).status == 200


async def test_every_x_forwarded_for_line_counts_joined_in_order(port):
    lines = ("X-Forwarded-For: 127.0.0.1", "X-Forwarded-For: 127.0.0.4")
    assert (await call(port, TRUSTED, headers=lines)).status == 200  # not the first line alone
    lines = ("X-Forwarded-For: 127.0.0.1", f"X-Forwarded-For: {TRUSTED}")
    assert (await call(port, TRUSTED, headers=lines)).status == 403  # not the last line alone


@pytest.mark.parametrize("source", ["127.0.0.1", "::1"])
async def test_a_blocked_request_is_answered_at_once_and_its_body_never_read(inline, source):
    """Headers announcing 1 GB, no body: the answer comes at once and the connection closes.

    Reading the body would never answer; answering and then lingering to drain the body (what
    aiohttp does by default for 10 s) would keep the connection open past the deadline.
    """
    host = "::1" if ":" in source else "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, inline.port6, local_addr=(source, 0))
    try:
        writer.write(b"POST /bid HTTP/1.1\r\nHost: bidder\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)  # to the server's close
    finally:
        writer.close()
    assert parse(data).status == 403


async def test_a_blacklisted_openrtb_device_gets_no_bid(inline):
    def bid_request(**device: str) -> bytes:
        return json.dumps({"id": "r2", "imp": [{"id": "i1"}], "device": device}).encode()

    assert (await call(inline.port4, "127.0.0.2", body=bid_request(ip="127.0.0.1"))).status == 204
    assert (await call(inline.port4, "127.0.0.2", body=bid_request(ipv6="::1"))).status == 204
    assert (await call(inline.port4, "127.0.0.2", body=bid_request(ip="127.0.0.9"))).status == 200


async def test_metrics_count_each_outcome_under_the_gateway_names(inline):
    async def counters() -> dict[str, float]:
        text = (await call(inline.port4, "127.0.0.2", path="/metrics", body=None)).body.decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("gateway_requests_total{", "gateway_ready ", "gateway_ranges{")):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = await counters()
    await call(inline.port4, "127.0.0.1")
    await call(inline.port4, "127.0.0.2")
    after = await counters()
    assert after['gateway_requests_total{outcome="blocked"}'] == before['gateway_requests_total{outcome="blocked"}'] + 1
    # The second scrape passed the filter too: it is counted before it answers.
    assert after['gateway_requests_total{outcome="forwarded"}'] == before['gateway_requests_total{outcome="forwarded"}'] + 2
    assert after["gateway_ready"] == 1
    assert after['gateway_ranges{family="4"}'] == 1 and after['gateway_ranges{family="6"}'] == 1


@asynccontextmanager
async def relay(port: int, bootstrap: str):
    """A TCP relay to the broker on `port`: until it starts, the broker is unreachable there."""
    host, target = parse_hostport(bootstrap.split(",")[0])
    connections: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, target)
        connections.extend((writer, up_writer))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for writer in connections:
            writer.close()


async def test_503_until_bootstrapped_then_bids_until_blacklisted_then_a_clean_exit(inline, tmp_path):
    """Its own example process, reaching the broker only through a relay the test starts late,
    with --reject-status 204 (no bid), as an OpenRTB bidder would answer."""
    client, port, broker = "127.0.0.5", helpers.free_port(), helpers.free_port()
    args = example_args(f"127.0.0.1:{broker}", inline.kafka, "--listen", f"127.0.0.1:{port}", "--reject-status", "204")
    with running(args, tmp_path / "example.log") as example:
        await eventually(lambda: get(f"http://127.0.0.1:{port}/healthz"), what="the example listening")
        early = await call(port, client)
        assert (early.status, early.headers.get("Retry-After")) == (503, "1")
        assert not get(f"http://127.0.0.1:{port}/readyz")

        async with relay(broker, inline.bootstrap):
            async def bids() -> bool:
                return (await call(port, client)).status == 200

            await eventually(bids, what="a bid once the view is read")
            async with Publisher(inline.kafka) as publisher:
                await publisher.publish(f"BLACKLIST {client}")

            async def refused() -> Answer | None:
                answer = await call(port, client)
                return answer if answer.status != 200 else None

            answer = await eventually(refused, what=f"{client} refused")
            assert (answer.status, answer.body) == (204, b"")
            assert (await call(port, "127.0.0.6")).status == 200

            example.terminate()
            assert await asyncio.to_thread(example.wait, 15) == 0


async def test_a_request_without_a_peer_address_is_refused(kafka, tmp_path):
    """Behind a unix socket there is no client address to judge: refused (fail closed), counted apart."""
    async def bid(request: web.Request) -> web.Response:
        return web.Response(text="bid")

    app = web.Application()
    guard = setup_blacklist(app, kafka, registry=None)
    app.router.add_get("/bid", bid)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = str(tmp_path / "bidder.sock")
    await web.UnixSite(runner, path).start()
    try:
        await eventually(lambda: guard.ready, what="the view bootstrapped")
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:
            async with session.get("http://bidder/bid") as response:
                assert (response.status, await response.read()) == (403, b"")
        assert (guard.rejected, guard.forwarded, guard.blocked) == (1, 0, 0)
    finally:
        await runner.cleanup()
