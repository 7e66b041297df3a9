"""The follower: a task that keeps a gateway's view and lookup index equal to the view topic.

Bootstrap (DESIGN invariant 3): read the view from the beginning into a fresh RangeSet, build the
Index in bulk, swap both in at once, and only then report ready, when the position on every
partition has reached the end offsets read at start and the broker returns nothing more.
Then follow with a short fetch wait, buffering a command's records until its `last` record and
applying them together. Broker down or frozen (invariant 5): the last view and index stay in
place, aiokafka reconnects, and the follower catches up by itself; staleness is reported as the
age of the last update, the time since the broker last answered, and the lag.

No HTTP here: the server reads `index`, `ready` and the counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..blacklist.index import Index
from ..blacklist.ranges import RangeSet
from .config import KafkaConfig
from .topics import ensure_topics, header, log_reader, partitions_of, read_to_end
from .view import ViewLoader, store_view_record

log = logging.getLogger("gateway.follower")

STALE_PENDING_S = 1.0  # records of a command whose `last` never came (writer died) are applied after this


class Follower:
    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        initial: tuple[RangeSet, Mapping[int, int]] | None = None,
        trusted_until: float | None = None,
        fetch_max_wait_ms: int = 10,
        status_interval_s: float = 1.0,
        create_topics: bool = True,
    ) -> None:
        """`initial`: a starting view and the next offset per partition (a snapshot); the follower
        is ready with it at once, before the broker answers, and reads on from those offsets
        instead of bootstrapping. `trusted_until`: the wall time after which reading on from
        there could miss tombstones (the snapshot's time + the topic's delete.retention.ms);
        past it, or when the offsets no longer fit the topic (recreated, truncated), the
        follower bootstraps at first contact, serving the snapshot meanwhile."""
        self.kafka = kafka
        self.ready = asyncio.Event()  # set once: bootstrapped to the end offsets read at start
        self.view = RangeSet()
        self.index = Index()
        self.offsets: dict[int, int] = {}  # next view offset to read, per partition
        self.applied_offsets: dict[int, int] = {}  # next view offset whose effect is not in `view` yet
        self.end_offsets: dict[int, int] = {}  # as last read from the broker
        self.applied_command: int | None = None  # highest command-offset applied
        self.poison = 0
        self.records_applied = 0
        self.last_update: float | None = None  # wall time of the last applied record
        self.last_contact: float | None = None  # monotonic time the broker last answered
        self.propagation: deque[float] = deque(maxlen=10_000)  # command published -> applied, seconds
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._status_interval_s = status_interval_s
        self._create_topics = create_topics
        self._pending: list = []
        self._pending_since = 0.0
        self._stopping = asyncio.Event()
        self._applied_event = asyncio.Event()
        if initial is not None:
            view, offsets = initial
            self.view, self.index = view, Index.build(view.ranges())
            self.offsets, self.applied_offsets = dict(offsets), dict(offsets)
            self.ready.set()
        self._check_start = initial is not None
        self._trusted_until = trusted_until

    # -- what the gateway reads -----------------------------------------------------------

    @property
    def lag(self) -> int | None:
        """View records the broker has that this follower has not applied (None before the first answer)."""
        if not self.end_offsets:
            return None
        return sum(max(0, end - self.applied_offsets.get(p, 0)) for p, end in self.end_offsets.items())

    def age_of_last_update(self) -> float | None:
        """Seconds since the last view record was applied."""
        return None if self.last_update is None else max(0.0, time.time() - self.last_update)

    def seconds_since_contact(self) -> float | None:
        """Seconds since the broker last answered (grows while it is down or frozen)."""
        return None if self.last_contact is None else time.monotonic() - self.last_contact

    async def wait_applied(self, command_offset: int, timeout: float) -> bool:
        """Wait until the records of that command (or a later one) are applied here."""
        deadline = time.monotonic() + timeout
        while self.applied_command is None or self.applied_command < command_offset:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._applied_event.clear()
            try:
                await asyncio.wait_for(self._applied_event.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def stop(self) -> None:
        self._stopping.set()

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Bootstrap, then follow until stop(); survives broker outages, keeping the last state."""
        while not self._stopping.is_set():
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the follower must outlive any broker trouble
                log.warning("follower: %r; reconnecting in 1 s (serving the last view)", exc)
                await self._sleep(1.0)

    async def _session(self) -> None:
        if self._create_topics:
            await ensure_topics(self.kafka)
            self._create_topics = False
        consumer = log_reader(self.kafka.bootstrap, "gateway-follower", fetch_max_wait_ms=self._fetch_max_wait_ms)
        await consumer.start()
        status = None
        try:
            partitions = await partitions_of(consumer, self.kafka.ranges_topic)
            consumer.assign(partitions)
            if not self.ready.is_set() or (self._check_start and not await self._start_fits(consumer, partitions)):
                await self._catch_up(consumer, partitions)
            else:
                for tp in partitions:
                    consumer.seek(tp, self.offsets.get(tp.partition, 0))
            self._check_start = False
            status = asyncio.create_task(self._watch_end_offsets(consumer, partitions))
            await self._follow(consumer)
        finally:
            if status is not None:
                status.cancel()
            await consumer.stop()

    async def _start_fits(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> bool:
        """Whether reading on from the starting offsets gives the exact view (see __init__)."""
        if self._trusted_until is not None and time.time() > self._trusted_until:
            log.warning("follower: the snapshot is older than delete.retention.ms now; bootstrapping")
            return False
        firsts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            offset = self.offsets.get(tp.partition, 0)
            # Tansu's end offset may lag the true end: a false alarm only costs a bootstrap.
            if not firsts[tp] <= offset <= ends[tp]:
                log.warning("follower: snapshot offset %d of partition %d is outside the topic (%d..%d); "
                            "bootstrapping", offset, tp.partition, firsts[tp], ends[tp])
                return False
        return True

    async def _catch_up(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Read to the end offsets of now, then swap in the result and report ready."""
        started = time.monotonic()
        loader = ViewLoader(self)
        tags: list[int] = []

        def collect(tp, records) -> None:
            for record in records:
                loader.add(record)
                if header(record.headers, "last") is not None:  # only whole commands count as applied
                    tag = header(record.headers, "command-offset")
                    if tag is not None and tag.isdigit():
                        tags.append(int(tag))

        await consumer.seek_to_beginning(*partitions)
        ends = await read_to_end(consumer, partitions, collect)
        view = loader.load()
        index = Index.build(view.ranges())
        self.view, self.index = view, index  # one swap: requests see the old or the new, whole
        if tags:
            self.applied_command = max(max(tags), self.applied_command or -1)
        if len(view):
            self.last_update = time.time()
        for tp in partitions:
            self.offsets[tp.partition] = await consumer.position(tp)
        self.applied_offsets = dict(self.offsets)
        self.end_offsets = {tp.partition: end for tp, end in ends.items()}
        self.last_contact = time.monotonic()
        self.ready.set()
        self._applied_event.set()
        log.info("follower ready: %d ranges in %.2f s", len(self.view), time.monotonic() - started)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
            for tp, records in batch.items():
                self._apply_batch(tp, records)
            if self._pending and time.monotonic() - self._pending_since > STALE_PENDING_S:
                self._flush()

    def _apply_batch(self, tp: TopicPartition, records) -> None:
        """Buffer records per command; apply a command's records together when its `last` arrives."""
        for record in records:
            tag = header(record.headers, "command-offset")
            if self._pending and tag != header(self._pending[0].headers, "command-offset"):
                self._flush()  # the previous command ended without `last`: its writer died
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(record)
            if tag is None or header(record.headers, "last") is not None:
                self._flush()
            self.offsets[tp.partition] = record.offset + 1

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if not records:
            return
        view, index = self.view, self.index
        for record in records:
            change = store_view_record(view, record, self)
            if change is not None:
                index.update(change)
        self.records_applied += len(records)
        for record in records:
            self.applied_offsets[record.partition] = record.offset + 1
        now = time.time()
        self.last_update = now
        final = records[-1]
        tag = header(final.headers, "command-offset")
        if tag is not None and tag.isdigit():
            self.applied_command = max(int(tag), self.applied_command or -1)
        if self.ready.is_set():
            sample = max(0.0, now - final.timestamp / 1000)
            self.propagation.append(sample)
        self._applied_event.set()

    async def _watch_end_offsets(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Refresh end offsets (lag) and the time of last contact; a frozen broker just stops answering."""
        while True:
            try:
                ends = await asyncio.wait_for(consumer.end_offsets(partitions), timeout=max(2.0, self._status_interval_s * 2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as staleness, never fatal
                log.debug("follower: end offsets unavailable: %r", exc)
            else:
                self.end_offsets = {tp.partition: end for tp, end in ends.items()}
                self.last_contact = time.monotonic()
            await asyncio.sleep(self._status_interval_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass
