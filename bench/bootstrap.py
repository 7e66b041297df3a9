#!/usr/bin/env python3
"""Follower bootstrap: time to ready and memory for a view of 100k and 1M ranges, on a real broker.

    .venv/bin/python bench/bootstrap.py [--sizes 100000,1000000] [--out bench/out/bootstrap.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP) and writes a view of N
ranges (3/4 IPv4 CIDRs /24../32, 1/4 IPv6 /48s, as blocklists carry them; key = first address,
value = last address, as the materializer writes them). Then a follower in a fresh process
bootstraps it: the time from its start to ready (view read to the end offsets, index built and
swapped in), and the growth of its resident set at ready and after gc + malloc_trim (the steady
state). Tansu does not compact, so the view holds exactly N records.
Target (docs/ARCHITECTURE.md): a 1M-range view to ready in <= 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer

from gateway.blacklist.addresses import format_address
from gateway.broker import start_broker
from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import BatchWriter
from gateway.kafka.topics import ensure_topics


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def view_ranges(n: int, rng: random.Random):
    v4 = n * 3 // 4
    for block in sorted(rng.sample(range(1 << 24), v4)):  # one CIDR /24../32 per /24 block
        start = block << 8
        yield 4, start, start + (1 << rng.randint(0, 8)) - 1
    for block in sorted(rng.sample(range(1 << 40), n - v4)):
        start = (0x2000 << 112) | (block << 80)
        yield 6, start, start + (1 << 80) - 1


async def write_view(kafka: KafkaConfig, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        writer = BatchWriter(producer, kafka.ranges_topic)
        for i, (version, start, end) in enumerate(view_ranges(n, random.Random(n))):
            headers = [("command-offset", str(i).encode()), ("last", b"1")]
            await writer.append(format_address(version, start).encode(), format_address(version, end).encode(), headers)
        await writer.flush()
    finally:
        await producer.stop()


async def child(bootstrap: str, commands_topic: str, ranges_topic: str) -> None:
    """In a fresh process: bootstrap one follower, print seconds to ready and RSS growth as JSON."""
    from gateway.kafka.follower import Follower

    before = rss_bytes()
    follower = Follower(KafkaConfig(bootstrap, commands_topic, ranges_topic), create_topics=False)
    started = time.monotonic()
    task = asyncio.create_task(follower.run())
    await follower.ready.wait()
    seconds = time.monotonic() - started
    at_ready = rss_bytes() - before
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the bootstrap's transient buffers back to the OS
    print(json.dumps({"seconds": seconds, "rss_growth": at_ready, "rss_trimmed": rss_bytes() - before,
                      "ranges": len(follower.view),
                      "prefixes": len(follower.index.prefixes(4)) + len(follower.index.prefixes(6))}), flush=True)
    follower.stop()
    await task


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--out", default="bench/out/bootstrap.json")
    parser.add_argument("--child", nargs=3, metavar=("BOOTSTRAP", "COMMANDS", "RANGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return await child(*args.child)
    broker = None if os.environ.get("KAFKA_BOOTSTRAP") else start_broker()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.bootstrap
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            tag = uuid.uuid4().hex[:6]
            kafka = KafkaConfig(bootstrap, f"bench-{tag}.commands", f"bench-{tag}.ranges")
            await ensure_topics(kafka)
            written = time.monotonic()
            await write_view(kafka, n)
            written = time.monotonic() - written
            out = subprocess.run([sys.executable, __file__, "--child", bootstrap, kafka.commands_topic, kafka.ranges_topic],
                                 stdout=subprocess.PIPE, text=True, check=True, timeout=600)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["ranges"] == n, result
            rows.append({"ranges": n, "ready_s": round(result["seconds"], 2),
                         "rss_mb": round(result["rss_growth"] / 1e6, 1), "prefixes": result["prefixes"],
                         "rss_trimmed_mb": round(result["rss_trimmed"] / 1e6, 1),
                         "write_s": round(written, 1)})
    finally:
        if broker is not None:
            broker.stop()
    print(f"{'ranges':>10} {'ready s':>8} {'RSS MB':>8} {'trimmed':>8} {'prefixes':>10}   (target: 1M ready <= 15 s)")
    for row in rows:
        print(f"{row['ranges']:>10} {row['ready_s']:>8} {row['rss_mb']:>8} {row['rss_trimmed_mb']:>8} {row['prefixes']:>10}")
    largest = rows[-1]
    targets = [{"target": f"a {largest['ranges']:,}-range view to ready", "goal": "<= 15 s (at 1M)",
                "measured": f"{largest['ready_s']} s", "met": largest["ready_s"] <= 15}]
    report = {"title": "Bootstrap: the view topic read to its end, index built, ready",
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
              "broker": "tansu 0.6.0 (embedded)" if broker else bootstrap, "rows": rows, "targets": targets}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
