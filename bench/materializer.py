#!/usr/bin/env python3
"""Materializer throughput (commands/s) and the time to import a 1M-line blocklist, on a real broker.

    .venv/bin/python bench/materializer.py [--commands 200000] [--import-lines 1000000] [--out bench/out/materializer.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP), stops it by PID at the end.
1. fold: N random commands (80 % BLACKLIST, IPv4 /16../32 and IPv6 /32../64) are published first;
   then one materializer folds them; commands/s is measured from the moment it is active (view
   read, group joined) until its last view record is acknowledged.
2. import: a FireHOL-style file of M lines (comments, hosts, CIDRs) goes through `import_file`
   (validate everything, then publish, as `gateway ctl import` does) while a `gateway materialize`
   process folds it; the figure is file -> the last command's view record written.
Target (docs/ARCHITECTURE.md): >= 20k commands/s; a 1M-line blocklist imported in <= 60 s.
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
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.blacklist.commands import Command
from gateway.broker import start_broker
from gateway.kafka.config import KafkaConfig
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher, import_file
from gateway.kafka.topics import ensure_topics


def random_command(rng: random.Random) -> Command:
    action = "BLACKLIST" if rng.random() < 0.8 else "WHITELIST"
    if rng.random() < 0.8:
        length = rng.randint(16, 32)
        network = ipaddress.IPv4Network((rng.getrandbits(32) >> (32 - length) << (32 - length), length))
    else:
        length = rng.randint(32, 64)
        network = ipaddress.IPv6Network((rng.getrandbits(128) >> (128 - length) << (128 - length), length))
    return Command(action, network)  # type: ignore[arg-type]


def write_netset(path: Path, lines: int, rng: random.Random) -> None:
    with open(path, "w") as f:
        f.write("#\n# bench blocklist, FireHOL .netset style\n#\n")
        for i in range(lines):
            if i % 1000 == 0:
                f.write("# section\n")
            length = rng.choice([32, 32, 32, 32, 24, 24, 20, 28])
            network = ipaddress.IPv4Network((rng.getrandbits(32) >> (32 - length) << (32 - length), length))
            f.write(f"{network.network_address}\n" if length == 32 else f"{network}\n")


async def until_done(materializer: Materializer, last_offset: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while materializer.next_offset is None or materializer.next_offset <= last_offset:
        if time.monotonic() > deadline:
            raise TimeoutError(f"materializer stuck at {materializer.next_offset}")
        await asyncio.sleep(0.005)
    async with materializer._lock:  # the batch in hand is written and acknowledged
        return time.monotonic()


async def bench_fold(bootstrap: str, n: int) -> dict:
    kafka = KafkaConfig(bootstrap, f"bench-{uuid.uuid4().hex[:6]}.commands", f"bench-{uuid.uuid4().hex[:6]}.ranges")
    rng = random.Random(1)
    commands = [random_command(rng) for _ in range(n)]
    async with Publisher(kafka) as publisher:
        offsets = await publisher.publish_many(commands)
    materializer = Materializer(kafka)
    task = asyncio.create_task(materializer.run())
    while not materializer.active:
        await asyncio.sleep(0.005)
    started = time.monotonic()
    finished = await until_done(materializer, offsets[-1], timeout=600)
    materializer.stop()
    await task
    seconds = finished - started
    return {"commands": n, "seconds": round(seconds, 2), "commands_per_s": round(n / seconds),
            "view_records": materializer.written, "ranges": len(materializer.view or ())}


async def view_reaches(kafka: KafkaConfig, command_offset: int, timeout: float) -> float:
    """Tail the view until the record tagged `last` for that command (or a later one) arrives."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    try:
        tp = TopicPartition(kafka.ranges_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                headers = dict(record.headers)
                if "last" in headers and int(headers["command-offset"]) >= command_offset:
                    return time.monotonic()
        raise TimeoutError("the view never reached the last command")
    finally:
        await consumer.stop()


async def bench_import(bootstrap: str, lines: int) -> dict:
    """`gateway ctl import` (here: the library call) against a `gateway materialize` process."""
    kafka = KafkaConfig(bootstrap, f"bench-{uuid.uuid4().hex[:6]}.commands", f"bench-{uuid.uuid4().hex[:6]}.ranges")
    await ensure_topics(kafka)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blocklist.netset"
        write_netset(path, lines, random.Random(2))
        log = open(Path(tmp) / "materializer.log", "w+")
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "materialize", "--kafka", bootstrap,
             "--commands-topic", kafka.commands_topic, "--ranges-topic", kafka.ranges_topic],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            while "materializer active" not in Path(log.name).read_text():
                await asyncio.sleep(0.05)
            started = time.monotonic()
            result = await import_file(kafka, path, reason="bench")
            published = time.monotonic()
            finished = await view_reaches(kafka, result.last_offset, timeout=600)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    return {"lines": lines, "commands": result.count, "publish_s": round(published - started, 2),
            "total_s": round(finished - started, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--import-lines", type=int, default=1_000_000)
    parser.add_argument("--out", default="bench/out/materializer.json")
    args = parser.parse_args()
    broker = None if os.environ.get("KAFKA_BOOTSTRAP") else start_broker()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.bootstrap
    try:
        fold = await bench_fold(bootstrap, args.commands)
        imported = await bench_import(bootstrap, args.import_lines)
    finally:
        if broker is not None:
            broker.stop()
    rows = [{"measure": "fold", "count": fold["commands"], "seconds": fold["seconds"], "per_s": fold["commands_per_s"]},
            {"measure": "import: validate + publish", "count": imported["lines"], "seconds": imported["publish_s"],
             "per_s": round(imported["lines"] / imported["publish_s"]) if imported["publish_s"] else ""},
            {"measure": "import: file -> last view record", "count": imported["lines"], "seconds": imported["total_s"],
             "per_s": round(imported["lines"] / imported["total_s"]) if imported["total_s"] else ""}]
    targets = [{"target": "materializer throughput", "goal": ">= 20000 commands/s",
                "measured": f"{fold['commands_per_s']} commands/s", "met": fold["commands_per_s"] >= 20000},
               {"target": f"{imported['lines']:,}-line blocklist imported", "goal": "<= 60 s (at 1M lines)",
                "measured": f"{imported['total_s']} s", "met": imported["total_s"] <= 60}]
    report = {"title": "Materializer: fold throughput and blocklist import",
              "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
              "broker": "tansu 0.6.0 (embedded)" if broker else bootstrap, "rows": rows, "targets": targets,
              "fold": fold, "import": imported}
    print(f"{'measure':<34}{'value':>14}  target")
    print(f"{'fold: commands/s':<34}{fold['commands_per_s']:>14}  >= 20000")
    print(f"{'fold: commands, seconds':<34}{fold['commands']:>7} {fold['seconds']:>6}")
    print(f"{'import: lines':<34}{imported['lines']:>14}")
    print(f"{'import: validate+publish s':<34}{imported['publish_s']:>14}")
    print(f"{'import: file -> view written s':<34}{imported['total_s']:>14}  <= 60")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
