"""`gateway materialize`: fold the command topic into the view topic, one active writer at a time.

The view topic is the checkpoint (DESIGN invariant 4): on taking over, the writer reads the view
to its end into a RangeSet as stored, finds the highest `command-offset`, and re-applies that
command (RangeSet.reconcile against the stored view) unless its `last` record is there; then it
folds every later command. No broker transactions are needed.

Single writer: every instance joins one consumer group on the one-partition command topic; the
member that holds the partition writes, the others stand by. A sticky assignor keeps the partition
with its holder when a standby joins; when the holder dies (session timeout) or leaves (SIGTERM),
a standby gets it, re-reads the view to its end and continues.

Fencing (invariant 6), without broker transactions: on taking over, the writer reads the view,
checks the checkpoint (invariant 8: never ahead of the command log, never another commands topic
or log), appends a claim (`__writer__`), reads on up to and including its claim, re-publishes
every key whose last record is stale or poison, and tags each record it writes with
`writer` = its claim's offset. While active it keeps tailing the view: a stale record makes it
re-publish its own value for that key; a newer claim means it lost the role: it stops writing at
once and rejoins the group without a claim, so the partition never goes back to it unread.

Progress marker: a batch whose last commands change nothing (no-ops, poison records) still
records its progress, by re-publishing one unchanged range of the view (on an empty view, a
tombstone of an absent key) tagged with the batch's last command offset and `last`. Followers
store it as no change; a restart resumes after that command, and `?wait=1` sees it applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError

from ..blacklist.addresses import format_address
from ..blacklist.commands import Command, CommandError, parse_command
from ..blacklist.ranges import RangeSet, Record
from . import clients
from .config import KafkaConfig
from .history import replay
from .publisher import BatchWriter
from .topics import (
    command_in,
    ensure_topics,
    log_reader,
    partitions_of,
    read_to_end,
    true_end,
)
from .view import CLAIM_KEY, Claim, ViewLoader, ViewRules, new_log_id, repair_records

log = logging.getLogger("gateway.materializer")

LAST = ("last", b"1")


class SingleWriterAssignor:
    """Give every subscribed partition to one member: the one holding the newest writer claim.

    Each member advertises the offset of its claim while it holds the partition. A member
    that was frozen advertises an older claim than the one that took over meanwhile, and a
    fenced member none: the partition never goes back to a writer that has not re-read the
    view (whoever gets it takes over, which re-reads the view and claims anew).
    """

    name = "gateway-single-writer"
    version = 0

    def __init__(self) -> None:
        self.claim: int | None = None  # the offset of this member's claim while it holds the partition
        self.operator = False  # started with --new-log or --refold and not active yet: it takes over first

    def metadata(self, topics) -> ConsumerProtocolMemberMetadata:
        data = b"operator" if self.operator else b"" if self.claim is None else b"claim:%d" % self.claim
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), data)

    def assign(self, cluster, members: Mapping[str, ConsumerProtocolMemberMetadata]) -> dict:
        claims = {m: _claim_of(meta.user_data) for m, meta in members.items()}
        holders = [m for m, claim in claims.items() if claim is not None]
        operators = sorted(m for m, meta in members.items() if meta.user_data == b"operator")
        if operators:  # an operator's --new-log or --refold takes the partition from the running writer
            chosen = operators[0]
        else:
            chosen = min(holders, key=lambda m: (-claims[m], m)) if holders else min(members)
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        everything = [(t, sorted(cluster.partitions_for_topic(t) or ())) for t in topics]
        return {
            member: ConsumerProtocolMemberAssignment(self.version, everything if member == chosen else [], b"")
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        if not assignment.partitions():
            self.claim = None


def _claim_of(user_data: bytes | None) -> int | None:
    if user_data and user_data.startswith(b"claim:") and user_data[6:].isdigit():
        return int(user_data[6:])
    return None


class CheckpointError(RuntimeError):
    """The view cannot be resumed from (DESIGN invariant 8); the message says why and what to do."""


class Materializer(ConsumerRebalanceListener):
    """One materializer instance: active while it holds the command partition, standby otherwise."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        group_id: str | None = None,
        max_batch: int = 2_000,
        session_timeout_ms: int = 6_000,
        new_log: bool = False,
        refold: bool = False,
    ) -> None:
        self.kafka = kafka
        self.group_id = group_id or f"gateway-materializer.{kafka.commands_topic}"
        self.max_batch = max_batch
        self.session_timeout_ms = session_timeout_ms
        self.new_log = new_log  # claim: an operator starts this log on purpose
        self.refold = refold  # the first take-over rebuilds the view from the whole command log
        self.poison = 0  # command records skipped because they do not parse
        self.applied = 0  # commands folded by this process
        self.written = 0  # view records written by this process
        self.stale = 0  # view records of a fenced writer seen (skipped, repaired)
        self.repaired = 0  # view records re-published over stale or poison ones
        self.active = False
        self.fenced = 0  # times this process saw a newer claim than its own and stopped writing
        self.refused: str | None = None  # why the view's checkpoint was not resumed from (standing by)
        self.claim: Claim | None = None  # this writer's claim while active
        self.log_id: str | None = None  # the log this process last wrote
        self.commands_end: int | None = None  # the command topic's end, as last read
        self.next_offset: int | None = None  # next command to fold, while active
        self.view: RangeSet | None = None
        self._commands = TopicPartition(kafka.commands_topic, 0)
        self._ranges = TopicPartition(kafka.ranges_topic, 0)
        self._lock = asyncio.Lock()
        self._must_recover = False
        self._retry_at = 0.0
        self._topics_checked = time.monotonic()
        self._refold_from: int | None = None  # first command of a fold whose view write failed
        self._stopping = asyncio.Event()
        self._assignor = SingleWriterAssignor()
        self._assignor.operator = new_log or refold
        self._tail: asyncio.Task | None = None
        self._fenced_now = False  # our claim was superseded: not one more record is written
        self._probes: dict[TopicPartition, AIOKafkaConsumer] = {}  # check the log is still the one we write
        self._claim_value = b""
        self._last_command: tuple[int, int] | None = None  # (offset, timestamp) of the last command folded
        self._rejoin = False  # leave and rejoin the group without a claim

    @property
    def backlog(self) -> int | None:
        """Commands in the topic not folded yet (None until known)."""
        if self.commands_end is None:
            return None
        done = self.next_offset if self.active and self.next_offset is not None else None
        return None if done is None else max(0, self.commands_end - done)

    def stop(self) -> None:
        """Graceful stop: finish the batch in hand, flush it, leave the group."""
        self._stopping.set()

    # -- rebalance listener (runs in aiokafka's coordinator task) -------------------

    async def on_partitions_revoked(self, revoked) -> None:
        async with self._lock:  # waits until the batch in hand is written
            if self.active:
                log.info("materializer: partition revoked, standing by")
            await self._stand_by()
            self._must_recover = False

    async def on_partitions_assigned(self, assigned) -> None:
        if self._commands in assigned:
            self._must_recover = True
            self._retry_at = 0.0

    async def _stand_by(self) -> None:
        self.active = False
        self.view = None
        self.claim = None
        tail, self._tail = self._tail, None
        if tail is not None and tail is not asyncio.current_task():
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            await probe.stop()

    # -- main loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stop(): stand by, take over when given the command partition, fold commands."""
        await ensure_topics(self.kafka)
        producer = clients.producer(
            self.kafka, "gateway-materializer",
            acks="all",
            linger_ms=0,  # records go in whole batches (BatchWriter); nothing to wait for
            max_batch_size=32 << 10,  # a few hundred records: the view grows while a batch is folded
        )
        consumer = clients.consumer(
            self.kafka, "gateway-materializer",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(self._assignor,),
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.session_timeout_ms // 6),
            fetch_max_wait_ms=10,  # propagation: Tansu holds an empty fetch for the whole wait
            max_partition_fetch_bytes=4 << 20,
        )
        await producer.start()
        try:
            await consumer.start()
            consumer.subscribe([self.kafka.commands_topic], listener=self)
            try:
                await self._loop(consumer, producer)
            finally:
                async with self._lock:
                    await self._stand_by()
                await consumer.stop()  # leaves the group: a standby takes over at once
        finally:
            await producer.stop()  # flushes what is pending
        log.info("materializer stopped: %d commands applied, %d view records written, %d poison records",
                 self.applied, self.written, self.poison)

    async def _loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=500, max_records=self.max_batch))
                await asyncio.wait([fetch, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    break
                try:
                    batch = fetch.result()
                    if not self.active and time.monotonic() >= self._topics_checked + 5.0:
                        # Standing by: make sure the topics exist (a reset broker lost them; no client
                        # auto-creates them), or no member is ever given a partition to take over.
                        self._topics_checked = time.monotonic()
                        await ensure_topics(self.kafka)
                    async with self._lock:  # a rebalance waits for it (the revoke callback takes the lock)
                        if self._must_recover and time.monotonic() >= self._retry_at:
                            await self._take_over(consumer, producer)
                        elif self.active and batch.get(self._commands):
                            await self._fold(batch[self._commands], producer)
                    if self._rejoin:
                        self._rejoin = False
                        consumer.unsubscribe()  # rejoin without a claim: the newer writer keeps the partition
                        consumer.subscribe([self.kafka.commands_topic], listener=self)
                except (KafkaError, OSError, asyncio.TimeoutError) as exc:  # broker gone or slow: rebuild from the view
                    log.warning("materializer: %r; re-reading the view in 1 s", exc)
                    async with self._lock:
                        self._must_recover = self._must_recover or self.active
                        await self._stand_by()
                    await asyncio.sleep(1)
        finally:
            stopping.cancel()

    async def _take_over(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        """Become the writer: read the view, check it, claim, read up to the claim, repair, seek the commands."""
        started = time.monotonic()
        await ensure_topics(self.kafka)  # a reset broker lost them: made as the design needs, never auto-created
        reader = log_reader(self.kafka, "gateway-materializer-recovery", fetch_max_wait_ms=20)
        await reader.start()
        try:
            loader = await self._read_view(reader)
            first, end = await self._commands_span(reader)
            self.commands_end = end
            try:
                self._check(loader, first, end)
            except CheckpointError as exc:
                if str(exc) != self.refused:
                    log.error("materializer: standing by: %s", exc)
                self.refused = str(exc)
                self._retry_at = time.monotonic() + 5.0
                await reader.stop()
                return
            self.refused = None
            self._fenced_now = False
            previous = loader.rules.claim
            claim = Claim(
                0,
                previous.log_id if previous is not None and len(loader.latest) + len(loader.claims) else new_log_id(),
                self.kafka.commands_topic,
                new_log=self.new_log or (previous is not None and previous.new_log),
                refold=self.refold,
            )
            self._claim_value = claim.value()
            sent = await producer.send_and_wait(self._ranges.topic, self._claim_value, key=CLAIM_KEY, partition=0)
            await self._read_on(reader, loader, until=sent.offset + 1)
            claim = loader.rules.claim
            if claim is None or claim.offset != sent.offset:  # another claim came after ours
                raise KafkaError("a newer writer claim followed ours; standing by")
            self.claim, self.log_id = claim, claim.log_id
            self._assignor.claim, self._assignor.operator = claim.offset, False
            view = loader.load()
            if self.refold:
                records, resume, tag = await self._refold(view)
                self.refold = False
            elif loader.highest is None:
                records, resume, tag = view.reconcile(None), first, None
            else:
                command = None if loader.complete else await self._command_at(reader, loader.highest)
                records, resume, tag = view.reconcile(command), loader.highest + 1, loader.highest
            if self._refold_from is not None:
                # A failed write may have lost a batch in the middle of a fold while later ones
                # landed: fold those commands again. Re-folding is idempotent: each address ends
                # as the last command covering it says, whatever the view held before.
                resume, self._refold_from = min(resume, self._refold_from), None
            repairs = [r for r in repair_records(view, loader.rules.bad_keys) if r[0] not in {k for k, _ in records}]
            loader.rules.bad_keys.clear()
            position = await reader.position(self._ranges)
            reader.assign([self._ranges])  # from here on it tails the view only
            reader.seek(self._ranges, position)
            if records or repairs or (tag is not None and not loader.complete):
                await self._write(producer, view, records + repairs, tag, timestamp=None)
                self.repaired += len(repairs)
        except BaseException:
            await reader.stop()
            raise
        for tp in (self._ranges, self._commands):  # one each: a fetch never waits behind the other's
            self._probes[tp] = probe = log_reader(self.kafka, "gateway-materializer-probe", fetch_max_wait_ms=10)
            await probe.start()
            probe.assign([tp])
            probe.pause(tp)
        self._last_command = None
        self.view = view
        self.next_offset = resume
        consumer.seek(self._commands, resume)
        self.active = True
        self._must_recover = False
        self._tail = asyncio.create_task(self._follow_view(reader, loader.rules, producer))
        log.info(
            "materializer active: claim at offset %d (log %s), view of %d ranges read in %.2f s, "
            "%d correcting records, %d repaired, resuming at command %d",
            claim.offset, claim.log_id, len(view), time.monotonic() - started, len(records), len(repairs), resume,
        )

    async def _read_view(self, reader: AIOKafkaConsumer) -> ViewLoader:
        """The view as stored, read by the reader rules up to its end (the reader stays on it)."""
        loader = ViewLoader(self)
        partitions = await partitions_of(reader, self.kafka.ranges_topic)
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        await read_to_end(reader, partitions, lambda tp, records: [loader.add(r) for r in records])
        return loader

    async def _read_on(self, reader: AIOKafkaConsumer, loader: ViewLoader, until: int) -> None:
        """Read on until the position reaches `until` (our own claim, included)."""
        while await reader.position(self._ranges) < until:
            batch = await reader.getmany(self._ranges, timeout_ms=1000)
            for record in batch.get(self._ranges, []):
                loader.add(record)

    async def _commands_span(self, reader: AIOKafkaConsumer) -> tuple[int, int]:
        ranges_position = await reader.position(self._ranges)
        reader.assign([self._ranges, self._commands])
        reader.seek(self._ranges, ranges_position)
        return await true_end(reader, self._commands)

    def _check(self, loader: ViewLoader, first: int, end: int) -> None:
        """Refuse a checkpoint that runs ahead of the command log, or a view of another log (invariant 8)."""
        if self.refold:
            return
        claim = loader.rules.claim
        if claim is not None and claim.commands_topic and claim.commands_topic != self.kafka.commands_topic:
            raise CheckpointError(
                f"the view {self.kafka.ranges_topic!r} was written from commands topic {claim.commands_topic!r}, "
                f"not {self.kafka.commands_topic!r}; run `gateway materialize --refold` to rebuild it from this one")
        if claim is not None and self.log_id is not None and claim.log_id != self.log_id and not claim.new_log:
            raise CheckpointError(
                f"the view now belongs to log {claim.log_id}, this writer wrote log {self.log_id}; "
                "run `gateway materialize --refold` (or --new-log) if this log is the one to keep")
        if loader.highest is not None and loader.highest >= end:
            raise CheckpointError(
                f"the view says command {loader.highest} was applied, but the commands topic ends at {end}: "
                "the view runs ahead of the command log (another or a reset log, or a forged record); "
                "run `gateway materialize --refold` to rebuild it from the command log")

    async def _refold(self, view: RangeSet) -> tuple[list[Record], int, int | None]:
        """The records that turn the stored view into the fold of the whole command log."""
        result = await replay(self.kafka)
        self.poison += result.poison
        records = view.become(result.view)
        tag = result.next_offset - 1 if result.next_offset else None
        log.warning("materializer: refold of %d commands: %d records change the view", result.commands, len(records))
        return records, result.next_offset, tag

    async def _follow_view(self, reader: AIOKafkaConsumer, rules: ViewRules, producer: AIOKafkaProducer) -> None:
        """While active: read the view behind our own writes. A newer claim fences us at once; a stale or
        poison record makes us re-publish our own value for its key (compaction would keep it)."""
        own = self.claim
        try:
            while self.active and self.claim is own:
                batch = await reader.getmany(self._ranges, timeout_ms=200, max_records=10_000)
                for record in batch.get(self._ranges, []):
                    entry = rules.read(record)
                    if isinstance(entry, Claim) and entry.offset != own.offset:
                        self.fenced += 1
                        self._fenced_now, self._rejoin = True, True
                        self.active = False  # checked before every write: nothing more is written
                        self._assignor.claim = None
                        log.error("materializer fenced: a newer writer claim at offset %d (ours: %d); "
                                  "stopped writing, standing by", entry.offset, own.offset)
                        return
                self.stale = rules.stale
                if rules.bad_keys and self.active:
                    async with self._lock:
                        if self.active and self.claim is own and self.view is not None:
                            records = repair_records(self.view, rules.bad_keys)
                            rules.bad_keys.clear()
                            log.warning("materializer: re-publishing %d key(s) whose last record is stale or poison",
                                        len(records))
                            await self._write(producer, self.view, records, None, timestamp=None)
                            self.repaired += len(records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the main loop notices the broker trouble too
            log.warning("materializer: view tail failed: %r; re-reading the view", exc)
            self._must_recover = True
            self.active = False
        finally:
            await reader.stop()

    async def _command_at(self, reader: AIOKafkaConsumer, offset: int) -> Command | None:
        reader.seek(self._commands, offset)
        while True:
            batch = await reader.getmany(self._commands, timeout_ms=5000, max_records=1)
            for record in batch.get(self._commands, []):
                try:
                    return parse_command(record.value or b"")
                except CommandError:
                    return None
            if not batch:
                raise KafkaError(f"command {offset} not readable")

    async def _fold(self, records, producer: AIOKafkaProducer) -> None:
        """Fold a batch of commands in memory while checking the log is still ours, then write each
        command's records in order and wait for them all."""
        check = asyncio.ensure_future(self._check_same_log(self.claim, self._last_command))
        view = self.view
        folded: list[tuple[list[Record], int, int | None]] = []
        first = self.next_offset
        try:
            for record in records:
                if record.offset < self.next_offset:  # fetched before a seek: already folded
                    continue
                self.next_offset = record.offset + 1
                self._last_command = (record.offset, record.timestamp)
                command = command_in(record, self, log)
                if command is None:
                    continue
                changes = view.apply(command)
                self.applied += 1
                if changes:
                    folded.append((changes, record.offset, record.timestamp))
        finally:
            await check  # raises when the log changed under us: nothing of this batch is written
        batch_end = self.next_offset - 1
        if (folded[-1][1] if folded else None) != batch_end and records:
            folded.append((touch_record(view), batch_end, None))
        writer = BatchWriter(producer, self.kafka.ranges_topic)
        for changes, tag, timestamp in folded:
            if self._fenced_now:  # fenced meanwhile: not one more record
                break
            await self._append(writer, changes, tag, timestamp)
        self.commands_end = max(self.commands_end or 0, self.next_offset)
        try:
            await writer.flush()
        except BaseException:
            self._refold_from = first
            raise

    async def _check_same_log(self, claim: Claim | None, last_command: tuple[int, int] | None) -> None:
        """Before a batch is written: our claim is still in the view and the last command we folded still
        in the command log. A broker that lost its log (Tansu restarted, a topic recreated) would
        otherwise see us fold the new log's commands on top of the old one's state."""
        probes = self._probes
        if not probes or claim is None:
            return
        wanted = {self._ranges: claim.offset}
        if last_command is not None:
            wanted[self._commands] = last_command[0]
        found = dict(zip(wanted, await asyncio.gather(*(record_at(probes[tp], tp, at) for tp, at in wanted.items()))))
        mine = found.get(self._ranges)
        same = mine is not None and mine.offset == claim.offset and mine.key == CLAIM_KEY and mine.value == self._claim_value
        if same and last_command is not None:
            last = found.get(self._commands)
            same = last is not None and (last.offset, last.timestamp) == last_command
        if not same:
            log.error("materializer: the log changed under this writer (our claim at offset %d or the last command "
                      "folded is gone: broker reset or topic recreated); standing by to re-read the view",
                      claim.offset)
            raise KafkaError("the log changed under this writer")

    async def _write(self, producer, view: RangeSet, records: list[Record], tag: int | None, timestamp) -> None:
        if not records and tag is not None:
            records = touch_record(view)
        writer = BatchWriter(producer, self.kafka.ranges_topic)
        await self._append(writer, records, tag, timestamp)
        await writer.flush()

    async def _append(self, writer: BatchWriter, records: list[Record], tag: int | None, timestamp: int | None) -> None:
        """Queue one command's records in order (coverage first, as given); `last` on the final one.

        Every record carries `writer`, our claim's offset (readers skip it once a newer claim is
        read). The view record carries the command's timestamp, so a follower measures
        propagation from the moment the command was published."""
        base = [("writer", str(self.claim.offset).encode())] if self.claim is not None else []
        if tag is not None:
            base.append(("command-offset", str(tag).encode()))
        final = len(records) - 1
        for i, (key, value) in enumerate(records):
            if self._fenced_now:
                break
            await writer.append(
                key.encode(),
                value.encode() if value is not None else None,
                base + [LAST] if i == final else base,
                timestamp,
            )
        self.written += len(records)


async def record_at(probe: AIOKafkaConsumer, tp: TopicPartition, offset: int):
    """The record at `offset` of a partition the probe is assigned to (paused between calls), or None."""
    probe.seek(tp, offset)
    probe.resume(tp)
    try:
        for _ in range(10):
            batch = await probe.getmany(tp, timeout_ms=500, max_records=1)
            if batch.get(tp):
                return batch[tp][0]
        return None
    finally:
        probe.pause(tp)  # no idle fetch in the way of the next call


def touch_record(view: RangeSet) -> list[Record]:
    """A record that changes nothing, to carry the progress tag of commands that changed nothing:
    one unchanged range of the view re-published, or, on an empty view, a tombstone of a key
    that is not there (followers store it as no change)."""
    first = next(view.ranges(), None)
    if first is None:
        return [("0.0.0.0", None)]
    version, start, end = first
    return [(format_address(version, start), format_address(version, end))]
