"""The follower: a task that keeps a gateway's view and lookup index equal to the view topic.

Bootstrap (DESIGN invariant 3): read the view from the beginning into a fresh RangeSet, build the
Index in bulk, swap both in at once, and only then report ready, when the position on every
partition has reached the end offsets read at start and the broker returns nothing more.
Then follow with a short fetch wait, buffering a command's records until its `last` record and
applying them together. Every record goes through the reader rules (gateway/kafka/view.py):
claims, stale records of a fenced writer and poison never change the view. Broker down or
frozen (invariant 5): the last view and index stay in place, aiokafka reconnects, and the
follower catches up by itself; staleness is reported as the age of the last update, the time
since the broker last answered, the lag, and the commands not enforced yet (invariant 9).

Fail-static (invariant 7): a follower that holds a view never swaps it for another log's on
its own. A position beyond the topic's true end or before its start, a record at the last
offset read that is not the one read there, or a claim naming another log: the follower keeps
its view, stops applying, says why in `static` (an ERROR log line, status, metric), and
adopts the log it now sees only when that log's claim says an operator started it on purpose
(`materialize --new-log`) or when told to (`adopt()`, the admin route).

No HTTP here: the server reads `index`, `ready` and the counters.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from ..blacklist.index import Index
from ..blacklist.ranges import RangeSet
from .clients import KafkaAccessError
from .config import KafkaConfig
from .topics import (
    ensure_topics,
    header,
    log_reader,
    partitions_of,
    read_to_end,
    true_end,
)
from .view import Claim, ViewLoader, ViewRules

log = logging.getLogger("gateway.follower")

STALE_PENDING_S = 1.0  # records of a command whose `last` never came (writer died) are applied after this
STATIC_POLL_S = 2.0  # while static: how often the log now there is read for a --new-log claim

Signature = tuple[int, int, int]
"""The last record read on a partition: (offset, timestamp, crc of key and value)."""


def signature(record) -> Signature:
    crc = zlib.crc32(record.value if record.value is not None else b"\x00tombstone", zlib.crc32(record.key or b""))
    return record.offset, record.timestamp, crc


class Follower:
    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        initial: tuple[RangeSet, Mapping[int, int]] | None = None,
        trusted_until: float | None = None,
        claim: Claim | Mapping | None = None,
        signatures: Mapping[int, Signature] | None = None,
        fetch_max_wait_ms: int = 10,
        status_interval_s: float = 1.0,
        create_topics: bool = True,
    ) -> None:
        """`initial`: a starting view and the next offset per partition (a snapshot); the follower
        is ready with it at once, before the broker answers, and reads on from those offsets
        instead of bootstrapping. `trusted_until`: the wall time after which reading on from
        there could miss tombstones (the snapshot's time + the topic's delete.retention.ms);
        past it the follower bootstraps at first contact, serving the snapshot meanwhile.
        `claim`, `signatures`: the latest writer claim the snapshot's reader had read (the log it
        was taken from, the fencing token) and its last records, to tell that log from a reset or
        foreign one (then the follower holds the snapshot static) and to go on skipping stale records."""
        self.kafka = kafka
        self.ready = asyncio.Event()  # set once: bootstrapped to the end offsets read at start
        self.view = RangeSet()
        self.index = Index()
        self.offsets: dict[int, int] = {}  # next view offset to read, per partition
        self.applied_offsets: dict[int, int] = {}  # next view offset whose effect is not in `view` yet
        self.end_offsets: dict[int, int] = {}  # as last read from the broker
        self.applied_command: int | None = None  # highest command-offset applied
        self.commands_end: int | None = None  # the commands topic's end offset, as last read
        self.poison = 0
        self.records_applied = 0
        self.last_update: float | None = None  # wall time of the last applied record
        self.last_contact: float | None = None  # monotonic time the broker last answered
        self.propagation: deque[float] = deque(maxlen=10_000)  # command published -> applied, seconds
        if isinstance(claim, Mapping):
            claim = Claim.parse(int(claim["offset"]), json.dumps(dict(claim)).encode())
        self.log_id = claim.log_id if claim is not None else None  # the log this view was read from
        self.static: str | None = None  # why this follower holds its view static, or None
        self.kafka_problem: str | None = None  # why the broker cannot be used now (retrying), or None
        self.signatures: dict[int, Signature] = dict(signatures or {})
        self.rules = ViewRules(self, claim)
        self._stale_before = 0  # stale records counted by earlier rules (before a bootstrap)
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._status_interval_s = status_interval_s
        self._create_topics = create_topics
        self._pending: list = []
        self._pending_since = 0.0
        self._stopping = asyncio.Event()
        self._applied_event = asyncio.Event()
        self._adopt = asyncio.Event()
        if initial is not None:
            view, offsets = initial
            self.view, self.index = view, Index.build(view.ranges())
            self.offsets, self.applied_offsets = dict(offsets), dict(offsets)
            self.ready.set()
        self._check_start = initial is not None
        self._trusted_until = trusted_until

    @classmethod
    def inherit(cls, parent: Follower) -> Follower:
        """In a worker just forked from the supervisor: a follower that goes on from the parent's state.

        The view and the index are the parent's very objects, shared copy-on-write with the
        supervisor and every other worker: nothing is rebuilt or copied, so the worker is ready
        at once, and it owns only the pages the records it applies touch. The events are new (the
        parent's belong to an event loop that does not run here). The reader rules go on from the
        parent's claim, stale count and last records, so a stale record stays stale, and a reset or
        foreign log found when this follower connects holds the inherited view static (invariant 7).
        """
        child = cls(parent.kafka, claim=parent.rules.claim, signatures=parent.signatures,
                    fetch_max_wait_ms=parent._fetch_max_wait_ms, status_interval_s=parent._status_interval_s,
                    create_topics=False)
        child.view, child.index = parent.view, parent.index
        child.offsets = dict(parent.offsets)
        child.applied_offsets = dict(parent.applied_offsets)
        child.end_offsets = dict(parent.end_offsets)
        child.applied_command, child.commands_end = parent.applied_command, parent.commands_end
        child.poison, child.records_applied = parent.poison, parent.records_applied
        child.last_update, child.last_contact = parent.last_update, parent.last_contact
        child.log_id, child.static = parent.log_id, parent.static
        child._stale_before = parent.stale
        child._pending, child._pending_since = list(parent._pending), parent._pending_since  # a command half read
        child._check_start, child._trusted_until = parent._check_start, parent._trusted_until
        if parent.ready.is_set():
            child.ready.set()
        if parent._adopt.is_set():
            child._adopt.set()
        return child

    # -- what the gateway reads -----------------------------------------------------------

    @property
    def lag(self) -> int | None:
        """View records the broker has that this follower has not applied (None before the first answer)."""
        if not self.end_offsets:
            return None
        return sum(max(0, end - self.applied_offsets.get(p, 0)) for p, end in self.end_offsets.items())

    @property
    def unenforced_commands(self) -> int | None:
        """Commands in the command topic that this view does not reflect yet (None before the first answer)."""
        if self.commands_end is None:
            return None
        done = -1 if self.applied_command is None else self.applied_command
        return max(0, self.commands_end - done - 1)

    @property
    def stale(self) -> int:
        """View records of a fenced writer skipped so far."""
        return self._stale_before + self.rules.stale

    @property
    def claim(self) -> Claim | None:
        """The latest writer claim read."""
        return self.rules.claim

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

    def adopt(self) -> None:
        """An operator's word: drop the held view for the log the topic holds now (bootstrap it)."""
        log.warning("follower: adopting the log the view topic holds now (operator request)")
        self._adopt.set()

    def stop(self) -> None:
        self._stopping.set()

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Bootstrap, then follow until stop(); survives broker outages, keeping the last state."""
        while not self._stopping.is_set():
            try:
                if self.static is not None and not self._adopt.is_set():
                    await self._hold_static()
                else:
                    await self._session()
            except asyncio.CancelledError:
                raise
            except KafkaAccessError as exc:  # one line naming the cause, also in status and metrics
                self.kafka_problem = str(exc)
                log.warning("follower: %s; reconnecting in 1 s (serving the last view)", exc)
                await self._sleep(1.0)
            except Exception as exc:  # noqa: BLE001 - the follower must outlive any broker trouble
                log.warning("follower: %r; reconnecting in 1 s (serving the last view)", exc)
                await self._sleep(1.0)

    def _go_static(self, reason: str) -> None:
        if self.static is None:
            log.error("follower: holding the view static: %s. It keeps enforcing the last view it had; "
                      "adopt the new log with `gateway ctl adopt` (POST /admin/adopt) or `materialize --new-log`",
                      reason)
            self.static = reason
        self._pending.clear()

    async def _session(self) -> None:
        if self._create_topics:
            await ensure_topics(self.kafka)
            self._create_topics = False
        consumer = log_reader(self.kafka, "gateway-follower", fetch_max_wait_ms=self._fetch_max_wait_ms,
                              reset="none")
        await consumer.start()
        self.kafka_problem = None
        status = None
        try:
            partitions = await partitions_of(consumer, self.kafka.ranges_topic)
            consumer.assign(partitions)
            adopting = self._adopt.is_set()
            if not self.ready.is_set() or adopting:
                await self._catch_up(consumer, partitions, protect=not adopting)
            elif self._check_start and self._trusted_until is not None and time.time() > self._trusted_until:
                log.warning("follower: the snapshot is older than delete.retention.ms now; bootstrapping")
                await self._catch_up(consumer, partitions, protect=True)
            else:
                problem = await self._log_problem(consumer, partitions)
                if problem is not None:
                    self._go_static(problem)
                    return
                for tp in partitions:
                    consumer.seek(tp, self.offsets.get(tp.partition, 0))
            self._check_start = False
            if self.static is not None:
                return
            status = asyncio.create_task(self._watch_end_offsets(partitions))
            try:
                await self._follow(consumer)
            except OffsetOutOfRangeError:
                self._go_static(await self._log_problem(consumer, partitions) or "our position is out of the view topic's range")
        finally:
            if status is not None:
                status.cancel()
                await asyncio.gather(status, return_exceptions=True)
            await consumer.stop()

    async def _log_problem(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> str | None:
        """Why reading on from our offsets would mix two logs, or None when it is the log we read."""
        for tp in partitions:
            position = self.offsets.get(tp.partition, 0)
            first, end = await true_end(consumer, tp)
            if position < first:
                return f"the view topic now starts at offset {first}, after our position {position} (reset or truncated)"
            if position > end:
                return f"the view topic now ends at offset {end}, before our position {position} (reset or recreated)"
            known = self.signatures.get(tp.partition)
            if position > 0 and known is not None and known[0] == position - 1:
                consumer.seek(tp, position - 1)
                batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
                found = batch.get(tp, [])
                if found and found[0].offset == position - 1 and signature(found[0]) != known:
                    return f"the record at offset {position - 1} is not the one this gateway read there (recreated log)"
        return None

    async def _catch_up(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition], *, protect: bool) -> None:
        """Read to the end offsets of now, then swap in the result and report ready.

        `protect`: when this follower holds a view of a known log, a view of another log is not
        swapped in unless its claim says an operator started it on purpose (new_log)."""
        started = time.monotonic()
        adopt = self._adopt.is_set()
        loader = ViewLoader(self)
        last: dict[int, object] = {}

        def collect(tp, records) -> None:
            for record in records:
                loader.add(record)
            if records:
                last[tp.partition] = records[-1]

        with cyclic_gc_paused():
            await consumer.seek_to_beginning(*partitions)
            ends = await read_to_end(consumer, partitions, collect)
            claim = loader.rules.claim
            if protect and self.ready.is_set() and self.log_id is not None and (
                    claim is None or (claim.log_id != self.log_id and not claim.new_log)):
                self._go_static(f"the view topic now holds log {claim.log_id if claim else '(no claim)'}, "
                                f"this gateway holds log {self.log_id}")
                return
            view = loader.load()
            index = Index.build(view.ranges())
        self._pending.clear()
        self.view, self.index = view, index  # one swap: requests see the old or the new, whole
        self._stale_before += self.rules.stale
        self.rules = loader.rules
        self.log_id = claim.log_id if claim is not None else None
        self.static = None
        if adopt:
            self._adopt.clear()
            self.applied_command = loader.applied
        elif loader.applied is not None:
            self.applied_command = max(loader.applied, -1 if self.applied_command is None else self.applied_command)
        if len(view):
            self.last_update = time.time()
        for tp in partitions:
            self.offsets[tp.partition] = await consumer.position(tp)
        self.signatures = {p: signature(r) for p, r in last.items()}
        self.applied_offsets = dict(self.offsets)
        self.end_offsets = {tp.partition: end for tp, end in ends.items()}
        self.last_contact = time.monotonic()
        self.ready.set()
        self._applied_event.set()
        log.info("follower ready: %d ranges in %.2f s (log %s)", len(self.view), time.monotonic() - started,
                 self.log_id)

    async def _hold_static(self) -> None:
        """Keep the view; look at the log now there until it is a deliberate new log or an operator says adopt."""
        reader = log_reader(self.kafka, "gateway-follower-static")
        await reader.start()
        try:
            partitions = await partitions_of(reader, self.kafka.ranges_topic)
            reader.assign(partitions)
            loader = ViewLoader(_Discard())
            await reader.seek_to_beginning(*partitions)
            while self.static is not None and not self._adopt.is_set() and not self._stopping.is_set():
                ends = await read_to_end(reader, partitions, lambda tp, records: [loader.add(r) for r in records])
                self.end_offsets = {tp.partition: end for tp, end in ends.items()}
                self.last_contact = time.monotonic()
                claim = loader.rules.claim
                if claim is not None and claim.new_log and claim.log_id != self.log_id:
                    log.warning("follower: the view topic holds log %s, started with --new-log: adopting it",
                                claim.log_id)
                    self._adopt.set()
                    break
                await self._sleep_or_adopt(STATIC_POLL_S)
        finally:
            await reader.stop()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set() and self.static is None and not self._adopt.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
            for tp, records in batch.items():
                self._apply_batch(tp, records)
                if self.static is not None:
                    return
            if self._pending and time.monotonic() - self._pending_since > STALE_PENDING_S:
                self._flush()

    def _apply_batch(self, tp: TopicPartition, records) -> None:
        """Run the reader rules; buffer a command's records and apply them together when its `last` arrives."""
        partition = tp.partition
        for record in records:
            entry = self.rules.read(record)
            if self.rules.unknown_writer is not None:
                self._go_static(f"the record at offset {record.offset} names writer claim {self.rules.unknown_writer}, "
                                "which this gateway never read: another log now fills the view topic")
                return
            if entry is None:  # stale or poison: skipped, counted, logged
                self._advance(partition, record)
                continue
            if isinstance(entry, Claim):
                self._flush()  # what the writer before it wrote is part of the view the new writer read
                self._advance(partition, record)
                if self.log_id is not None and entry.log_id != self.log_id and not entry.new_log:
                    self._go_static(f"a writer claim at offset {entry.offset} names log {entry.log_id}, "
                                    f"this gateway holds log {self.log_id}")
                    return
                self.log_id = entry.log_id
                if entry.refold:  # rebuilt from the whole command log: a forged tag before it counts no more
                    self.applied_command = None
                continue
            tag = header(record.headers, "command-offset")
            if self._pending and tag != header(self._pending[0][0].headers, "command-offset"):
                self._flush()  # the previous command ended without `last`: its writer died
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append((record, entry))
            self.offsets[partition] = record.offset + 1
            self.signatures[partition] = signature(record)
            if tag is None or header(record.headers, "last") is not None:
                self._flush()

    def _advance(self, partition: int, record) -> None:
        self.offsets[partition] = record.offset + 1
        self.signatures[partition] = signature(record)
        if not self._pending:
            self.applied_offsets[partition] = record.offset + 1

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if not records:
            return
        view, index = self.view, self.index
        for _record, span in records:
            index.update(view.put(span.version, span.start, span.end))
        self.records_applied += len(records)
        self.applied_offsets.update(self.offsets)  # skipped records read meanwhile count as applied
        now = time.time()
        self.last_update = now
        final = records[-1][0]
        tag = header(final.headers, "command-offset")
        if tag is not None and tag.isdigit():
            self.applied_command = max(int(tag), self.applied_command if self.applied_command is not None else -1)
        if self.ready.is_set():
            sample = max(0.0, now - final.timestamp / 1000)
            self.propagation.append(sample)
        self._applied_event.set()

    async def _watch_end_offsets(self, partitions: list[TopicPartition]) -> None:
        """Refresh end offsets (lag, unenforced commands) and the time of last contact; a frozen broker
        just stops answering. A position past the end or before the start is checked: fail static."""
        commands = TopicPartition(self.kafka.commands_topic, 0)
        probe = log_reader(self.kafka, "gateway-follower-status")
        await probe.start()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._refresh(probe, partitions, commands),
                                           timeout=max(2.0, self._status_interval_s * 2))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported as staleness, never fatal
                    log.debug("follower: end offsets unavailable: %r", exc)
                await asyncio.sleep(self._status_interval_s)
        finally:
            await probe.stop()

    async def _refresh(self, probe: AIOKafkaConsumer, partitions: list[TopicPartition], commands: TopicPartition) -> None:
        ends = await probe.end_offsets(partitions)
        firsts = await probe.beginning_offsets(partitions)
        self.end_offsets = {tp.partition: end for tp, end in ends.items()}
        self.last_contact = time.monotonic()
        if any(not firsts[tp] <= self.offsets.get(tp.partition, 0) <= ends[tp] for tp in partitions):
            probe.assign(partitions)  # Tansu's end offset may lag the true end: look before alarming
            problem = await self._log_problem(probe, partitions)
            if problem is not None:
                self._go_static(problem)
        if probe.partitions_for_topic(commands.topic) is None:
            await probe.topics()
        if probe.partitions_for_topic(commands.topic):  # Tansu's end may lag by a batch: it only under-counts
            self.commands_end = (await probe.end_offsets([commands]))[commands]

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _sleep_or_adopt(self, seconds: float) -> None:
        waiters = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._adopt.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bootstrap (reference counting still frees).

    A bootstrap holds the fetched batches' records (tuples, tracked) while they are read, so
    they outlive the young generations and keep triggering full collections that walk the
    whole heap: ~30% of a bootstrap's CPU (bench/RESULTS.md, issue 16). What the read left
    cyclic (aiokafka's fetch buffers held by a cycle) is collected once at the end, before the
    view is swapped in: the supervisor freezes its heap before it forks the workers, and
    garbage frozen there would never be freed. Then collection resumes as it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if enabled:
            gc.enable()


class _Discard:
    """A poison counter for reads that only look (the static follower's scan)."""

    poison = 0
