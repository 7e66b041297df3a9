"""POST /admin/commands tells what it knows when the broker does not answer, and a retry with the
same Idempotency-Key never publishes a second command: real brokers (one of them frozen with
SIGSTOP), real admin listeners on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
from helpers import eventually, freeze

from gateway.broker import start_broker
from gateway.control.admin import make_admin_app, start_admin
from gateway.http.config import ServeConfig
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower
from gateway.kafka.publisher import LazyPublisher
from gateway.kafka.topics import header

TOKEN = "commands-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def admin_listener(kafka: KafkaConfig, publish_timeout: float = 10.0) -> AsyncIterator[str]:
    """One gateway's admin listener (its follower is not needed to publish); yields its URL."""
    config = ServeConfig(kafka=kafka, upstreams=("http://127.0.0.1:9",), admin_token=TOKEN)
    publisher = LazyPublisher(kafka)
    app = make_admin_app(config, Follower(kafka), publisher, publish_timeout=publish_timeout)
    runner = await start_admin(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(publisher.stop(), 5)


async def post(session: aiohttp.ClientSession, url: str, command: str, **headers: str) -> tuple[int, dict, dict]:
    async with session.post(url + "/admin/commands", json={"command": command}, headers={**AUTH, **headers}) as r:
        return r.status, await r.json(), {k.lower(): v for k, v in r.headers.items()}


async def find(session: aiohttp.ClientSession, url: str, query: str) -> tuple[int, dict]:
    async with session.get(url + "/admin/commands?" + query, headers=AUTH) as r:
        return r.status, await r.json()


async def test_a_retry_with_the_same_idempotency_key_publishes_nothing_on_any_gateway(kafka, read_topic):
    async with aiohttp.ClientSession() as session, admin_listener(kafka) as a:
        status, body, headers = await post(session, a, "BLACKLIST 10.13.0.0/16", **{
            "Idempotency-Key": "ticket-1", "X-Request-Id": "req-1"})
        assert status == 202 and headers["x-request-id"] == "req-1", body
        offset = body["offset"]

        status, again, headers = await post(session, a, "BLACKLIST 10.13.0.0/16", **{"Idempotency-Key": "ticket-1"})
        assert status == 200 and again["offset"] == offset and again["replayed"] is True, again
        assert again["request_id"] == "req-1" and headers["x-request-id"] != "req-1"  # this request's own id

        async with admin_listener(kafka) as b:  # another gateway, or this one restarted: the log answers
            status, other, _ = await post(session, b, "BLACKLIST 10.13.0.0/16", **{"Idempotency-Key": "ticket-1"})
            assert status == 200 and other["offset"] == offset, other
            status, clash, _ = await post(session, b, "WHITELIST 10.13.0.0/16", **{"Idempotency-Key": "ticket-1"})
            assert status == 422 and "ticket-1" in clash["error"], clash

            status, found = await find(session, b, "request_id=req-1")
            assert status == 200 and [c["offset"] for c in found["commands"]] == [offset]
            assert found["commands"][0]["idempotency_key"] == "ticket-1"
            assert (await find(session, b, "request_id=nobody"))[1] == {"commands": []}

    records = await read_topic(kafka.commands_topic)
    assert len(records) == 1  # three tries, one command
    assert records[0].key == b"ticket-1" and header(records[0].headers, "request-id") == b"req-1"


async def test_without_a_key_each_post_publishes_and_echoes_a_request_id(kafka, read_topic):
    async with aiohttp.ClientSession() as session, admin_listener(kafka) as a:
        first = await post(session, a, "BLACKLIST 10.14.0.0/16")
        second = await post(session, a, "BLACKLIST 10.14.0.0/16")
        assert first[0] == second[0] == 202
        ids = [first[2]["x-request-id"], second[2]["x-request-id"]]
        assert ids[0] != ids[1] and [first[1]["request_id"], second[1]["request_id"]] == ids
    records = await read_topic(kafka.commands_topic)
    assert [header(r.headers, "request-id").decode() for r in records] == ids


@pytest.mark.parametrize("query", ["family=4&family=6", "family=6&family=6"])
async def test_ranges_refuses_a_family_given_twice(kafka, query):
    async with aiohttp.ClientSession() as session, admin_listener(kafka) as a:
        async with session.get(f"{a}/admin/ranges?{query}", headers=AUTH) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "family given 2 times: give one of 4 or 6, or leave it out for both"


async def test_an_unreachable_broker_answers_503_not_published(unique_topic):
    kafka = KafkaConfig("127.0.0.1:1", unique_topic("commands"), unique_topic("ranges"))
    async with aiohttp.ClientSession() as session, admin_listener(kafka) as a:
        status, body, headers = await post(session, a, "BLACKLIST 10.15.0.0/16", **{"X-Request-Id": "req-down"})
    assert status == 503 and body["published"] is False and "not published, safe to retry" in body["error"], body
    assert headers["x-request-id"] == "req-down" and body["request_id"] == "req-down"


async def test_a_frozen_broker_may_have_published_and_says_how_to_find_out(unique_topic):
    """Keyless: 503 "may have been published" with the request id; the command lands once the
    broker resumes, and the request id finds it. Keyed: the key cannot be looked up, so nothing is
    published and the answer says so; the retry after the broker resumes publishes it once."""
    broker = await asyncio.to_thread(start_broker, 0)
    kafka = KafkaConfig(broker.bootstrap, unique_topic("commands"), unique_topic("ranges"))
    try:
        async with aiohttp.ClientSession() as session, admin_listener(kafka, publish_timeout=1.0) as a:
            assert (await post(session, a, "BLACKLIST 10.16.0.0/16"))[0] == 202  # offset 0; the producer is up

            await freeze(broker.pid)
            try:
                status, body, headers = await post(session, a, "BLACKLIST 10.17.0.0/16", **{"X-Request-Id": "req-frozen"})
                assert status == 503 and body["published"] is None, body
                assert "may have been published" in body["error"] and "request_id=req-frozen" in body["error"]
                assert headers["x-request-id"] == "req-frozen"

                status, body, headers = await post(session, a, "BLACKLIST 10.18.0.0/16", **{"Idempotency-Key": "k-1"})
                assert status == 503 and "nothing was published" in body["error"], body
                assert body["idempotency_key"] == "k-1" and headers["x-request-id"]
            finally:
                os.kill(broker.pid, signal.SIGCONT)

            async def landed() -> list:
                status, found = await find(session, a, "request_id=req-frozen")
                return found["commands"] if status == 200 else []

            (frozen,) = await eventually(landed, what="the command sent while the broker was frozen, in the log")
            assert frozen["offset"] == 1 and frozen["command"] == "BLACKLIST 10.17.0.0/16"

            status, body, _ = await post(session, a, "BLACKLIST 10.18.0.0/16", **{"Idempotency-Key": "k-1"})
            assert status == 202 and body["offset"] == 2, body
            status, body, _ = await post(session, a, "BLACKLIST 10.18.0.0/16", **{"Idempotency-Key": "k-1"})
            assert status == 200 and body["offset"] == 2, body
        async with admin_listener(kafka) as fresh, aiohttp.ClientSession() as session:
            status, body, _ = await post(session, fresh, "BLACKLIST 10.19.0.0/16")
            assert status == 202 and body["offset"] == 3  # each command landed exactly once
    finally:
        await asyncio.to_thread(broker.stop)
