"""Metrics: the flusher turns plain counters into Prometheus metrics; one scrape covers every worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import aiohttp
from aiohttp import web
from helpers import eventually, free_port
from liveserve import answers, samples
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.bidder import bound_port, start_bidder
from gateway.control.metrics import (
    LATENCY_BUCKETS,
    METRICS_REGISTRY,
    Flusher,
    Metrics,
    add_buckets,
    exposition,
    handle_metrics,
    multiprocess_dir,
    serve_poison_metrics,
)
from gateway.http.proxy import Stats


def test_flusher_exports_outcome_deltas_and_latency_buckets():
    metrics = Metrics()
    stats = Stats()
    flusher = Flusher(metrics, stats)
    stats.forwarded += 3
    stats.blocked += 2
    for seconds in (0.0002, 0.003, 0.2):
        stats.latency.observe(seconds)
    flusher.flush()
    stats.forwarded += 1
    stats.latency.observe(5.0)  # beyond every bound: only +Inf
    flusher.flush()
    flusher.flush()  # nothing new: nothing added twice

    got = samples(exposition(metrics.registry))
    assert got[("gateway_requests_total", (("outcome", "forwarded"),))] == 4
    assert got[("gateway_requests_total", (("outcome", "blocked"),))] == 2
    assert got[("gateway_requests_total", (("outcome", "shed"),))] == 0  # every outcome is exported from the start
    assert got[("gateway_request_seconds_count", ())] == 4
    assert got[("gateway_request_seconds_bucket", (("le", "0.0005"),))] == 1
    assert got[("gateway_request_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[("gateway_request_seconds_bucket", (("le", "1.0"),))] == 3
    assert got[("gateway_request_seconds_bucket", (("le", "+Inf"),))] == 4
    assert abs(got[("gateway_request_seconds_sum", ())] - 5.2032) < 1e-9


def test_adding_bucket_counts_equals_observing_each_sample():
    """add_buckets reaches into prometheus-client's histogram cells; this pins that it still matches observe()."""
    observed, added = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=observed)
    h2 = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=added)
    values = [0.0001, 0.0005, 0.0007, 0.01, 0.099, 0.1, 0.5, 3.0]
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for v in values:
        h1.observe(v)
        counts[next((i for i, b in enumerate(LATENCY_BUCKETS) if v <= b), len(LATENCY_BUCKETS))] += 1
    add_buckets(h2, counts, sum(values))
    assert samples(generate_latest(observed)) == samples(generate_latest(added))


WORKER = textwrap.dedent("""
    import sys
    from gateway.control.metrics import Flusher, Metrics
    from gateway.http.proxy import Stats
    stats = Stats()
    stats.forwarded = int(sys.argv[1])
    stats.latency.observe(0.002)
    Flusher(Metrics(), stats).flush()
""")


def test_one_scrape_sums_every_worker_process():
    with multiprocess_dir() as path:
        for forwarded in (5, 7):
            subprocess.run([sys.executable, "-c", WORKER, str(forwarded)], check=True, env=dict(os.environ), timeout=60)
        got = samples(exposition())
    assert not os.path.exists(path)  # removed at exit
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert got[("gateway_requests_total", (("outcome", "forwarded"),))] == 12
    assert got[("gateway_request_seconds_count", ())] == 2


async def test_metrics_endpoint_serves_prometheus_text():
    metrics = Metrics()
    stats = Stats()
    stats.timeout = 9
    Flusher(metrics, stats).flush()
    app = web.Application()
    app[METRICS_REGISTRY] = metrics.registry
    app.router.add_get("/metrics", handle_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            got = samples(await response.text())
    finally:
        await runner.cleanup()
    assert got[("gateway_requests_total", (("outcome", "timeout"),))] == 9


async def test_one_scrape_of_gateway_serve_counts_the_requests_of_every_worker(kafka_bootstrap, topic_names, tmp_path):
    """`gateway serve --workers 2 --json-logs`: both workers answer; /metrics shows them all; logs are JSON lines."""
    bidder = await start_bidder("127.0.0.1", 0)
    port, admin = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--kafka", kafka_bootstrap, "--commands-topic", topic_names.commands,
         "--ranges-topic", topic_names.ranges, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--upstream", f"http://127.0.0.1:{bound_port(bidder)}", "--workers", "2", "--json-logs"],
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        async with aiohttp.ClientSession() as session:
            await answers(session, f"http://127.0.0.1:{admin}/readyz", process=proc)
            for _ in range(40):  # a new connection each: the kernel spreads them over the workers
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                    async with fresh.post(f"http://127.0.0.1:{port}/", json={"id": "1", "imp": [{"id": "1"}]}) as r:
                        assert r.status == 200

            async def scrape() -> dict:
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                    return samples(await response.text())

            # Every process (supervisor and workers) flushes once a second: wait for the flushes that
            # carry every request and every process's readiness.
            got = await eventually(scrape, until=lambda got: got[("gateway_request_seconds_count", ())] >= 40
                                   and got[("gateway_ready", ())] == 1,
                                   what="a scrape that counts all 40 requests, every process ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        await bidder.cleanup()
    assert got[("gateway_requests_total", (("outcome", "forwarded"),))] == 40
    assert got[("gateway_request_seconds_count", ())] == 40
    assert got[("gateway_ready", ())] == 1
    log.seek(0)
    entries = [json.loads(line) for line in log.read().splitlines()]  # every line is JSON
    drained = [e for e in entries if re.fullmatch(r"worker \d drained", e["message"])]
    assert len(drained) == 2 and all(e["forwarded"] > 0 for e in drained)  # both workers served, both counted
    assert sum(e["forwarded"] for e in drained) == 40
    assert {"serving", "stopped"} <= {e["message"] for e in entries}


POISON = ("gateway_poison_records_total", (("reader", "materializer"),))


async def test_the_materializer_exports_its_poison_count_and_role():
    class Source:
        poison = 0
        active = True

    source, port = Source(), free_port()
    stop = await serve_poison_metrics("127.0.0.1", port, source, "materializer")
    try:
        async with aiohttp.ClientSession() as session:
            source.poison = 2

            async def scrape() -> dict:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    return samples(await response.text())

            # It flushes once a second: wait for the flush that carries the count.
            got = await eventually(scrape, until=lambda got: got.get(POISON, 0) >= 2, what="the poison count")
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert (response.status, await response.json()) == (200, {"ready": True, "active": True})
    finally:
        await stop()
    assert got[POISON] == 2
