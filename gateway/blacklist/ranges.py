"""The blacklist as a set of address ranges, and the view records that change it.

A `RangeSet` holds, per address family, the ranges of the view topic as stored: first
address -> last address. Folded by `apply`, it stays canonical (disjoint, never
adjacent), and every command costs O(log n + ranges it touches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import repeat

from sortedcontainers import SortedDict

from .addresses import LAST, format_address, parse_address
from .commands import BLACKLIST, Command

Record = tuple[str, str | None]
"""A view record: (first address, last address), or (first address, None) for a tombstone."""

Change = tuple[int, int, int | None, int | None]
"""What one view record did: (version, first address, old last or None, new last or None)."""

Span = tuple[int, int]


class RangeSet:
    __slots__ = ("_spans", "_addresses")

    def __init__(self) -> None:
        self._spans: dict[int, SortedDict] = {4: SortedDict(), 6: SortedDict()}
        self._addresses = {4: 0, 6: 0}

    @classmethod
    def from_view(cls, records: Iterable[Record], on_error: Callable[[Record, ValueError], None] | None = None) -> RangeSet:
        """Load the stored ranges of a view at once (bootstrap): much faster than `store` per record.

        `records` holds the last value of each key (tombstones may be included). Malformed
        records are skipped and passed to `on_error`.
        """
        ranges = cls()
        loaded: dict[int, list[Span]] = {4: [], 6: []}
        for record in records:
            key, value = record
            if value is None:
                continue
            try:
                version, start, end = _parse_range(key, value)
            except ValueError as exc:
                if on_error is not None:
                    on_error(record, exc)
                continue
            loaded[version].append((start, end))
        for version, spans in loaded.items():
            ranges._spans[version] = SortedDict(spans)
            ranges._addresses[version] = sum(end - start + 1 for start, end in spans)
        return ranges

    @classmethod
    def from_spans(cls, spans: Iterable[tuple[int, int, int]]) -> RangeSet:
        """Load parsed stored ranges (version, first, last), one per first address, at once."""
        ranges = cls()
        loaded: dict[int, list[Span]] = {4: [], 6: []}
        for version, start, end in spans:
            loaded[version].append((start, end))
        for version, found in loaded.items():
            ranges._spans[version] = SortedDict(found)
            ranges._addresses[version] = sum(end - start + 1 for start, end in found)
        return ranges

    # -- folding commands (the materializer) --------------------------------------

    def apply(self, command: Command) -> list[Record]:
        """Fold one command in; return the view records that change, in no-hole order."""
        version, lo, hi = command.version, command.first, command.last
        if command.action == BLACKLIST:
            # Touching ranges merge, so look one address beyond each end.
            old = self._overlapping(version, max(lo - 1, 0), min(hi + 1, LAST[version]))
            new = [(min(lo, old[0][0]), max(hi, old[-1][1]))] if old else [(lo, hi)]
        else:
            old = self._overlapping(version, lo, hi)
            new = []
            if old and old[0][0] < lo:
                new.append((old[0][0], lo - 1))
            if old and old[-1][1] > hi:
                new.append((hi + 1, old[-1][1]))
        return self._replace(version, dict(old), dict(new))

    def reconcile(self, command: Command | None = None) -> list[Record]:
        """Make the stored view canonical again, with `command` re-applied.

        After a crash the stored view may hold half of a command's records: extra keys,
        overlaps. The diff is taken against the view as stored, so leftovers are
        corrected or tombstoned; re-applying the command is idempotent.
        """
        target = RangeSet()
        for version, start, end in self.ranges():
            target._union(version, start, end)
        if command is not None:
            target.apply(command)
        return self.become(target)

    def become(self, target: RangeSet) -> list[Record]:
        """Turn this stored view into `target` (canonical); return the records, coverage added first.

        The diff is against the view as stored: keys `target` does not hold are tombstoned."""
        records: list[Record] = []  # families never share addresses: order only within one
        for version in (4, 6):
            records += self._replace(version, dict(self._spans[version]), dict(target._spans[version]))
        return records

    # -- storing view records (followers, recovery) -------------------------------

    def store(self, key: str, value: str | None) -> Change:
        """Set one view record as the topic stores it; raise ValueError if it is malformed."""
        if value is None:
            version, start = parse_address(key)
            end = None
        else:
            version, start, end = _parse_range(key, value)
        return self.put(version, start, end)

    def put(self, version: int, start: int, end: int | None) -> Change:
        """Set one parsed view record (end None: tombstone); return what it changed."""
        old = self._spans[version].get(start)
        self._set(version, start, end)
        return version, start, old, end

    def get(self, version: int, start: int) -> int | None:
        """The stored last address of the range that starts at `start`, if any."""
        return self._spans[version].get(start)

    # -- queries ------------------------------------------------------------------

    def ranges(self, version: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Yield (version, first, last) in address order, IPv4 before IPv6."""
        for v in (4, 6) if version is None else (version,):
            spans = self._spans[v]
            # keys in order, values by dict's own lookup: SortedDict.items() yields from a Python
            # generator, ~1.4 µs a range, which made Index.build of a 1M view wait >1 s on it
            yield from zip(repeat(v), spans, map(spans.__getitem__, spans))

    def find(self, version: int, value: int) -> Span | None:
        """The stored range holding an address, if any."""
        spans = self._spans[version]
        i = spans.bisect_right(value) - 1
        if i >= 0:
            start, end = spans.peekitem(i)
            if end >= value:
                return start, end
        return None

    def count(self, version: int) -> int:
        return len(self._spans[version])

    def addresses(self, version: int) -> int:
        """How many addresses the stored ranges cover (overlaps counted twice)."""
        return self._addresses[version]

    def __len__(self) -> int:
        return len(self._spans[4]) + len(self._spans[6])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return all(self._spans[v] == other._spans[v] for v in (4, 6))

    def __repr__(self) -> str:
        shown = ", ".join(f"{format_address(v, s)}-{format_address(v, e)}" for v, s, e in self.ranges())
        return f"RangeSet({shown})"

    # -- internals ----------------------------------------------------------------

    def _overlapping(self, version: int, lo: int, hi: int) -> list[Span]:
        """Stored ranges that share an address with [lo, hi], assuming a canonical set."""
        spans = self._spans[version]
        found = []
        i = spans.bisect_right(lo) - 1
        if i >= 0 and spans.peekitem(i)[1] >= lo:
            found.append(spans.peekitem(i))
        found += ((start, spans[start]) for start in spans.irange(lo, hi, inclusive=(False, True)))
        return found

    def _union(self, version: int, start: int, end: int) -> None:
        """Add a range that may overlap what is there (canonical input not required)."""
        spans = self._spans[version]
        i = spans.bisect_right(start) - 1
        if i >= 0 and spans.peekitem(i)[1] >= start - 1:
            start, prev_end = spans.peekitem(i)
            end = max(end, prev_end)
        for key in list(spans.irange(start, end + 1)):
            end = max(end, spans[key])
            self._set(version, key, None)
        self._set(version, start, end)

    def _replace(self, version: int, old: dict[int, int], new: dict[int, int]) -> list[Record]:
        """Swap the ranges `old` for `new`; return the records, coverage added first."""
        grow: list[Record] = []
        shrink: list[Record] = []
        text = format_address
        for start, end in new.items():
            was = old.get(start)
            if was == end:
                continue
            (grow if was is None or end > was else shrink).append((text(version, start), text(version, end)))
            self._set(version, start, end)
        gone = [start for start in old if start not in new]
        for start in gone:
            self._set(version, start, None)
        return grow + shrink + [(text(version, start), None) for start in gone]

    def _set(self, version: int, start: int, end: int | None) -> None:
        spans = self._spans[version]
        old = spans.pop(start, None)
        if old is not None:
            self._addresses[version] -= old - start + 1
        if end is not None:
            spans[start] = end
            self._addresses[version] += end - start + 1


def _parse_range(key: str, value: str) -> tuple[int, int, int]:
    version, start = parse_address(key)
    end_version, end = parse_address(value)
    if end_version != version or end < start:
        raise ValueError(f"bad view record {key!r} = {value!r}: not a range")
    return version, start, end


def fold(commands: Iterable[Command]) -> RangeSet:
    """The range set a sequence of commands leaves, in order (the time machine's fold)."""
    ranges = RangeSet()
    for command in commands:
        ranges.apply(command)
    return ranges
