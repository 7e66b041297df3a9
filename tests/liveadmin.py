"""A live admin listener for tests: real broker, real materializer and follower, real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.control.admin import make_admin_app, start_admin
from gateway.control.metrics import Flusher, Metrics
from gateway.http.config import ServeConfig
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import LazyPublisher

TOKEN = "test-token-1234"


@dataclass
class LiveAdmin:
    url: str
    token: str
    follower: Follower
    session: aiohttp.ClientSession
    kafka: KafkaConfig

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def call(self, method: str, path: str, *, token: str | None = None, **kwargs) -> tuple[int, object]:
        """(status, parsed JSON or text) of one admin request with the right token by default."""
        headers = {**self.headers(token), **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def command(self, text: str, **kwargs) -> int:
        status, body = await self.call("POST", "/admin/commands?wait=1", json={"command": text, **kwargs})
        assert status == 202, body
        return body["offset"]

    async def published(self) -> int:
        """How many records the command topic holds (its end offset)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap)
        await consumer.start()
        try:
            partition = TopicPartition(self.kafka.commands_topic, 0)
            return (await consumer.end_offsets([partition]))[partition]
        finally:
            await consumer.stop()

    async def clear(self) -> None:
        """Empty the view (each command changes it, so each is applied visibly)."""
        for family in ("0.0.0.0/0", "::/0"):
            await self.command(f"BLACKLIST {family}", force=True)  # wider than the guard allows
            await self.command(f"WHITELIST {family}")


@contextlib.asynccontextmanager
async def live_admin(bootstrap: str, commands: str, ranges: str, *, token: str | None = TOKEN,
                     materializer: bool = True) -> AsyncIterator[LiveAdmin]:
    kafka = KafkaConfig(bootstrap, commands, ranges)
    config = ServeConfig(kafka=kafka, upstreams=("http://127.0.0.1:9",), admin_token=token)
    tasks = []
    writer = Materializer(kafka, session_timeout_ms=6000) if materializer else None
    if writer is not None:
        tasks.append(asyncio.create_task(writer.run()))
    follower = Follower(kafka)
    tasks.append(asyncio.create_task(follower.run()))
    metrics = Metrics()
    tasks.append(asyncio.create_task(Flusher(metrics, follower=follower).run(interval=0.1)))
    publisher = LazyPublisher(kafka)
    runner = await start_admin(make_admin_app(config, follower, publisher, registry=metrics.registry), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        await asyncio.wait_for(follower.ready.wait(), 30)
        async with aiohttp.ClientSession() as session:
            yield LiveAdmin(f"http://127.0.0.1:{port}", token or "", follower, session, kafka)
    finally:
        await runner.cleanup()
        await publisher.stop()
        follower.stop()
        if writer is not None:
            writer.stop()
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
