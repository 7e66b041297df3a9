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
