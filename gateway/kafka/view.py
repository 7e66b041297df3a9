"""Reading the view topic: the reader rules every reader shares (DESIGN invariants 6, 7 and 10).

Record by record, in log order:
- a record keyed `__writer__` is a writer claim: its offset is the fencing token of the writer
  that appended it, its JSON value names the log (`log_id`) and the commands topic it folds;
- a data record written after a claim must carry `writer` = that claim's offset; one with an
  older (or no, or any other) writer was written by a writer that had lost the role: it is
  stale, skipped and counted. Records before the first claim read are the pre-claim format;
- a data record whose key or value is not the canonical text of an address, or that is not a
  range, is poison: skipped, counted, logged with its offset. A tombstone of a key that is
  no canonical address removes nothing anyone holds: it is ignored (the writer's repair).

Skipped records never change what a reader holds, whether it bootstraps (ViewLoader, last
value per key) or follows record by record (ViewRules.read then RangeSet.put): both paths
end with the same ranges. Each key whose last record was skipped is remembered (`bad_keys`)
so a writer can re-publish its own value for it: compaction would otherwise keep it.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import uuid
from dataclasses import asdict, dataclass
from typing import Union

from aiokafka.structs import ConsumerRecord

from ..blacklist.addresses import format_address, parse_address
from ..blacklist.ranges import RangeSet
from .topics import PoisonCounter, header

log = logging.getLogger("gateway.view")

CLAIM_KEY = b"__writer__"


@dataclass(frozen=True)
class Claim:
    """A writer claim as stored: its offset is the writer's fencing token."""

    offset: int
    log_id: str
    commands_topic: str
    new_log: bool = False  # an operator started this log on purpose (`materialize --new-log`)
    refold: bool = False  # this writer rebuilt the view from the whole command log

    def value(self) -> bytes:
        body = asdict(self)
        del body["offset"]
        return json.dumps(body, sort_keys=True).encode()

    @staticmethod
    def parse(offset: int, value: bytes | None) -> Claim:
        """Raise ValueError when the value is not a claim."""
        body = json.loads(value or b"")
        if not isinstance(body, dict) or not isinstance(body.get("log_id"), str) or not body["log_id"]:
            raise ValueError("claim without a log_id")
        return Claim(offset, body["log_id"], str(body.get("commands_topic", "")),
                     bool(body.get("new_log", False)), bool(body.get("refold", False)))


def new_log_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Span:
    """A data record as parsed: (version, first address, last address or None for a tombstone)."""

    version: int
    start: int
    end: int | None


Entry = Union[Claim, Span, None]

_MISSING = object()  # a header not found (a header may be there with a null value)


def canonical(text: str) -> tuple[int, int]:
    """Parse an address that must be in canonical text (`2001:db8::`, never `2001:DB8::`)."""
    version, value = parse_address(text)
    if format_address(version, value) != text:
        raise ValueError(f"not the canonical text of an address: {text!r}")
    return version, value


_inet_pton, _inet_ntop, _inet_ntoa = socket.inet_pton, socket.inet_ntop, socket.inet_ntoa
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def _ntop_is_canonical() -> bool:
    """Whether the C library's inet_ntop writes IPv6 as `ipaddress` does, wherever `_quick` trusts it.

    Outside the addresses whose top 80 bits are zero (where libcs may embed dotted IPv4 and
    Python 3.13 writes mapped addresses dotted; `_quick` never trusts those), both write each
    16-bit group in lowercase hex without leading zeros and differ, if at all, only in which
    run of zero groups they compress: that depends on which groups are zero alone. So one
    address per pattern of zero groups (256) checks every case; any difference turns the
    quick path off and every address takes `canonical`."""
    rng = random.Random(16)
    for pattern in range(256):
        groups = [0 if pattern >> i & 1 else rng.choice((1, 0xa, 0xbc, 0xdef, 0xffff, rng.randrange(1, 1 << 16)))
                  for i in range(8)]
        value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
        if value >> 48 and _inet_ntop(_AF_INET6, value.to_bytes(16, "big")) != format_address(6, value):
            return False
    return True


_NTOP_CANONICAL = _ntop_is_canonical()


def _quick(text: str) -> tuple[int, int] | None:
    """`canonical(text)` by the C library alone, for the common case; None when unsure (then the
    caller asks `canonical`, which decides). Never accepts a text `canonical` would refuse:
    IPv4 is parsed and written exactly as `canonical` does it (inet_pton, inet_ntoa); IPv6 is
    trusted only where `_ntop_is_canonical` found inet_ntop equal to `ipaddress`."""
    try:
        if ":" not in text:
            packed = _inet_pton(_AF_INET, text)
            return (4, int.from_bytes(packed, "big")) if _inet_ntoa(packed) == text else None
        if _NTOP_CANONICAL and "." not in text:
            packed = _inet_pton(_AF_INET6, text)
            value = int.from_bytes(packed, "big")
            if value >> 48 and _inet_ntop(_AF_INET6, packed) == text:
                return 6, value
    except (OSError, ValueError, TypeError):
        pass
    return None


def _address(text: str) -> tuple[int, int]:
    """`canonical(text)`, the quick way when it can."""
    return _quick(text) or canonical(text)


class ViewRules:
    """The reader rules, applied to one reader's records in log order. Counts what it skips:
    `counter.poison` for malformed records, `stale` for records of a fenced writer."""

    def __init__(self, counter: PoisonCounter, claim: Claim | None = None) -> None:
        self.claim = claim  # the latest claim read (also sets `token`)
        self.stale = 0
        self.bad_keys: set[bytes] = set()  # keys whose last record was skipped (to repair)
        self.unknown_writer: int | None = None  # a writer newer than any claim read: another log
        self._counter = counter

    @property
    def claim(self) -> Claim | None:
        """The latest claim read."""
        return self._claim

    @claim.setter
    def claim(self, claim: Claim | None) -> None:
        self._claim = claim
        # the `writer` header a valid record carries, encoded once per claim rather than per record
        self.token: bytes | None = None if claim is None else str(claim.offset).encode()

    def read(self, record: ConsumerRecord) -> Entry:
        """The claim or data the record carries, or None when it must be skipped."""
        key = record.key
        if key == CLAIM_KEY:
            try:
                self.claim = Claim.parse(record.offset, record.value)
            except (ValueError, UnicodeDecodeError) as exc:
                return self._poison(record, f"bad writer claim: {exc}")
            return self.claim
        if self.claim is not None:
            writer = header(record.headers, "writer")
            if writer != self.token:
                if writer is not None and writer.isdigit() and int(writer) > self.claim.offset:
                    self.unknown_writer = int(writer)
                self.stale += 1
                if key is not None:
                    self.bad_keys.add(key)
                log.warning("skipping stale view record at offset %d: writer %s, latest claim at offset %d",
                            record.offset, writer.decode(errors="replace") if writer else "missing", self.claim.offset)
                return None
        if key is None:
            return self._poison(record, "no key")
        try:
            text = key.decode()
            if record.value is None:
                try:
                    version, start = _address(text)
                except ValueError:
                    self.bad_keys.discard(key)
                    return None  # a tombstone of a non-address: removes nothing
                span = Span(version, start, None)
            else:
                version, start = _address(text)
                end_version, end = _address(record.value.decode())
                if end_version != version or end < start:
                    raise ValueError(f"{text!r} = {record.value.decode()!r} is not a range")
                span = Span(version, start, end)
        except (ValueError, UnicodeDecodeError) as exc:
            self.bad_keys.add(key)
            return self._poison(record, str(exc))
        self.bad_keys.discard(key)
        return span

    def _poison(self, record: ConsumerRecord, why: str) -> None:
        self._counter.poison += 1
        log.warning("skipping poison view record at offset %d: %s", record.offset, why)
        return None


def repair_records(view: RangeSet, keys: set[bytes]) -> list[tuple[str, str | None]]:
    """The records that make `view` again the last record of every key in `keys`: its own
    value where it holds one, else a tombstone."""
    records = []
    for key in sorted(keys):
        text = key.decode(errors="replace")
        try:
            version, start = canonical(key.decode())
        except (ValueError, UnicodeDecodeError):
            records.append((text, None))
            continue
        end = view.get(version, start)
        records.append((text, None if end is None else format_address(version, end)))
    return records


class ViewLoader:
    """Collects a whole view (the last valid value per key, as compaction would leave it once
    the writer repaired what was skipped) and loads it in one pass: the bootstrap path, much
    faster than storing each record. Also tracks the highest command of the view and whether
    its `last` record is there (the materializer's checkpoint)."""

    def __init__(self, counter: PoisonCounter, claim: Claim | None = None) -> None:
        self.rules = ViewRules(counter, claim)
        self.latest: dict[tuple[int, int], int | None] = {}
        self.highest: int | None = None  # highest command-offset of a record read
        self.complete = False  # whether that command's `last` record was read
        self.applied: int | None = None  # highest command-offset of a `last` record read
        self.claims: list[Claim] = []

    def add(self, record: ConsumerRecord) -> None:
        """Read one record by the reader rules; keep its value and its command's progress.

        The common record, a range written under the latest claim, takes a fast path: the
        headers read in one pass and the addresses checked by the C library alone. It keeps
        a record only where `rules.read` would return its Span, and leaves the same state
        behind; anything else (a claim, a tombstone, a stale or poison record, a text it is
        not sure of) goes untouched to the full rules (`_add`)."""
        key, value, headers = record.key, record.value, record.headers
        if key is None or value is None or key == CLAIM_KEY:
            return self._add(record)
        try:  # the materializer's shape for a command's only or final record
            (writer_name, writer), (tag_name, tag), (last_name, last) = headers
            if writer_name != "writer" or tag_name != "command-offset" or last_name != "last":
                raise ValueError
        except ValueError:  # any other: the first header of each name, as `header()` finds it
            writer = tag = last = _MISSING
            for name, data in headers:
                if name == "writer":
                    if writer is _MISSING:
                        writer = data
                elif name == "command-offset":
                    if tag is _MISSING:
                        tag = data
                elif name == "last" and last is _MISSING:
                    last = data
            if last is _MISSING:
                last = None
        rules = self.rules
        if rules._claim is not None and writer != rules.token:
            return self._add(record)
        try:
            text, end_text = key.decode(), value.decode()
            if ":" not in text:  # IPv4 exactly as `canonical` checks it: parsed, written back, compared
                packed, end_packed = _inet_pton(_AF_INET, text), _inet_pton(_AF_INET, end_text)
                if _inet_ntoa(packed) != text or _inet_ntoa(end_packed) != end_text:
                    return self._add(record)
                version, start, end = 4, int.from_bytes(packed, "big"), int.from_bytes(end_packed, "big")
            else:
                first, final = _quick(text), _quick(end_text)
                if first is None or final is None or final[0] != 6:
                    return self._add(record)
                version, start, end = 6, first[1], final[1]
        except (UnicodeDecodeError, OSError, ValueError, TypeError):
            return self._add(record)
        if end < start:
            return self._add(record)
        if rules.bad_keys:
            rules.bad_keys.discard(key)
        self.latest[(version, start)] = end
        if tag is not _MISSING and tag is not None and tag.isdigit():
            self._progress(int(tag), last is not None)

    def _progress(self, offset: int, last: bool) -> None:
        """A record of command `offset` was read (`last`: that command's final record)."""
        if self.highest is None or offset > self.highest:
            self.highest, self.complete = offset, last
        elif offset == self.highest:
            self.complete = self.complete or last
        if last and (self.applied is None or offset > self.applied):
            self.applied = offset

    def _add(self, record: ConsumerRecord) -> None:
        """`add` by the full rules."""
        entry = self.rules.read(record)
        if isinstance(entry, Claim):
            self.claims.append(entry)
            if entry.refold:  # the view is rebuilt from the whole command log: earlier tags count no more
                self.highest, self.complete, self.applied = None, False, None
        elif entry is not None:
            self.latest[(entry.version, entry.start)] = entry.end
            tag = header(record.headers, "command-offset")
            if tag is not None and tag.isdigit():
                self._progress(int(tag), header(record.headers, "last") is not None)

    def load(self) -> RangeSet:
        return RangeSet.from_spans((v, s, e) for (v, s), e in self.latest.items() if e is not None)
