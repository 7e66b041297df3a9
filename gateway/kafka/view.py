"""Reading the view topic into a RangeSet: what followers and the materializer's recovery share.

Poison view records (no key, not UTF-8, not a range) are skipped, counted on the reader's
`poison` attribute and logged with their offset; they never stop a reader.
"""

from __future__ import annotations

import logging

from aiokafka.structs import ConsumerRecord

from ..blacklist.ranges import Change, RangeSet
from .topics import PoisonCounter

log = logging.getLogger("gateway.view")


def store_view_record(view: RangeSet, record: ConsumerRecord, counter: PoisonCounter) -> Change | None:
    """Store one view record as the topic holds it; count and log it as poison when malformed."""
    try:
        if record.key is None:
            raise ValueError("no key")
        value = record.value.decode() if record.value is not None else None
        return view.store(record.key.decode(), value)
    except (ValueError, UnicodeDecodeError) as exc:
        counter.poison += 1
        log.warning("skipping poison view record at offset %d: %s", record.offset, exc)
        return None


class ViewLoader:
    """Collects a whole view (last value per key wins, as compaction would leave it) and loads it
    in one pass with RangeSet.from_view: the bootstrap path, much faster than storing each record.

    A malformed record counts as poison; unlike `store`, it also hides an earlier value of its key.
    """

    def __init__(self, counter: PoisonCounter) -> None:
        self.latest: dict[bytes, bytes | None] = {}
        self._counter = counter

    def add(self, record: ConsumerRecord) -> None:
        if record.key is None:
            self._counter.poison += 1
            log.warning("skipping poison view record at offset %d: no key", record.offset)
        else:
            self.latest[record.key] = record.value

    def load(self) -> RangeSet:
        def poison(record, exc) -> None:
            self._counter.poison += 1
            log.warning("skipping poison view record %r = %r: %s", record[0], record[1], exc)

        records = (
            (key.decode(errors="replace"), value.decode(errors="replace") if value is not None else None)
            for key, value in self.latest.items()
        )
        return RangeSet.from_view(records, on_error=poison)
