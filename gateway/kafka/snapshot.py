"""Snapshot file of the view (--snapshot PATH): a restarted gateway serves at once, then catches up.

The file holds the view records as stored, the next offset per view partition, the time it
was written and the view topic's delete.retention.ms at that time. It is trusted only while
younger than that retention (docs/ARCHITECTURE.md, invariant 5): a follower that resumes from older
offsets could miss tombstones that compaction already removed. The retention travels in the
file so a gateway whose broker is down can still decide. Written atomically (temp file,
fsync, rename, fsync of the directory): a crash leaves the old snapshot or the new one.

Format: one JSON header line, then one `first last` line per stored range.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..blacklist.addresses import format_address
from .config import KafkaConfig
from .topics import delete_retention_ms

log = logging.getLogger(__name__)

FORMAT = "gateway-view-snapshot/1"


class SnapshotError(ValueError):
    """A snapshot file that cannot be used; the message says why (it is then ignored)."""


@dataclass
class Snapshot:
    topic: str
    written_at: float
    delete_retention_ms: int
    offsets: dict[int, int]
    records: list[tuple[str, str]] = field(repr=False)
    claim: dict | None = None  # the latest writer claim read (offset, log_id, ...): the log and the fencing token
    signatures: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # the last record read, per partition

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.written_at

    def fresh(self, now: float | None = None) -> bool:
        """Younger than the topic's delete.retention.ms: no tombstone it needs can be gone yet."""
        return self.age(now) < self.delete_retention_ms / 1000.0


def write(
    path: str | os.PathLike,
    *,
    topic: str,
    ranges: Iterable[tuple[int, int, int]],
    offsets: dict[int, int],
    delete_retention_ms: int,
    written_at: float | None = None,
    claim: dict | None = None,
    signatures: dict[int, tuple[int, int, int]] | None = None,
) -> None:
    """Write a snapshot atomically. `ranges`, `offsets` and `signatures` must describe the same moment."""
    path = Path(path)
    header = {
        "format": FORMAT,
        "topic": topic,
        "written_at": time.time() if written_at is None else written_at,
        "delete_retention_ms": delete_retention_ms,
        "offsets": {str(p): o for p, o in offsets.items()},
        "claim": claim,
        "signatures": {str(p): list(sig) for p, sig in (signatures or {}).items()},
    }
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="ascii") as out:
            out.write(json.dumps(header) + "\n")
            text = format_address
            out.writelines(f"{text(v, s)} {text(v, e)}\n" for v, s, e in ranges)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read(path: str | os.PathLike) -> Snapshot:
    """Read a snapshot file; raise SnapshotError (or OSError) when it cannot be used."""
    with open(path, encoding="ascii", errors="strict") as file:
        try:
            header = json.loads(file.readline())
            if header.get("format") != FORMAT:
                raise SnapshotError(f"{path}: not a {FORMAT} file")
            snapshot = Snapshot(
                topic=str(header["topic"]),
                written_at=float(header["written_at"]),
                delete_retention_ms=int(header["delete_retention_ms"]),
                offsets={int(p): int(o) for p, o in header["offsets"].items()},
                records=[],
                claim=header.get("claim"),
                signatures={int(p): tuple(int(x) for x in sig) for p, sig in header.get("signatures", {}).items()},
            )
            for number, line in enumerate(file, start=2):
                first, sep, last = line.rstrip("\n").partition(" ")
                if not sep:
                    raise SnapshotError(f"{path}: line {number} is not 'first last'")
                snapshot.records.append((first, last))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"{path}: unreadable snapshot ({exc})") from None
    return snapshot


def load(path: str | os.PathLike, topic: str, now: float | None = None) -> Snapshot | None:
    """The snapshot to start from, or None (logged, with the reason) when there is none to trust."""
    try:
        snapshot = read(path)
    except FileNotFoundError:
        log.info("no snapshot yet; bootstrapping from the topic", extra={"snapshot": str(path)})
        return None
    except (OSError, SnapshotError) as exc:
        log.warning("ignoring snapshot: %s", exc, extra={"snapshot": str(path)})
        return None
    if snapshot.topic != topic:
        log.warning("ignoring snapshot of another topic %r", snapshot.topic, extra={"snapshot": str(path)})
        return None
    if not snapshot.fresh(now):
        log.warning(
            "ignoring stale snapshot: %.0f s old, older than the topic's delete.retention.ms (%d ms)",
            snapshot.age(now), snapshot.delete_retention_ms, extra={"snapshot": str(path)},
        )
        return None
    return snapshot


async def keep_writing(path: str | os.PathLike, follower: Any, kafka: KafkaConfig, *, interval_s: float = 30.0) -> None:
    """Task (one per gateway: the supervisor's): write the follower's view whenever it moved on.

    Checks every `interval_s`, and once more when cancelled (a clean stop leaves a fresh file).
    The view and offsets are copied in one synchronous step, while no command is half applied;
    the file is written in a thread. Never while the follower holds its view static on a reset
    or foreign log (invariant 7): the file keeps the last view of the log it trusted.
    """
    retention: int | None = None
    # Ready at start means started from this very file: nothing to write until the view moves on
    # (rewriting it would make an old view look freshly read).
    written: dict[int, int] | None = dict(follower.applied_offsets) if follower.ready.is_set() else None
    loop = asyncio.get_running_loop()

    async def write_if_moved() -> None:
        nonlocal retention, written
        if retention is None:
            try:
                retention = await asyncio.wait_for(delete_retention_ms(kafka), 10)
            except Exception as exc:  # noqa: BLE001 - broker down: try again next time
                log.info("snapshot: topic retention unknown yet (%r); not writing", exc)
                return
        if not follower.ready.is_set() or follower.static is not None:
            return
        offsets = dict(follower.applied_offsets)  # the view holds exactly the records before these
        if offsets == written:
            return
        ranges = list(follower.view.ranges())
        started = time.monotonic()
        await loop.run_in_executor(None, functools.partial(
            write, path, topic=kafka.ranges_topic, ranges=ranges, offsets=offsets, delete_retention_ms=retention,
            **identity(follower, offsets)))
        written = offsets
        log.info("snapshot written: %d ranges in %.2f s", len(ranges), time.monotonic() - started,
                 extra={"snapshot": str(path), "offsets": offsets})

    try:
        while True:
            try:
                await write_if_moved()
            except OSError as exc:
                log.error("snapshot: cannot write %s: %s", path, exc)
            await asyncio.sleep(interval_s)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            if retention is not None and follower.ready.is_set() and follower.static is None and \
                    dict(follower.applied_offsets) != written:
                offsets = dict(follower.applied_offsets)
                write(path, topic=kafka.ranges_topic, ranges=follower.view.ranges(), offsets=offsets,
                      delete_retention_ms=retention, **identity(follower, offsets))
        raise


def identity(follower: Any, offsets: dict[int, int]) -> dict[str, Any]:
    """The latest claim a follower read (its log and fencing token), and its last records where they match `offsets`."""
    signatures = {p: sig for p, sig in getattr(follower, "signatures", {}).items() if offsets.get(p) == sig[0] + 1}
    claim = getattr(follower, "claim", None)
    return {"claim": None if claim is None else {"offset": claim.offset, **json.loads(claim.value())},
            "signatures": signatures}
