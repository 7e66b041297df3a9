"""Prometheus metrics, fed once a second from plain per-worker counters; one scrape covers all workers.

The request path never calls prometheus-client: it bumps integers and bucket counts in its
`Stats` (gateway/http/proxy.py). A `Flusher` task per worker turns their deltas into metric
updates once a second, and reads the follower's state into gauges. With several workers,
server.run points PROMETHEUS_MULTIPROC_DIR at a fresh directory (`multiprocess_dir()`)
before they start; every worker's values then live in memory-mapped files there and
`/metrics` merges them. Gauges say how workers combine: the worst worker wins (highest
lag and age, lowest applied offset and readiness), and a dead worker's gauges go away
once `worker_exited(pid)` is called.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from ..http.proxy import LatencyHistogram
from .top import TopCounter

log = logging.getLogger(__name__)

OUTCOMES = ("forwarded", "blocked", "timeout", "upstream_error", "shed", "not_ready", "rejected", "shadow_blocked")
LATENCY_BUCKETS = LatencyHistogram.BOUNDS  # the request path counts in these buckets; export them as is
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory set as PROMETHEUS_MULTIPROC_DIR for this process and the workers it starts.

    For server.run, around the life of the workers: entered before they start, removed at exit.
    """
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    previous = os.environ.get(ENV)
    os.environ[ENV] = path
    values.ValueClass = values.get_value_class()
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        values.ValueClass = values.get_value_class()
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters and histograms stay in the totals)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)


class Metrics:
    """The metric objects of one process. Create it after the multiprocess directory is set."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # prometheus-client picks file-backed or in-memory values when first imported; a worker
        # forked from a parent that imported it before setting the directory must pick again.
        values.ValueClass = values.get_value_class()
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.request_seconds = Histogram(
            "gateway_request_seconds", "Time from request received to response sent, by the gateway.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "gateway_upstream_seconds", "Time waiting for the upstream bidder's response.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.ranges = Gauge("gateway_ranges", "Ranges in the view.", ["family"], registry=r,
                            multiprocess_mode="livemax")
        self.addresses = Gauge("gateway_addresses_blocked", "Addresses the view blocks.", ["family"], registry=r,
                               multiprocess_mode="livemax")
        self.applied_offset = Gauge("gateway_view_applied_offset", "Next view offset to apply (least advanced worker).",
                                    registry=r, multiprocess_mode="livemin")
        self.lag = Gauge("gateway_view_lag_records", "View records not yet applied (worst worker).", registry=r,
                         multiprocess_mode="livemax")
        self.age = Gauge("gateway_view_age_seconds", "Seconds since the follower last knew it was up to date.",
                         registry=r, multiprocess_mode="livemax")
        self.propagation = Histogram(
            "gateway_propagation_seconds", "From a command's timestamp to its view records applied here.",
            buckets=PROPAGATION_BUCKETS, registry=r)
        self.bootstrap = Gauge("gateway_bootstrap_seconds", "Seconds from start to ready.", registry=r,
                               multiprocess_mode="livemax")
        self.poison = Counter("gateway_poison_records", "Unparseable records skipped, by reader process.",
                              ["reader"], registry=r)
        self.ready = Gauge("gateway_ready", "1 when every worker has its view bootstrapped.", registry=r,
                           multiprocess_mode="livemin")
        self.unenforced = Gauge("gateway_commands_unenforced",
                                "Commands in the command log this view does not reflect yet (worst worker).",
                                registry=r, multiprocess_mode="livemax")
        self.static = Gauge("gateway_view_static",
                            "1 while the view is held static on a reset or foreign log (any worker).",
                            registry=r, multiprocess_mode="livemax")
        self.stale = Counter("gateway_stale_records", "View records of a fenced writer skipped, by reader process.",
                             ["reader"], registry=r)
        self.kafka_failing = Gauge("gateway_kafka_connection_failing",
                                   "1 while this process cannot use the broker and retries (unreachable, untrusted"
                                   " certificate, refused login: /admin/status or the log says which).",
                                   registry=r, multiprocess_mode="livemax")


def add_buckets(histogram: Histogram, counts: list[int], total: float) -> None:
    """Add pre-bucketed observations: counts[i] samples in bucket i (the last is +Inf), summing to total.

    Equivalent to observing each sample, without one call per sample. Uses Histogram's value
    cells (`_buckets`, `_sum`); tests/control/test_metrics.py checks the equivalence on the pinned range.
    """
    for cell, count in zip(histogram._buckets, counts):
        if count:
            cell.inc(count)
    if total:
        histogram._sum.inc(total)


class _HistogramDelta:
    """What a LatencyHistogram gained since the last flush."""

    def __init__(self, source: Any, target: Histogram) -> None:
        if tuple(source.bounds) != tuple(target._upper_bounds[:-1]):
            raise ValueError("the request path's buckets differ from the metric's")
        self.source, self.target = source, target
        self.counts = [0] * len(source.counts)
        self.sum = 0.0

    def flush(self) -> None:
        counts, total = list(self.source.counts), self.source.sum
        add_buckets(self.target, [now - before for now, before in zip(counts, self.counts)], total - self.sum)
        self.counts, self.sum = counts, total


@dataclass
class ViewState:
    """What a follower knows about its view, read in one step (for /admin/status and the gauges)."""

    ready: bool
    ranges: dict[int, int]
    addresses: dict[int, int]
    offsets: dict[int, int]
    end_offsets: dict[int, int]
    lag: int | None
    age_seconds: float
    since_contact: float | None
    applied_command: int | None
    poison: int
    stale: int = 0  # view records of a fenced writer skipped
    unenforced_commands: int | None = None  # commands in the log this view does not reflect yet
    static: str | None = None  # why the view is held static on a reset or foreign log
    log_id: str | None = None
    claim_offset: int | None = None
    kafka_problem: str | None = None  # why the broker cannot be used now (the follower retries)


def view_state(follower: Any, baseline: float | None = None) -> ViewState:
    """Read a gateway.follower.Follower. The age is the time since the view was last known current:
    the broker's last answer when nothing was left to apply, else the last record applied, at the
    earliest `baseline` (wall time the process started, or its snapshot was written)."""
    now = time.time()
    lag = follower.lag
    marks = [baseline if baseline is not None else now]
    if follower.last_update is not None:
        marks.append(follower.last_update)
    since_contact = follower.seconds_since_contact()
    if since_contact is not None and lag == 0:
        marks.append(now - since_contact)
    view = follower.view
    return ViewState(
        ready=follower.ready.is_set(),
        ranges={f: view.count(f) for f in (4, 6)},
        addresses={f: view.addresses(f) for f in (4, 6)},
        offsets=dict(follower.applied_offsets),
        end_offsets=dict(follower.end_offsets),
        lag=lag,
        age_seconds=max(0.0, now - max(marks)),
        since_contact=since_contact,
        applied_command=follower.applied_command,
        poison=follower.poison,
        stale=getattr(follower, "stale", 0),
        unenforced_commands=getattr(follower, "unenforced_commands", None),
        static=getattr(follower, "static", None),
        log_id=getattr(follower, "log_id", None),
        claim_offset=claim.offset if (claim := getattr(follower, "claim", None)) is not None else None,
        kafka_problem=getattr(follower, "kafka_problem", None),
    )


class Flusher:
    """Copies a worker's plain counters and its follower's state into the metrics, on a timer.

    `stats`: the proxy's Stats (outcome integers, `latency` and optional `upstream_latency`
    LatencyHistograms). `follower`: a gateway.follower.Follower, read only; `baseline`: see view_state.
    """

    def __init__(
        self, metrics: Metrics, stats: Any = None, follower: Any = None, *,
        reader: str = "follower", baseline: float | None = None,
    ) -> None:
        self.metrics, self.stats, self.follower, self.reader = metrics, stats, follower, reader
        self.baseline = time.time() if baseline is None else baseline
        self._started = time.monotonic()
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._histograms = []
        if stats is not None:
            self._histograms.append(_HistogramDelta(stats.latency, metrics.request_seconds))
            if getattr(stats, "upstream_latency", None) is not None:
                self._histograms.append(_HistogramDelta(stats.upstream_latency, metrics.upstream_seconds))
        self._poison = 0
        self._stale = 0
        # refusals per view range, for GET /admin/top: a file per worker in the multiprocess directory
        self.top = TopCounter(os.environ.get(ENV)) if stats is not None and follower is not None else None
        if follower is not None:
            metrics.poison.labels(reader)  # exported at 0 from the start, so alerts see the series
            metrics.stale.labels(reader)

    def flush(self) -> None:
        if self.stats is not None:
            self._flush_stats()
        if self.follower is not None:
            self._flush_follower()

    def _flush_stats(self) -> None:
        for outcome in OUTCOMES:
            now = getattr(self.stats, outcome, 0)
            if now != self._outcomes[outcome]:
                self.metrics.requests.labels(outcome).inc(now - self._outcomes[outcome])
                self._outcomes[outcome] = now
        for histogram in self._histograms:
            histogram.flush()
        if self.top is not None and (self.top.take(self.stats, self.follower.view) or self.top.seconds):
            self.top.write()

    def _flush_follower(self) -> None:
        m, state = self.metrics, view_state(self.follower, self.baseline)
        m.ready.set(1 if state.ready else 0)
        for family in (4, 6):
            m.ranges.labels(str(family)).set(state.ranges[family])
            m.addresses.labels(str(family)).set(state.addresses[family])
        m.applied_offset.set(sum(state.offsets.values()))
        if state.lag is not None:
            m.lag.set(state.lag)
        m.age.set(state.age_seconds)
        if state.unenforced_commands is not None:
            m.unenforced.set(state.unenforced_commands)
        m.static.set(1 if state.static is not None else 0)
        m.kafka_failing.set(1 if state.kafka_problem is not None else 0)
        if state.stale > self._stale:
            m.stale.labels(self.reader).inc(state.stale - self._stale)
            self._stale = state.stale
        if state.poison > self._poison:
            m.poison.labels(self.reader).inc(state.poison - self._poison)
            self._poison = state.poison
        samples = self.follower.propagation  # a bounded deque the follower appends to
        while samples:
            m.propagation.observe(samples.popleft())

    async def run(self, interval: float = 1.0) -> None:
        """Flush every `interval` seconds until cancelled (then once more, so nothing is lost)."""
        waiter = None
        if self.follower is not None:
            waiter = asyncio.ensure_future(self._time_bootstrap())
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.flush()
                except Exception:
                    log.exception("metrics flush failed")
        finally:
            if waiter is not None:
                waiter.cancel()
            self.flush()

    async def _time_bootstrap(self) -> None:
        await self.follower.ready.wait()
        self.metrics.bootstrap.set(time.monotonic() - self._started)


def exposition(registry: CollectorRegistry | None = None) -> bytes:
    """The text of a scrape: every worker's values when the multiprocess directory is set."""
    if os.environ.get(ENV):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics (no token): Prometheus text format."""
    registry = request.app.get(METRICS_REGISTRY)
    body = await asyncio.get_running_loop().run_in_executor(None, exposition, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (says nothing about the view; see /readyz)."""
    return web.json_response({"status": "ok"})


async def serve_poison_metrics(host: str, port: int, source: Any, reader: str) -> Callable[[], Awaitable[None]]:
    """/healthz, /readyz and /metrics for a process without the admin API (`gateway materialize
    --admin-listen`).

    Exports `gateway_poison_records_total{reader}` from `source.poison`, flushed once a second.
    /readyz is 200 while the process runs, active or standing by (a standby is what makes the
    pair available), and says which in `active`. Returns the coroutine function that stops it.
    """
    metrics = Metrics()
    counter = metrics.poison.labels(reader)
    r = metrics.registry
    active = Gauge("gateway_materializer_active", "1 while this materializer is the active writer.", registry=r)
    backlog = Gauge("gateway_materializer_command_backlog",
                    "Commands in the log the active writer has not folded yet.", registry=r)
    refused = Gauge("gateway_materializer_checkpoint_refused",
                    "1 while the view's checkpoint is refused (ahead of the command log, another log or topic).",
                    registry=r)
    fenced = Counter("gateway_materializer_fenced", "Times this writer saw a newer claim and stopped writing.",
                     registry=r)
    failing = metrics.kafka_failing
    seen = 0
    fenced_seen = 0

    async def flush() -> None:
        nonlocal seen, fenced_seen
        while True:
            await asyncio.sleep(1.0)
            if source.poison > seen:
                counter.inc(source.poison - seen)
                seen = source.poison
            active.set(1 if getattr(source, "active", False) else 0)
            if getattr(source, "backlog", None) is not None:
                backlog.set(source.backlog)
            refused.set(1 if getattr(source, "refused", None) else 0)
            failing.set(1 if getattr(source, "kafka_problem", None) else 0)
            if getattr(source, "fenced", 0) > fenced_seen:
                fenced.inc(source.fenced - fenced_seen)
                fenced_seen = source.fenced

    app = web.Application()
    app[METRICS_REGISTRY] = metrics.registry
    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"ready": True, "active": bool(getattr(source, "active", False))})

    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", handle_metrics, allow_head=False)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    task = asyncio.ensure_future(flush())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    return stop
