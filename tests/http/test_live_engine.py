"""`gateway serve --engine aiohttp` as a real process: real broker, materializer, workers and HTTP.

The in-process suites (test_proxy, test_conformance) check each engine's rules; this checks
that the flag reaches the workers the supervisor forks and that the aiohttp engine runs the
product end to end: follower, readiness, blacklist edits, forwarding, drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
from helpers import eventually, free_port
from liveserve import answers, gateway_process
from proxyrig import exchange, get, start_bidder

from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import Publisher


async def test_serve_with_the_aiohttp_engine_blocks_published_ranges_and_forwards_the_rest(
        kafka_bootstrap, topic_names, tmp_path):
    topics = ["--commands-topic", topic_names.commands, "--ranges-topic", topic_names.ranges]
    bidder = await start_bidder()
    port, admin = free_port(), free_port()
    serve = ["serve", "--kafka", kafka_bootstrap, *topics, "--engine", "aiohttp", "--workers", "2",
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--upstream", bidder.url,
             "--trusted-proxy", "127.0.0.1/32"]
    try:
        with gateway_process(["materialize", "--kafka", kafka_bootstrap, *topics], tmp_path / "materialize.log"), \
             gateway_process(serve, tmp_path / "serve.log") as gateway:
            async with aiohttp.ClientSession() as session:
                await answers(session, f"http://127.0.0.1:{admin}/readyz", process=gateway)
            # The engine that answers is aiohttp's: it refuses an unknown transfer coding as a
            # bad request where the fast engine says 501 (test_conformance, "xchunked").
            xchunked = b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            assert (await exchange("127.0.0.1", port, xchunked))[0][0] == 400
            from_client = get("/bid", headers="X-Forwarded-For: 192.0.2.9\r\n", body=b"a", method=b"POST")
            [(status, _, body, _)] = await exchange("127.0.0.1", port, from_client)
            assert (status, body) == (200, b"bid:a")

            config = KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)
            async with Publisher(config) as publisher:
                await publisher.publish("BLACKLIST 192.0.2.0/24")

            async def enforced() -> bool:  # new connections: both workers must enforce it
                results = [await exchange("127.0.0.1", port, from_client) for _ in range(6)]
                return {status for [(status, *_)] in results} == {403}

            await eventually(enforced, timeout=30, what="every worker to block 192.0.2.0/24")
            forwarded = len(bidder.seen)
            results = [await exchange("127.0.0.1", port, from_client) for _ in range(10)]
            assert {status for [(status, *_)] in results} == {403} and len(bidder.seen) == forwarded
            allowed = get("/bid", headers="X-Forwarded-For: 198.51.100.1\r\n", body=b"b", method=b"POST")
            [(status, _, body, _)] = await exchange("127.0.0.1", port, allowed)
            assert (status, body) == (200, b"bid:b") and bidder.seen[-1].body == b"b"

            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(gateway.wait, 15) == 0
    finally:
        await bidder.runner.cleanup()
