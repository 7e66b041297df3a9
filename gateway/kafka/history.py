"""The time machine: the ranges as they were at an offset or a time, folded from the command topic.

The command topic is kept forever, so any past state is the fold of a prefix of it. Bounded by
time, the prefix ends before the first command published later than the bound (Tansu's
offsets_for_times answers offset 0 for any time, so the log is scanned; Kafka gives the same answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from aiokafka import TopicPartition

from ..blacklist.ranges import RangeSet
from .config import KafkaConfig
from .topics import command_in, log_reader, partitions_of, read_to_end

log = logging.getLogger("gateway.history")


@dataclass
class Replay:
    view: RangeSet
    commands: int = 0  # commands folded
    poison: int = 0  # records skipped because they do not parse
    next_offset: int = 0  # the first command not folded


async def replay(kafka: KafkaConfig, *, offset: int | None = None, until: datetime | None = None) -> Replay:
    """`gateway ctl replay`: fold the commands before `offset` (the first N) and/or published at or
    before `until` (a naive datetime is UTC, as everywhere in the admin API).

    A commands topic that does not exist raises TopicError: a typo in a topic name must not
    read as an empty blacklist, and reading never creates the topic."""
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    until_ms = int(until.timestamp() * 1000) if until is not None else None
    result = Replay(RangeSet())
    done = False
    commands = TopicPartition(kafka.commands_topic, 0)

    def fold(tp, records) -> None:
        nonlocal done
        for record in records:
            if done or (offset is not None and record.offset >= offset) or (
                until_ms is not None and record.timestamp > until_ms
            ):
                done = True
                return
            result.next_offset = record.offset + 1
            command = command_in(record, result, log)
            if command is None:
                continue
            result.view.apply(command)
            result.commands += 1

    consumer = log_reader(kafka, "gateway-replay")
    try:  # stopped even when start fails: a broker error must not leave an unclosed consumer behind
        await consumer.start()
        await partitions_of(consumer, kafka.commands_topic)  # a missing log is an error, never an empty history
        consumer.assign([commands])
        await consumer.seek_to_beginning(commands)
        ends = await consumer.end_offsets([commands])
        if offset is not None:
            ends[commands] = min(ends[commands], offset)
        await read_to_end(consumer, [commands], fold, end_offsets=ends)
    finally:
        await consumer.stop()
    return result
