"""`gateway ctl verify` (anti-entropy, DESIGN invariant 10) and `gateway ctl adopt`.

verify folds the command log on its own, reads the view topic by the reader rules, and, when
given, a live gateway's /admin/ranges; each is compared with the fold of the commands it says
it reflects (the view: up to its last complete command; the gateway: up to its
`applied_command`), so a writer that is merely behind is reported as a backlog, not as a
difference. Exit 0 when every comparison is equal, 1 with the differing ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp

from ..blacklist.addresses import format_address, parse_address
from ..blacklist.ranges import RangeSet
from ..kafka.config import KafkaConfig
from ..kafka.history import replay
from ..kafka.topics import log_reader, partitions_of, read_to_end
from ..kafka.view import ViewLoader

Spans = list[tuple[int, int, int]]
SHOWN = 20  # differing ranges listed per side


@dataclass
class Comparison:
    name: str
    equal: bool
    only_here: Spans = field(default_factory=list)  # addresses it blocks that the fold does not
    missing: Spans = field(default_factory=list)  # addresses the fold blocks that it does not
    note: str = ""

    def text(self) -> str:
        if self.equal:
            return f"{self.name}: equal to the fold of the command log{self.note}"
        lines = [f"{self.name}: DIFFERS from the fold of the command log{self.note}"]
        for label, spans in (("blocked here, not by the commands", self.only_here),
                             ("blocked by the commands, not here", self.missing)):
            if spans:
                lines.append(f"  {label}: {len(spans)} range(s)")
                lines += [f"    {format_address(v, s)} - {format_address(v, e)}" for v, s, e in spans[:SHOWN]]
                if len(spans) > SHOWN:
                    lines.append(f"    ... and {len(spans) - SHOWN} more")
        return "\n".join(lines)


@dataclass
class Report:
    summary: str
    comparisons: list[Comparison]

    @property
    def equal(self) -> bool:
        return all(c.equal for c in self.comparisons)

    def text(self) -> str:
        verdict = "OK: equal" if self.equal else "DIFFERENT"
        return "\n".join([self.summary, *(c.text() for c in self.comparisons), verdict])


class _Counter:
    poison = 0


async def read_view(kafka: KafkaConfig) -> ViewLoader:
    """The view topic read to its end by the reader rules."""
    loader = ViewLoader(_Counter())
    reader = log_reader(kafka, "gateway-verify")
    try:
        await reader.start()
        partitions = await partitions_of(reader, kafka.ranges_topic)
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        await read_to_end(reader, partitions, lambda tp, records: [loader.add(r) for r in records])
    finally:  # bounded: a frozen broker must not hold a one-shot command past its --timeout
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(reader.stop(), 2.0)
    return loader


async def verify(kafka: KafkaConfig, *, gateway_url: str | None = None, token: str | None = None) -> Report:
    loader = await read_view(kafka)
    everything = await replay(kafka)
    end = everything.next_offset
    claim = loader.rules.claim
    summary = (f"command log {kafka.commands_topic!r}: {everything.commands} commands folded, {everything.poison} poison, "
               f"ends at offset {end}\n"
               f"view {kafka.ranges_topic!r}: {len(loader.latest)} keys, last complete command "
               f"{loader.applied}, {loader.rules.stale} stale and {loader.rules._counter.poison} poison record(s) skipped, "
               f"log {claim.log_id if claim else '(no claim)'}")
    comparisons = [await _compare(kafka, "view topic", loader.load(), loader.applied, everything)]
    if claim is not None and claim.commands_topic and claim.commands_topic != kafka.commands_topic:
        comparisons.append(Comparison("view topic", False, note=f" (its claim names commands topic "
                                                                 f"{claim.commands_topic!r})"))
    if gateway_url is not None:
        comparisons.append(await _compare_gateway(kafka, gateway_url, token or "", everything))
    return Report(summary, comparisons)


async def _compare(kafka: KafkaConfig, name: str, ranges: RangeSet, applied: int | None, everything) -> Comparison:
    end = everything.next_offset
    if applied is not None and applied >= end:
        return Comparison(name, False, _spans(ranges), [],
                          note=f" (it says command {applied} is applied; the command log ends at {end}: "
                               "it runs ahead of the log; `gateway materialize --refold` rebuilds the view)")
    upto = 0 if applied is None else applied + 1
    expected = everything.view if upto >= end else (await replay(kafka, offset=upto)).view
    behind = f" (up to command {applied}; {end - upto} later command(s) not reflected yet)" if upto < end else ""
    here, want = _union(_spans(ranges)), _spans(expected)
    only_here, missing = _minus(here, want), _minus(want, here)
    canonical = _spans(ranges) == here
    note = behind if canonical else behind + " (same addresses but not canonical: overlapping or adjacent records)"
    return Comparison(name, not only_here and not missing and canonical, only_here, missing, note)


async def _compare_gateway(kafka: KafkaConfig, url: str, token: str, everything) -> Comparison:
    headers = {"Authorization": f"Bearer {token}"}
    name = f"gateway {url}"
    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/", headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(5):  # ranges read between two equal statuses describe that command
            before = await _get(session, "admin/status")
            listing = await _get(session, "admin/ranges")
            after = await _get(session, "admin/status")
            if before["applied_command"] == after["applied_command"]:
                break
        ranges = RangeSet.from_spans(
            (*parse_address(r["start"]), parse_address(r["end"])[1]) for r in listing["ranges"])
    comparison = await _compare(kafka, name, ranges, after["applied_command"], everything)
    if after.get("static"):
        comparison.note += f"; it holds its view static: {after['static']}"
    return comparison


async def _get(session: aiohttp.ClientSession, path: str) -> dict:
    async with session.get(path) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"GET /{path}: {response.status} {body.get('error', body)}")
        return body


async def adopt(url: str, token: str) -> str:
    """POST /admin/adopt to one gateway; return its answer as a line of text."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.post(url.rstrip("/") + "/admin/adopt") as response:
            body = await response.json(content_type=None)
            if response.status != 202:
                raise RuntimeError(f"POST /admin/adopt: {response.status} {body.get('error', body)}")
            return f"adopting the log the view topic holds now (was holding log {body['log_id']}; static: {body['static']})"


def _spans(ranges: RangeSet) -> Spans:
    return list(ranges.ranges())


def _union(spans: Spans) -> Spans:
    """Merge overlapping and adjacent spans (sorted by family, then start)."""
    merged: Spans = []
    for version, start, end in sorted(spans):
        if merged and merged[-1][0] == version and start <= merged[-1][2] + 1:
            merged[-1] = (version, merged[-1][1], max(end, merged[-1][2]))
        else:
            merged.append((version, start, end))
    return merged


def _minus(a: Spans, b: Spans) -> Spans:
    """Addresses of `a` not in `b` (both merged and sorted) as spans."""
    result: Spans = []
    j = 0
    for version, start, end in a:
        while j < len(b) and (b[j][0], b[j][2]) < (version, start):
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] == version and b[k][1] <= end:
            if b[k][1] > cursor:
                result.append((version, cursor, b[k][1] - 1))
            cursor = max(cursor, b[k][2] + 1)
            k += 1
        if cursor <= end:
            result.append((version, cursor, end))
    return result
