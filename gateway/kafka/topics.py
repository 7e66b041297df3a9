"""The two topics: creating them as the design needs, and reading one to its true end.

Commands: one partition (a total order of edits), kept forever (it is the time machine).
Ranges (the view): log-compacted, one partition, so a command's records stay in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ..blacklist.commands import Command, CommandError, parse_command

# log_reader and no_auto_create live in clients.py; re-exported: the readers import them from here.
from .clients import admin_client
from .clients import log_reader as log_reader
from .clients import no_auto_create as no_auto_create
from .config import KafkaConfig

TOPIC_ALREADY_EXISTS = 36
DEFAULT_DELETE_RETENTION_MS = 86_400_000  # Kafka's default when the topic does not set it
COMMANDS_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
RANGES_CONFIG = {"cleanup.policy": "compact"}


class TopicError(RuntimeError):
    """A topic that exists but cannot be used as the design needs it."""


async def ensure_topics(kafka: KafkaConfig, replication_factor: int | None = None) -> None:
    """Create the command and view topics when missing (unless kafka.create_topics is off: then
    they must exist); refuse a commands topic of several partitions.

    Topics are created before anything asks for their metadata: brokers that auto-create topics
    on a metadata request (Tansu, Kafka by default) would otherwise make them with defaults.
    """
    admin = admin_client(kafka)
    await admin.start()
    try:
        if kafka.create_topics:
            factor = replication_factor or kafka.replication_factor
            response = await admin.create_topics([
                NewTopic(kafka.commands_topic, 1, factor, topic_configs=COMMANDS_CONFIG),
                NewTopic(kafka.ranges_topic, 1, factor, topic_configs=RANGES_CONFIG),
            ])
            for topic, code, message in response.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise TopicError(f"cannot create topic {topic!r}: error {code} {message or ''}".strip())
        else:  # listing all topics auto-creates none; describing a missing one may (Tansu)
            existing = set(await admin.list_topics())
            for topic in (kafka.commands_topic, kafka.ranges_topic):
                if topic not in existing:
                    raise TopicError(
                        f"topic {topic!r} does not exist and topic creation is off (--no-create-topics):"
                        " create it with the topics job (deploy/k8s/topics-job.yaml)"
                    )
        for described in await admin.describe_topics([kafka.commands_topic, kafka.ranges_topic]):
            partitions = len(described["partitions"])
            if described["topic"] == kafka.commands_topic and partitions != 1:
                raise TopicError(
                    f"commands topic {kafka.commands_topic!r} has {partitions} partitions; it must have exactly 1 "
                    "(commands are applied in one total order). Recreate it with one partition."
                )
    finally:
        await admin.close()


async def delete_retention_ms(kafka: KafkaConfig) -> int:
    """How long the view topic keeps tombstones (how old a snapshot may be and still be trusted)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, kafka.ranges_topic)  # Tansu drops a filtered request
        for response in await admin.describe_configs([resource]):
            for resource_entry in response.resources:
                for entry in resource_entry[4]:
                    if entry[0] == "delete.retention.ms" and entry[1] is not None:
                        return int(entry[1])
        return DEFAULT_DELETE_RETENTION_MS
    finally:
        await admin.close()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of an existing topic, as the consumer's metadata knows them."""
    partitions = consumer.partitions_for_topic(topic)
    if partitions is None:
        await consumer.topics()  # refreshes the metadata of every topic
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TopicError(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    handle: Callable[[TopicPartition, list[ConsumerRecord]], None],
    *,
    max_records: int = 50_000,
    drain_ms: int = 50,
    end_offsets: dict[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """Feed `handle` every record up to the end offsets read at start; return those end offsets.

    Done when position() has reached the end offsets on every partition (not the last record's
    offset: transaction markers sit at the tail) and then a fetch returns nothing more. The last
    step matters on Tansu, whose end offset is the last batch's base offset + 1: the rest of that
    batch arrives in the same fetch response, so it is drained here before declaring the end.
    """
    ends = end_offsets if end_offsets is not None else await consumer.end_offsets(list(partitions))
    reached = False
    while True:
        if not reached:
            positions = await asyncio.gather(*(consumer.position(tp) for tp in partitions))
            reached = all(pos >= ends[tp] for tp, pos in zip(partitions, positions))
        batch = await consumer.getmany(*partitions, timeout_ms=drain_ms if reached else 1000, max_records=max_records)
        for tp, records in batch.items():
            handle(tp, records)
        if reached and not batch:
            return ends


class PoisonCounter(Protocol):
    """A reader that counts the records it had to skip."""

    poison: int


def command_in(record: ConsumerRecord, counter: PoisonCounter, log: logging.Logger) -> Command | None:
    """The command a command-topic record carries; a poison record is counted, logged with
    its offset and skipped (None): it never stops the reader."""
    try:
        return parse_command(record.value if record.value is not None else b"")
    except CommandError as exc:
        counter.poison += 1
        log.warning("skipping poison command at offset %d: %s", record.offset, exc)
        return None


def header(headers: Iterable[tuple[str, bytes]], name: str) -> bytes | None:
    """The value of a record header, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def true_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[int, int]:
    """(first offset, true end offset) of a partition the consumer is assigned to; moves its position.

    The end offset a broker reports may fall short of the last record + 1 (Tansu: the last
    batch's base offset + 1), so the last batch is read to find where it really ends.
    """
    first = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    if end <= first:
        return first, end
    consumer.seek(tp, end - 1)
    await read_to_end(consumer, [tp], lambda _tp, _records: None, end_offsets={tp: end})
    return first, max(end, await consumer.position(tp))
