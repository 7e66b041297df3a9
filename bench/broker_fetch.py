#!/usr/bin/env python3
"""Where propagation's extra milliseconds at a 1M-range view go: one broker hop against the partition's size.

    .venv/bin/python bench/broker_fetch.py [--sizes 0,1000000] [--samples 200] [--out bench/out/broker_fetch.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP). For each size N, a topic
gets N view-like records (key, value, the materializer's headers, in 32 KB batches as the
materializer writes them); then, one record at a time:
- ack: a producer's send_and_wait (acks=all), as the publisher and the materializer write;
- tail hop: from that send to a consumer waiting at the tail having it (fetch_max_wait_ms=10,
  as the materializer and the followers read);
- record_at: the materializer's pre-write check (gateway.kafka.materializer.record_at: seek a
  paused probe to one offset and fetch that record), at the record just written.
A command crosses three fetches in a row (materializer <- commands, its check, follower <- view);
what each costs more at N records is what the view's size adds to propagation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.broker import start_broker
from gateway.kafka.materializer import record_at
from gateway.kafka.topics import log_reader


async def fill(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=32 << 10)
    await producer.start()
    try:
        pending = []
        for i in range(n):
            headers = [("command-offset", b"%d" % i), ("last", b"1"), ("writer", b"0")]
            pending.append(await producer.send(topic, b"10.%d.%d.255" % (i >> 16 & 255, i >> 8 & 255),
                                               key=b"10.%d.%d.0" % (i >> 16 & 255, i >> 8 & 255), partition=0,
                                               headers=headers))
            if len(pending) >= 50_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


async def hops(bootstrap: str, topic: str, samples: int) -> dict:
    tp = TopicPartition(topic, 0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    tail = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    probe = log_reader(bootstrap, "bench-probe", fetch_max_wait_ms=10)
    for client in (producer, tail, probe):
        await client.start()
    try:
        tail.assign([tp])
        await tail.seek_to_end(tp)
        probe.assign([tp])
        probe.pause(tp)
        acks, seen, checks = [], [], []
        for _ in range(samples):
            started = time.perf_counter()
            waiting = asyncio.ensure_future(tail.getmany(tp, timeout_ms=2000))
            meta = await producer.send_and_wait(topic, b"10.255.255.255", key=b"10.255.255.0", partition=0)
            acks.append(time.perf_counter() - started)
            while not (await waiting).get(tp):
                waiting = asyncio.ensure_future(tail.getmany(tp, timeout_ms=2000))
            seen.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = await record_at(probe, tp, meta.offset)
            checks.append(time.perf_counter() - started)
            assert found is not None and found.offset == meta.offset
            await asyncio.sleep(0.01)
    finally:
        for client in (producer, tail, probe):
            await client.stop()
    return {"ack_p50_ms": quantile(acks, 0.5), "ack_p99_ms": quantile(acks, 0.99),
            "tail_hop_p50_ms": quantile(seen, 0.5), "tail_hop_p99_ms": quantile(seen, 0.99),
            "record_at_p50_ms": quantile(checks, 0.5), "record_at_p99_ms": quantile(checks, 0.99)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000000")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", default="bench/out/broker_fetch.json")
    args = parser.parse_args()
    broker = None if os.environ.get("KAFKA_BOOTSTRAP") else start_broker()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.bootstrap
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            topic = f"bench-{uuid.uuid4().hex[:6]}.fetch"
            await fill(bootstrap, topic, size)
            rows.append({"records": size, **await hops(bootstrap, topic, args.samples)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if broker is not None:
            broker.stop()
    report = {"title": "One broker hop against the partition's size",
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
              "broker": "tansu 0.6.0 (embedded)" if broker else bootstrap, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
