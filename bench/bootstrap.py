#!/usr/bin/env python3
"""One view per host: a real `gateway serve` on a 1M-range view, for 1 and 2 workers side by side.

    .venv/bin/python bench/bootstrap.py [--ranges 1000000] [--workers 1,2] [--rounds 1] [--out bench/out/bootstrap.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP). N BLACKLIST commands
(3/4 IPv4 CIDRs /25../32, one per /24 block, 1/4 IPv6 /48s: never touching, so N ranges) are
published to the commands topic and folded by the materializer into the view, as in production
(command-offset, last and writer tags, a writer claim). Then, for each worker count:
- spawn `python -m gateway serve --workers W` and time it to /readyz 200, and the supervisor's
  CPU time until then (its bootstrap: on a shared machine the wall time also counts others' load);
- after a settle, read every process's memory (supervisor and workers) from
  /proc/PID/smaps_rollup: RSS, PSS (shared pages divided among the processes sharing them:
  the sum is what the host really holds) and private;
- SIGKILL one worker and time the kill to the replacement's readiness (/readyz 200 again, the
  supervisor's /readyz needs every worker's progress);
- SIGTERM, and wait for the drain.
Also: lookups of the 1M-range index in the process that built it and in a child forked after
gc.freeze() as the supervisor forks its workers (the relayout of Index.build must survive the fork).
Targets (docs/ARCHITECTURE.md): ready <= 10 s whatever --workers; --workers 2 total PSS <= 1.3x
--workers 1; a re-forked worker ready < 1 s; lookups in the worker no slower.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from gateway.blacklist.addresses import format_address
from gateway.blacklist.commands import Command
from gateway.blacklist.index import Index
from gateway.blacklist.ranges import RangeSet
from gateway.broker import start_broker
from gateway.kafka.config import KafkaConfig
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics
from gateway.server import freeze_heap

SETTLE_S = 3.0


def view_commands(n: int, rng: random.Random) -> list[Command]:
    """BLACKLIST commands that yield n ranges: 3/4 IPv4 /25../32 (one per /24: never adjacent), 1/4 IPv6 /48."""
    v4 = n * 3 // 4
    commands = []
    for block in rng.sample(range(1 << 24), v4):
        length = rng.randint(25, 32)
        commands.append(Command("BLACKLIST", ipaddress.IPv4Network((block << 8, length))))
    for block in rng.sample(range(1 << 40), n - v4):
        commands.append(Command("BLACKLIST", ipaddress.IPv6Network(((0x2000 << 112) | (block << 80), 48))))
    return commands  # type: ignore[arg-type]


async def materialized_view(bootstrap: str, n: int) -> tuple[KafkaConfig, RangeSet, dict]:
    """Publish n commands and fold them with a Materializer (stopped after): the view topic as production writes it."""
    tag = uuid.uuid4().hex[:6]
    kafka = KafkaConfig(bootstrap, f"bench-{tag}.commands", f"bench-{tag}.ranges")
    await ensure_topics(kafka)
    started = time.monotonic()
    async with Publisher(kafka) as publisher:
        offsets = await publisher.publish_many(view_commands(n, random.Random(n)))
    published = time.monotonic()
    materializer = Materializer(kafka)
    task = asyncio.create_task(materializer.run())
    while materializer.next_offset is None or materializer.next_offset <= offsets[-1]:
        if task.done():
            await task
        await asyncio.sleep(0.05)
    async with materializer._lock:  # the batch in hand is written and acknowledged
        folded = time.monotonic()
        view = materializer.view
    materializer.stop()
    await task
    return kafka, view, {"publish_s": round(published - started, 1), "fold_s": round(folded - published, 1),
                                 "view_records": materializer.written}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS and private memory of one process, in MB, from /proc/PID/smaps_rollup."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        kb[name] = int(value.split()[0])
    return {"rss_mb": round(kb["Rss"] / 1024, 1), "pss_mb": round(kb["Pss"] / 1024, 1),
            "private_mb": round((kb["Private_Clean"] + kb["Private_Dirty"]) / 1024, 1)}


def memory_of_gateway(pid: int) -> dict:
    processes = {"supervisor": memory_of(pid), **{f"worker {i}": memory_of(c) for i, c in enumerate(children(pid))}}
    return {"processes": processes,
            "total_pss_mb": round(sum(p["pss_mb"] for p in processes.values()), 1),
            "total_rss_mb": round(sum(p["rss_mb"] for p in processes.values()), 1)}


async def ready(session: aiohttp.ClientSession, url: str, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway serve exited with code {process.returncode}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):  # the supervisor's loop is busy building the view
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{url} not ready in {timeout} s")


async def measure_serve(kafka: KafkaConfig, workers: int, log: Path) -> dict:
    port, admin = free_port(), free_port()
    readyz = f"http://127.0.0.1:{admin}/readyz"
    with open(log, "w") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--kafka", kafka.bootstrap, "--commands-topic",
             kafka.commands_topic, "--ranges-topic", kafka.ranges_topic, "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin}", "--upstream", "http://127.0.0.1:9", "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await ready(session, readyz, 300, process)
            ready_s = time.monotonic() - started
            ready_cpu_s = cpu_seconds(process.pid)  # the supervisor's bootstrap: what a quiet core would take
            await asyncio.sleep(SETTLE_S)
            memory = memory_of_gateway(process.pid)
            before = children(process.pid)
            os.kill(before[0], signal.SIGKILL)
            killed = time.monotonic()
            while len(now := children(process.pid)) != workers or before[0] in now:
                await asyncio.sleep(0.002)
            await ready(session, readyz, 60, process)
            refork_s = time.monotonic() - killed
            await asyncio.sleep(SETTLE_S)
            after = memory_of_gateway(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return {"workers": workers, "ready_s": round(ready_s, 2), "ready_cpu_s": round(ready_cpu_s, 2),
            "refork_ready_s": round(refork_s, 3),
            "memory": memory, "memory_after_refork": after}


def lookup_ns(index: Index, addresses: list[str], rounds: int = 5) -> float:
    best = float("inf")
    blocks = index.blocks
    for _ in range(rounds):
        started = time.perf_counter()
        for address in addresses:
            blocks(address)
        best = min(best, time.perf_counter() - started)
    return best / len(addresses) * 1e9


def lookups_across_fork(view: RangeSet) -> dict:
    """ns per lookup in the process that built the index, and in a child forked as the workers are."""
    index = Index.build(view.ranges())
    rng = random.Random(7)
    spans = list(view.ranges())
    addresses = [format_address(v, rng.randint(s, e)) for v, s, e in rng.choices(spans, k=100_000)]
    addresses += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(100_000)]
    rng.shuffle(addresses)
    freeze_heap()
    parent, child = [], []
    for _ in range(3):  # interleaved, so a busy moment of a shared machine hits both sides
        parent.append(lookup_ns(index, addresses))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, json.dumps(lookup_ns(index, addresses)).encode())
            os._exit(0)
        os.close(write)
        child.append(json.loads(os.read(read, 1024)))
        os.close(read)
        os.waitpid(pid, 0)
    parent, child = min(parent), min(child)
    return {"parent_ns": round(parent, 1), "forked_child_ns": round(child, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each worker count, interleaved")
    parser.add_argument("--out", default="bench/out/bootstrap.json")
    args = parser.parse_args()
    broker = None if os.environ.get("KAFKA_BOOTSTRAP") else start_broker()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.bootstrap
    counts = [int(w) for w in args.workers.split(",")]
    runs = []
    try:
        kafka, view, written = await materialized_view(bootstrap, args.ranges)
        written["ranges"] = len(view)
        print(f"view: {written}", flush=True)
        lookups = lookups_across_fork(view)
        del view
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for workers in counts:
                    run = await measure_serve(kafka, workers, Path(tmp) / f"serve-{workers}-{round_}.log")
                    print(json.dumps(run), flush=True)
                    runs.append(run)
    finally:
        if broker is not None:
            broker.stop()
    rows = []
    median = lambda values: round(statistics.median(values), 3)  # noqa: E731
    for workers in counts:
        mine = [r for r in runs if r["workers"] == workers]
        per = lambda key: median(r["memory"]["processes"][key]["pss_mb"] for r in mine)  # noqa: E731
        rows.append({"workers": workers, "ready_s": median(r["ready_s"] for r in mine),
                     "ready_cpu_s": median(r["ready_cpu_s"] for r in mine),
                     "refork_ready_s": median(r["refork_ready_s"] for r in mine),
                     "total_pss_mb": median(r["memory"]["total_pss_mb"] for r in mine),
                     "total_rss_mb": median(r["memory"]["total_rss_mb"] for r in mine),
                     "supervisor_pss_mb": per("supervisor"),
                     "worker_pss_mb": [per(f"worker {i}") for i in range(workers)],
                     "worker_private_mb": [median(r["memory"]["processes"][f"worker {i}"]["private_mb"]
                                                             for r in mine) for i in range(workers)],
                     "total_pss_after_refork_mb": median(r["memory_after_refork"]["total_pss_mb"]
                                                                    for r in mine)})
    print(f"{'workers':>7} {'ready s':>8} {'CPU s':>6} {'re-fork s':>9} {'PSS MB':>8} {'RSS MB':>8}  per worker PSS / private MB")
    for row in rows:
        print(f"{row['workers']:>7} {row['ready_s']:>8} {row['ready_cpu_s']:>6} {row['refork_ready_s']:>9} {row['total_pss_mb']:>8} "
              f"{row['total_rss_mb']:>8}  {row['worker_pss_mb']} / {row['worker_private_mb']}")
    print(f"lookups: {lookups['parent_ns']} ns in the builder, {lookups['forked_child_ns']} ns in a forked child")
    one = next(r for r in rows if r["workers"] == min(counts))
    targets = [{"target": f"ready, --workers {r['workers']}", "goal": "<= 10 s",
                "measured": f"{r['ready_s']} s ({r['ready_cpu_s']} s of CPU)", "met": r["ready_s"] <= 10} for r in rows]
    targets += [{"target": f"total PSS, --workers {r['workers']} / --workers {one['workers']}", "goal": "<= 1.3x",
                 "measured": f"{r['total_pss_mb'] / one['total_pss_mb']:.2f}x",
                 "met": r["total_pss_mb"] <= 1.3 * one["total_pss_mb"]} for r in rows if r is not one]
    targets += [{"target": f"re-forked worker ready, --workers {r['workers']}", "goal": "< 1 s",
                 "measured": f"{r['refork_ready_s']} s", "met": r["refork_ready_s"] < 1} for r in rows]
    targets.append({"target": "lookup in a forked worker vs the builder", "goal": "no slower",
                    "measured": f"{lookups['forked_child_ns']} vs {lookups['parent_ns']} ns",
                    "met": lookups["forked_child_ns"] <= lookups["parent_ns"] * 1.1})
    report = {"title": f"One view per host: gateway serve on a {args.ranges:,}-range view",
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
              "broker": "tansu 0.6.0 (embedded)" if broker else bootstrap, "view": written,
              "rows": rows, "targets": targets, "lookups": lookups, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
