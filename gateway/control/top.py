"""Which view ranges refuse the most requests: counted per worker, summed by the admin process.

The request path only bumps `Stats.blocked_by[client address]` on the blocked branch (a dict
increment; blocked requests are cheap already). Once a second each worker's metrics flush
(`metrics.Flusher`) takes that dict, maps each address to the view range that holds it now, adds
the counts to its totals and to the current second, and writes one small JSON file into the
metrics multiprocess directory (`top-<pid>.json`, replaced atomically). GET /admin/top reads every
worker's file and sums them: since start, and over the last 60 seconds. No shared memory and
nothing created before fork; a dead worker's file stays, so its counts stay in "since start".
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..blacklist.addresses import format_address, parse_address

WINDOW_S = 60
FILE_PREFIX = "top-"
MAX_RANGES_PER_FILE = 10_000  # a worker keeps its busiest ranges; the rest are dropped from its file
Span = tuple[int, int, int]  # (version, first, last)


def _range_of(view: Any, address: str) -> Span | None:
    try:
        version, value = parse_address(address)
    except ValueError:
        return None
    if version == 6 and value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d is looked up as IPv4
        version, value = 4, value & 0xFFFFFFFF
    found = view.find(version, value)
    return None if found is None else (version, found[0], found[1])


class TopCounter:
    """One worker's refusals per range: totals since start and one bucket per second for a minute."""

    def __init__(self, directory: str | None, pid: int | None = None) -> None:
        self.path = None if directory is None else os.path.join(directory, f"{FILE_PREFIX}{pid or os.getpid()}.json")
        self.totals: dict[Span, int] = {}
        self.seconds: deque[tuple[int, dict[Span, int]]] = deque()
        self.unmatched = 0  # refused addresses no range holds any more (the view changed within the second)

    def take(self, stats: Any, view: Any, now: float | None = None) -> bool:
        """Move the request path's counts into the totals; True when anything was counted."""
        counts = stats.blocked_by
        if not counts:
            return False
        stats.blocked_by = {}  # swapped, not cleared: the request path keeps counting into the new one
        second = int(time.time() if now is None else now)
        if not self.seconds or self.seconds[-1][0] != second:
            self.seconds.append((second, {}))
        bucket = self.seconds[-1][1]
        for address, count in counts.items():
            span = _range_of(view, address)
            if span is None:
                self.unmatched += count
                continue
            self.totals[span] = self.totals.get(span, 0) + count
            bucket[span] = bucket.get(span, 0) + count
        return True

    def write(self, now: float | None = None) -> None:
        """Replace this worker's file (write a temporary file, then rename: readers never see half)."""
        if self.path is None:
            return
        second = int(time.time() if now is None else now)
        while self.seconds and self.seconds[0][0] <= second - WINDOW_S:
            self.seconds.popleft()
        totals = sorted(self.totals.items(), key=lambda item: -item[1])[:MAX_RANGES_PER_FILE]
        body = {"totals": [[*span, count] for span, count in totals],
                "seconds": [[at, [[*span, count] for span, count in bucket.items()]] for at, bucket in self.seconds],
                "unmatched": self.unmatched}
        temporary = f"{self.path}.tmp"
        try:
            with open(temporary, "w") as file:
                json.dump(body, file, separators=(",", ":"))
            os.replace(temporary, self.path)
        except FileNotFoundError:  # the supervisor removed the directory: it is stopping, nobody reads it now
            pass


@dataclass
class Ranked:
    version: int
    first: int
    last: int
    total: int
    last_minute: int

    def as_json(self, in_view: bool) -> dict[str, Any]:
        return {"start": format_address(self.version, self.first), "end": format_address(self.version, self.last),
                "blocked": self.total, "blocked_last_minute": self.last_minute, "in_view": in_view}


@dataclass
class Summary:
    by_total: list[Ranked]
    by_minute: list[Ranked]
    workers: int
    unmatched: int


def summed(directory: str | None, limit: int, now: float | None = None) -> Summary:
    """Every worker file in `directory`, summed: the `limit` busiest ranges since start and in the last minute."""
    second = int(time.time() if now is None else now)
    totals: dict[Span, int] = {}
    minute: dict[Span, int] = {}
    workers = unmatched = 0
    for body in _files(directory):
        workers += 1
        unmatched += int(body.get("unmatched", 0))
        for version, first, last, count in body.get("totals", ()):
            span = (version, first, last)
            totals[span] = totals.get(span, 0) + count
        for at, bucket in body.get("seconds", ()):
            if at > second - WINDOW_S:
                for version, first, last, count in bucket:
                    span = (version, first, last)
                    minute[span] = minute.get(span, 0) + count

    def ranked(spans: Iterable[Span]) -> list[Ranked]:
        return [Ranked(*span, totals.get(span, 0), minute.get(span, 0)) for span in spans]

    by_total = sorted(totals, key=lambda span: (-totals[span], span))[:limit]
    by_minute = sorted(minute, key=lambda span: (-minute[span], span))[:limit]
    return Summary(ranked(by_total), ranked(by_minute), workers, unmatched)


def _files(directory: str | None) -> Iterable[dict[str, Any]]:
    if not directory or not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if not (name.startswith(FILE_PREFIX) and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as file:
                yield json.load(file)
        except (OSError, ValueError):  # a worker replacing its file right now, or one that died mid-write
            continue


async def fetch(url: str, token: str, limit: int) -> dict[str, Any]:
    """GET /admin/top from a live gateway (`gateway ctl top`); RuntimeError with the gateway's reason."""
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url.rstrip("/") + "/admin/top", params={"limit": str(limit)}) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"GET /admin/top: {response.status} {body.get('error', body)}")
            return body


def text(body: dict[str, Any]) -> str:
    """The answer of /admin/top as a table a person reads: busiest since start, with the last minute."""
    lines = [f"mode {body['mode']}, {body['workers']} workers reporting",
             f"{'since start':>12} {'last minute':>12}  range"]
    for item in body["ranges"]:
        gone = "" if item["in_view"] else "  (no longer in the view)"
        lines.append(f"{item['blocked']:>12} {item['blocked_last_minute']:>12}  {item['start']} - {item['end']}{gone}")
    if not body["ranges"]:
        lines.append("(no request refused yet)")
    return "\n".join(lines)
