#!/usr/bin/env python3
"""Propagation: a command published -> applied on 3 followers, p50/p99 over 1,000 commands (loopback).

    .venv/bin/python bench/propagation.py [--commands 1000] [--rate 100] [--out bench/out/propagation.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP), one `gateway materialize`
process and 3 follower processes (the follower task of `gateway serve`, on uvloop). Then it
publishes one command at a time at --rate per second; each is a new /32, so it yields exactly one
view record. A follower's sample is the time from the command's timestamp (set when it is
published; the materializer copies it onto the view record) to the moment the record is applied
to its index. Per command the slowest of the 3 followers counts ("enforced on every gateway").
Target (docs/ARCHITECTURE.md): p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from gateway.broker import start_broker
from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics

FOLLOWERS = 3


async def follower_child(bootstrap: str, commands_topic: str, ranges_topic: str, n: int) -> None:
    """In a fresh process: follow, say `ready`, then print the first n propagation samples as JSON."""
    from gateway.kafka.follower import Follower

    follower = Follower(KafkaConfig(bootstrap, commands_topic, ranges_topic), create_topics=False)
    task = asyncio.create_task(follower.run())
    await follower.ready.wait()
    print("ready", flush=True)
    deadline = time.monotonic() + 30 + n / 10
    while len(follower.propagation) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps(list(follower.propagation)[:n]), flush=True)
    follower.stop()
    await task


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(bootstrap: str, n: int, rate: float) -> dict:
    tag = uuid.uuid4().hex[:6]
    kafka = KafkaConfig(bootstrap, f"bench-{tag}.commands", f"bench-{tag}.ranges")
    await ensure_topics(kafka)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "materializer.log"
        with open(log_path, "w") as log:
            materializer = subprocess.Popen(
                [sys.executable, "-m", "gateway", "materialize", "--kafka", bootstrap,
                 "--commands-topic", kafka.commands_topic, "--ranges-topic", kafka.ranges_topic],
                stdout=log, stderr=subprocess.STDOUT,
            )
        followers = [
            subprocess.Popen([sys.executable, __file__, "--follower", bootstrap, kafka.commands_topic,
                              kafka.ranges_topic, str(n)], stdout=subprocess.PIPE, text=True)
            for _ in range(FOLLOWERS)
        ]
        try:
            while "materializer active" not in log_path.read_text():
                await asyncio.sleep(0.05)
            for follower in followers:
                assert (await asyncio.to_thread(follower.stdout.readline)).strip() == "ready"
            async with Publisher(kafka) as publisher:
                for i in range(n):
                    await publisher.publish(f"BLACKLIST 10.{i >> 8 & 255}.{i & 255}.1")
                    await asyncio.sleep(1 / rate)
            samples = [json.loads(await asyncio.to_thread(f.stdout.readline)) for f in followers]
        finally:
            for process in (materializer, *followers):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(30)
    counts = [len(s) for s in samples]
    assert all(c == n for c in counts), f"samples per follower: {counts} (expected {n})"
    slowest = [max(per_command) for per_command in zip(*samples)]
    ms = lambda seconds: round(seconds * 1000, 2)  # noqa: E731
    return {
        "commands": n, "rate_per_s": rate, "followers": FOLLOWERS,
        "all_p50_ms": ms(percentile(slowest, 0.50)), "all_p99_ms": ms(percentile(slowest, 0.99)),
        "all_max_ms": ms(max(slowest)), "mean_ms": ms(statistics.fmean(slowest)),
        "per_follower": [{"p50_ms": ms(percentile(s, 0.5)), "p99_ms": ms(percentile(s, 0.99))} for s in samples],
        "samples_ms": [ms(s) for s in slowest],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="commands per second")
    parser.add_argument("--out", default="bench/out/propagation.json")
    parser.add_argument("--follower", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follower:
        bootstrap, commands_topic, ranges_topic, n = args.follower
        return await follower_child(bootstrap, commands_topic, ranges_topic, int(n))
    broker = None if os.environ.get("KAFKA_BOOTSTRAP") else start_broker()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.bootstrap
    try:
        result = await run(bootstrap, args.commands, args.rate)
    finally:
        if broker is not None:
            broker.stop()
    print(f"{'commands':>9} {'rate/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   (slowest of {FOLLOWERS} followers; target p99 <= 50 ms)")
    print(f"{result['commands']:>9} {result['rate_per_s']:>7} {result['all_p50_ms']:>8} {result['all_p99_ms']:>8} {result['all_max_ms']:>8}")
    for i, row in enumerate(result["per_follower"]):
        print(f"  follower {i}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")
    rows = [{"commands": result["commands"], "rate_per_s": result["rate_per_s"], "followers": result["followers"],
             "p50_ms": result["all_p50_ms"], "p99_ms": result["all_p99_ms"], "max_ms": result["all_max_ms"]}]
    targets = [{"target": "command published -> enforced on every follower, p99", "goal": "<= 50 ms",
                "measured": f"{result['all_p99_ms']} ms", "met": result["all_p99_ms"] <= 50}]
    report = {"title": f"Propagation (slowest of {FOLLOWERS} follower processes per command)",
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
              "broker": "tansu 0.6.0 (embedded)" if broker else bootstrap,
              "rows": rows, "targets": targets, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if "--follower" in sys.argv:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
