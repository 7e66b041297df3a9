"""`gateway materialize`: fold the command topic into the view topic, one active writer at a time.

The view topic is the checkpoint (DESIGN invariant 4): on taking over, the writer reads the view
to its end into a RangeSet as stored, finds the highest `command-offset`, and re-applies that
command (RangeSet.reconcile against the stored view) unless its `last` record is there; then it
folds every later command. No broker transactions are needed.

Single writer: every instance joins one consumer group on the one-partition command topic; the
member that holds the partition writes, the others stand by. A sticky assignor keeps the partition
with its holder when a standby joins; when the holder dies (session timeout) or leaves (SIGTERM),
a standby gets it, re-reads the view to its end and continues.

Progress marker: a batch whose last commands change nothing (no-ops, poison records) still
records its progress, by re-publishing one unchanged range of the view (on an empty view, a
tombstone of an absent key) tagged with the batch's last command offset and `last`. Followers
store it as no change; a restart resumes after that command, and `?wait=1` sees it applied.
"""

from __future__ import annotations

import asyncio
import logging
import signal
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
from .config import KafkaConfig
from .publisher import BatchWriter
from .topics import (
    command_in,
    ensure_topics,
    header,
    log_reader,
    partitions_of,
    read_to_end,
)
from .view import ViewLoader

log = logging.getLogger("gateway.materializer")

LAST = ("last", b"1")


class SingleWriterAssignor:
    """Give every subscribed partition to one member, preferring the member that already holds it."""

    name = "gateway-single-writer"
    version = 0

    def __init__(self) -> None:
        self.holder = False

    def metadata(self, topics) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), b"holder" if self.holder else b"")

    def assign(self, cluster, members: Mapping[str, ConsumerProtocolMemberMetadata]) -> dict:
        holders = sorted(m for m, meta in members.items() if meta.user_data == b"holder")
        chosen = holders[0] if holders else min(members)
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        everything = [(t, sorted(cluster.partitions_for_topic(t) or ())) for t in topics]
        return {
            member: ConsumerProtocolMemberAssignment(self.version, everything if member == chosen else [], b"")
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.holder = bool(assignment.partitions())


class Materializer(ConsumerRebalanceListener):
    """One materializer instance: active while it holds the command partition, standby otherwise."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        group_id: str | None = None,
        max_batch: int = 2_000,
        session_timeout_ms: int = 6_000,
    ) -> None:
        self.kafka = kafka
        self.group_id = group_id or f"gateway-materializer.{kafka.commands_topic}"
        self.max_batch = max_batch
        self.session_timeout_ms = session_timeout_ms
        self.poison = 0  # command records skipped because they do not parse
        self.applied = 0  # commands folded by this process
        self.written = 0  # view records written by this process
        self.active = False
        self.next_offset: int | None = None  # next command to fold, while active
        self.view: RangeSet | None = None
        self._commands = TopicPartition(kafka.commands_topic, 0)
        self._lock = asyncio.Lock()
        self._must_recover = False
        self._refold_from: int | None = None  # first command of a fold whose view write failed
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Graceful stop: finish the batch in hand, flush it, leave the group."""
        self._stopping.set()

    # -- rebalance listener (runs in aiokafka's coordinator task) -------------------

    async def on_partitions_revoked(self, revoked) -> None:
        async with self._lock:  # waits until the batch in hand is written
            if self.active:
                log.info("materializer: partition revoked, standing by")
            self.active = False
            self.view = None
            self._must_recover = False

    async def on_partitions_assigned(self, assigned) -> None:
        if self._commands in assigned:
            self._must_recover = True

    # -- main loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stop(): stand by, take over when given the command partition, fold commands."""
        await ensure_topics(self.kafka)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            client_id="gateway-materializer",
            acks="all",
            linger_ms=0,  # records go in whole batches (BatchWriter); nothing to wait for
            max_batch_size=32 << 10,  # a few hundred records: the view grows while a batch is folded
        )
        assignor = SingleWriterAssignor()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            client_id="gateway-materializer",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(assignor,),
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
                    async with self._lock:  # a rebalance waits for it (the revoke callback takes the lock)
                        if self._must_recover:
                            await self._take_over(consumer, producer)
                            self._must_recover = False
                        elif self.active and batch.get(self._commands):
                            await self._fold(batch[self._commands], producer)
                except (KafkaError, OSError, asyncio.TimeoutError) as exc:  # broker gone or slow: rebuild from the view
                    log.warning("materializer: %r; re-reading the view in 1 s", exc)
                    async with self._lock:
                        self._must_recover = self._must_recover or self.active
                        self.active = False
                    await asyncio.sleep(1)
        finally:
            stopping.cancel()

    async def _take_over(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        """Become the writer: read the view to its end, repair a half-written command, seek the commands."""
        started = time.monotonic()
        view, highest, complete, command = await self._read_checkpoint()
        if highest is None:
            resume = (await consumer.beginning_offsets([self._commands]))[self._commands]
            records = view.reconcile(None)
            tag = None
        else:
            resume = highest + 1
            records = view.reconcile(None if complete else command)
            tag = highest
        if self._refold_from is not None:
            # A failed write may have lost a batch in the middle of a fold while later ones
            # landed: fold those commands again. Re-folding is idempotent: each address ends
            # as the last command covering it says, whatever the view held before.
            resume, self._refold_from = min(resume, self._refold_from), None
        if records or (tag is not None and not complete):
            await self._write(producer, view, records, tag, timestamp=None)
        self.view = view
        self.next_offset = resume
        consumer.seek(self._commands, resume)
        self.active = True
        log.info(
            "materializer active: view of %d ranges read in %.2f s, %d correcting records, resuming at command %d",
            len(view), time.monotonic() - started, len(records), resume,
        )

    async def _read_checkpoint(self) -> tuple[RangeSet, int | None, bool, Command | None]:
        """The view as stored, its highest command-offset, whether that command's `last` is there,
        and that command itself when it must be re-applied."""
        loader = ViewLoader(self)
        highest: int | None = None
        complete = False
        reader = log_reader(self.kafka.bootstrap, "gateway-materializer-recovery")
        await reader.start()
        try:
            partitions = await partitions_of(reader, self.kafka.ranges_topic)
            reader.assign(partitions)
            await reader.seek_to_beginning(*partitions)

            def handle(tp, records) -> None:
                nonlocal highest, complete
                for record in records:
                    loader.add(record)
                    tag = header(record.headers, "command-offset")
                    if tag is None or not tag.isdigit():
                        continue
                    offset, last = int(tag), header(record.headers, "last") is not None
                    if highest is None or offset > highest:
                        highest, complete = offset, last
                    elif offset == highest:
                        complete = complete or last

            await read_to_end(reader, partitions, handle)
            view = loader.load()
            command = None
            if highest is not None and not complete:
                command = await self._command_at(reader, highest)
        finally:
            await reader.stop()
        return view, highest, complete, command

    async def _command_at(self, reader: AIOKafkaConsumer, offset: int) -> Command | None:
        reader.assign([self._commands])
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
        """Fold a batch of commands; queue each command's records in order, then wait for them all."""
        view = self.view
        writer = BatchWriter(producer, self.kafka.ranges_topic)
        wrote_up_to = None
        first = self.next_offset
        for record in records:
            if record.offset < self.next_offset:  # fetched before a seek: already folded
                continue
            self.next_offset = record.offset + 1
            command = command_in(record, self, log)
            if command is None:
                continue
            changes = view.apply(command)
            self.applied += 1
            if changes:
                await self._append(writer, changes, record.offset, record.timestamp)
                wrote_up_to = record.offset
        batch_end = self.next_offset - 1
        if wrote_up_to != batch_end and records:
            await self._append(writer, touch_record(view), batch_end, None)
        try:
            await writer.flush()
        except BaseException:
            self._refold_from = first
            raise

    async def _write(self, producer, view: RangeSet, records: list[Record], tag: int | None, timestamp) -> None:
        if not records and tag is not None:
            records = touch_record(view)
        writer = BatchWriter(producer, self.kafka.ranges_topic)
        await self._append(writer, records, tag, timestamp)
        await writer.flush()

    async def _append(self, writer: BatchWriter, records: list[Record], tag: int | None, timestamp: int | None) -> None:
        """Queue one command's records in order (coverage first, as given); `last` on the final one.

        The view record carries the command's timestamp, so a follower measures propagation from
        the moment the command was published."""
        tag_header = [("command-offset", str(tag).encode())] if tag is not None else []
        final = len(records) - 1
        for i, (key, value) in enumerate(records):
            await writer.append(
                key.encode(),
                value.encode() if value is not None else None,
                tag_header + [LAST] if i == final else tag_header,
                timestamp,
            )
        self.written += len(records)


def touch_record(view: RangeSet) -> list[Record]:
    """A record that changes nothing, to carry the progress tag of commands that changed nothing:
    one unchanged range of the view re-published, or, on an empty view, a tombstone of a key
    that is not there (followers store it as no change)."""
    first = next(view.ranges(), None)
    if first is None:
        return [("0.0.0.0", None)]
    version, start, end = first
    return [(format_address(version, start), format_address(version, end))]


async def materialize(
    kafka: KafkaConfig, *, session_timeout_ms: int = 6_000, admin_listen: tuple[str, int] | None = None
) -> None:
    """`gateway materialize`: run one materializer instance until SIGTERM/SIGINT (graceful stop).

    `admin_listen`: where to serve /healthz, /readyz and /metrics (poison records) for probes.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    materializer = Materializer(kafka, session_timeout_ms=session_timeout_ms)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, materializer.stop)
    stop_listener = None
    if admin_listen is not None:
        from ..control.metrics import serve_poison_metrics

        stop_listener = await serve_poison_metrics(*admin_listen, materializer, "materializer")
    try:
        await materializer.run()
    finally:
        if stop_listener is not None:
            await stop_listener()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
