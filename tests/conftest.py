"""Shared fixtures: one real Kafka-protocol broker per test session, unique topic names per test.

Set KAFKA_BOOTSTRAP=host:port to run every broker test against that broker (e.g. Apache Kafka)
instead of the embedded Tansu started here.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.broker import Broker, start_broker


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[Broker | None]:
    """The Tansu process of this session (None when KAFKA_BOOTSTRAP names an external broker)."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield None
        return
    broker = start_broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A Tansu of this test's own, for tests that kill or freeze their broker; stopped by PID at the end
    (stop_pid sends SIGCONT first, so a frozen one stops too)."""
    broker = start_broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(embedded_broker: Broker | None) -> str:
    """host:port of the broker every Kafka test talks to."""
    return os.environ.get("KAFKA_BOOTSTRAP") or embedded_broker.bootstrap


@dataclass(frozen=True)
class TopicNames:
    commands: str
    ranges: str


@pytest.fixture
def topic_names(request: pytest.FixtureRequest) -> TopicNames:
    """Fresh topic names per test, so tests never see each other's records."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    tag = uuid.uuid4().hex[:8]
    return TopicNames(commands=f"t-{stem}-{tag}.commands", ranges=f"t-{stem}-{tag}.ranges")


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest):
    """A factory of unique topic names for this test: unique_topic("x") -> 't-<test>-<rand>.x'."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")

    def make(suffix: str = "topic") -> str:
        return f"t-{stem}-{uuid.uuid4().hex[:8]}.{suffix}"

    return make


@pytest.fixture
def kafka(kafka_bootstrap: str, topic_names: TopicNames):
    """A KafkaConfig on this test's own topics."""
    from gateway.kafka.config import KafkaConfig

    return KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)


@pytest.fixture
def read_topic(kafka_bootstrap: str):
    """`await read_topic(topic)`: every record of partition 0 up to its end, via the drain rule."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from gateway.kafka.topics import read_to_end

    async def read(topic: str) -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            records: list = []
            await read_to_end(consumer, [tp], lambda _tp, batch: records.extend(batch))
            return records
        finally:
            await consumer.stop()

    return read
