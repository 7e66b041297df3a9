"""Who published what: the command log's records indexed by idempotency key and request id.

POST /admin/commands cannot always say whether a command landed (a frozen broker may take the
record later). The command log itself is the only answer every gateway shares, before and after
a restart, so a retry with the same `Idempotency-Key` (the record's key) is looked up here before
anything is published again, and a client holding only its request id can find its command.
The index reads the log once, then only what was appended since the last look. Every record
also goes into a `CommandTable` (explain.py): who blocked an address and why, and the log listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..kafka.config import KafkaConfig
from ..kafka.topics import header, log_reader, read_to_end
from .explain import CommandTable

log = logging.getLogger(__name__)

INDEX_BATCH = 2000  # records indexed between two yields to the event loop


@dataclass(frozen=True, slots=True)
class Published:
    """One command record as the log holds it."""

    offset: int
    command: str
    timestamp_ms: int
    key: str | None
    request_id: str | None
    actor: str | None
    reason: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "command": self.command,
            "time": datetime.fromtimestamp(self.timestamp_ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z"),
            "idempotency_key": self.key,
            "request_id": self.request_id,
            "actor": self.actor,
            "reason": self.reason,
        }


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


class CommandIndex:
    """Records of the command topic that carry a key or a request id, by either.

    `catch_up()` reads from where the last call stopped to the end offsets read now; a broker
    that does not answer makes it raise (the caller bounds it with a timeout), and the next call
    resumes where the last record read left off.
    """

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.by_key: dict[str, Published] = {}
        self.by_request: dict[str, list[Published]] = {}
        self.next_offset = 0
        self.table = CommandTable()  # every record read from the log (never the producer's confirmations)
        self.end_offset: int | None = None  # the commands topic's end as last read
        self._partition = TopicPartition(kafka.commands_topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    def add(self, entry: Published) -> None:
        """Index a record (read from the log, or just confirmed by this process's producer)."""
        if entry.key is not None:
            self.by_key.setdefault(entry.key, entry)  # the first record of a key is the command; later ones never count
        if entry.request_id is not None:
            same = self.by_request.setdefault(entry.request_id, [])
            if all(e.offset != entry.offset for e in same):
                same.append(entry)

    async def catch_up(self) -> None:
        async with self._lock:
            try:
                consumer = await self._reader()
                if self.kafka.commands_topic not in await consumer.topics():
                    return  # nothing was ever published (and asking for its offsets could auto-create it)
                if not consumer.assignment():
                    consumer.assign([self._partition])
                consumer.seek(self._partition, self.next_offset)
                # Small batches: indexing costs ~50 us a record, and this runs on the supervisor's loop
                # (admin API, its follower): 2000 records hold it ~0.1 s, not seconds.
                ends = await read_to_end(consumer, [self._partition], self._handle, max_records=INDEX_BATCH)
                self.end_offset = max(ends[self._partition], self.next_offset)
            except BaseException:
                await self.close()  # a fresh reader next time: this one may be mid-request
                raise

    def _handle(self, tp: TopicPartition, records: list) -> None:
        for record in records:
            if record.offset < self.next_offset:
                continue
            self.next_offset = record.offset + 1
            headers = record.headers or ()
            key, request_id = _text(record.key), _text(header(headers, "request-id"))
            value, actor, reason = _text(record.value) or "", _text(header(headers, "actor")), _text(header(headers, "reason"))
            self.table.add(record.offset, value, record.timestamp, key, request_id, actor, reason)
            if key is None and request_id is None:
                continue
            self.add(Published(record.offset, value, record.timestamp, key, request_id, actor, reason))

    async def keep_up(self, interval: float = 1.0, timeout: float = 60.0) -> None:
        """Read what was appended, every `interval`, until cancelled: the first read of a long log
        happens here, not in a request, and later requests only read the last second's records."""
        pause = interval
        while True:
            try:
                await asyncio.wait_for(self.catch_up(), timeout)
                pause = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker's trouble: retried, less often while it lasts
                log.debug("command log: catch-up failed: %r", exc)
                pause = min(pause * 2, 10.0)
            await asyncio.sleep(pause)

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = log_reader(self.kafka, "gateway-admin-commandlog")
            try:
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 2.0)
