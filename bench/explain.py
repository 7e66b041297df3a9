#!/usr/bin/env python3
"""Explain latency at 100k and 1M commands, and what counting top ranges costs a blocked request.

    .venv/bin/python bench/explain.py [--sizes 100000,1000000] [--probes 2000] [--out bench/out/explain.json]

Starts its own Tansu on a free loopback port (or uses KAFKA_BOOTSTRAP), stops it by PID at the end.
1. explain: N random commands (80 % BLACKLIST; IPv4 /16../32 and IPv6 /32../64, as
   bench/materializer.py draws them) are published with actor and reason headers. An admin app
   (make_admin_app, as `gateway serve` runs it in the supervisor; its follower reads an empty view)
   reads the log once in the background (the catch-up time and the memory it adds are reported),
   then GET /admin/explain is timed over loopback HTTP for random probe addresses, half of them
   inside a commanded network. Each request also reads what was appended since the last (a
   broker round trip), as it does in service. The index lookup alone is timed too.
2. top: Core.screen() on the blocked branch, with the counter increment (this code) and with the
   branch as it was before (a subclass), in-process, min of rounds; and the once-a-second flush
   (TopCounter.take) per distinct refused address.
Target (issue 14): explain in milliseconds at 1M commands; top costs only a counter increment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.materializer import random_command  # noqa: E402
from gateway.broker import start_broker  # noqa: E402
from gateway.control.admin import COMMAND_INDEX, make_admin_app, start_admin  # noqa: E402
from gateway.http.config import ServeConfig  # noqa: E402
from gateway.kafka.config import KafkaConfig  # noqa: E402
from gateway.kafka.follower import Follower  # noqa: E402
from gateway.kafka.publisher import LazyPublisher, Publisher  # noqa: E402
from gateway.kafka.topics import ensure_topics  # noqa: E402

TOKEN = "bench-token"


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def publish(kafka: KafkaConfig, count: int, rng: random.Random) -> list:
    commands = [random_command(rng) for _ in range(count)]
    actors = ["alice", "bob", "feed-firehol", "carol"]
    async with Publisher(kafka) as publisher:
        chunk = 20_000
        for at in range(0, count, chunk):
            part = commands[at:at + chunk]
            await publisher.publish_encoded((c.encode() for c in part), actor=actors[(at // chunk) % 4],
                                            reason=f"batch {at // chunk}")
    return commands


def probes(commands: list, count: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(count):
        if i % 2:
            c = rng.choice(commands)
            value = rng.randint(c.first, c.last)
            out.append(str(c.network.network_address.__class__(value)))
        else:
            out.append("203.0.113.%d" % rng.randint(0, 255) if i % 4 else "2001:db8::%x" % rng.getrandbits(16))
    return out


async def explain_at(bootstrap: str, size: int, probe_count: int, seed: int) -> dict:
    tag = f"bench-explain-{size}-{time.time_ns()}"
    kafka = KafkaConfig(bootstrap, f"{tag}.commands", f"{tag}.ranges")
    await ensure_topics(kafka)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    commands = await publish(kafka, size, rng)
    published_s = time.perf_counter() - t0

    config = ServeConfig(kafka=kafka, upstreams=("http://127.0.0.1:9",), admin_token=TOKEN)
    follower = Follower(kafka)
    follower_task = asyncio.ensure_future(follower.run())
    publisher = LazyPublisher(kafka)
    app = make_admin_app(config, follower, publisher)
    rss_before = rss_mb()
    runner = await start_admin(app, "127.0.0.1", 0)  # on_startup: the index starts reading the log
    index = app[COMMAND_INDEX]
    t0 = time.perf_counter()
    while index.end_offset is None or index.next_offset < size:
        await asyncio.sleep(0.05)
    catch_up_s = time.perf_counter() - t0
    rss_after = rss_mb()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/admin/explain?ip="
    addresses = probes(commands, probe_count, rng)
    timings = []
    decided = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        for address in addresses[:50]:  # warm up
            async with session.get(url + address) as response:
                await response.read()
        for address in addresses:
            t = time.perf_counter()
            async with session.get(url + address) as response:
                body = await response.json()
            timings.append(time.perf_counter() - t)
            assert response.status == 200, body
            decided += body["decided_by"] is not None
    table = index.table
    texts = [(6 if ":" in a else 4, a) for a in addresses]
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for version, address in texts:
            table.deciding(version, address)
        rounds.append((time.perf_counter() - t) / len(texts))
    await runner.cleanup()
    await publisher.stop()
    follower.stop()
    follower_task.cancel()
    await asyncio.gather(follower_task, return_exceptions=True)
    timings.sort()
    return {
        "commands": size,
        "publish_s": round(published_s, 1),
        "index_catch_up_s": round(catch_up_s, 1),
        "index_rss_mb": round(rss_after - rss_before, 1),
        "explain_http_ms": {"p50": round(statistics.median(timings) * 1e3, 3),
                            "p99": round(timings[int(len(timings) * 0.99)] * 1e3, 3),
                            "max": round(timings[-1] * 1e3, 3)},
        "index_lookup_us": round(min(rounds) * 1e6, 2),
        "probes": len(addresses),
        "probes_decided": decided,
    }


async def top_cost(rounds: int = 15, calls: int = 200_000) -> dict:
    from gateway.blacklist.index import Index
    from gateway.blacklist.ranges import RangeSet
    from gateway.control.top import TopCounter
    from gateway.http.decision import Core

    class Before(Core):
        """The blocked branch as it was before issue 14: a plain counter."""

        def screen(self, peer, peer_trusted, xff):
            if not self._ready and not self.ready():
                self.stats.not_ready += 1
                return 503
            client = self.resolver.resolve(peer, xff.decode("latin-1")) if peer_trusted and xff is not None else peer
            try:
                blocked = self.view.index.blocks(client)
            except (ValueError, TypeError, KeyError):
                blocked = True
            if blocked:
                self.stats.blocked += 1
                return self.reject_status
            return 0

    class View:
        ready = True
        index = Index.build([(4, 0x0A000000, 0x0AFFFFFF)])

    config = ServeConfig(kafka=KafkaConfig("127.0.0.1:9", "c", "r"), upstreams=("http://127.0.0.1:9",))
    now, before = Core(config, View()), Before(config, View())
    tails = [f"{i // 256 % 256}.{i % 256}" for i in range(1000)]  # 1000 distinct clients in 10.0.0.0/16
    best = {"before": float("inf"), "with_counter": float("inf")}
    for _ in range(rounds):  # interleaved, min of rounds: the machine is shared
        for name, core in (("before", before), ("with_counter", now)):
            # Fresh string objects, as a socket gives: their hash is not cached yet (the dict pays it).
            clients = ["10.0." + tails[i % 1000] for i in range(calls)]
            core.stats.blocked_by = {}
            screen = core.screen
            t = time.perf_counter()
            for client in clients:
                screen(client, False, None)
            best[name] = min(best[name], (time.perf_counter() - t) / calls)
    results = {name: round(value * 1e9, 1) for name, value in best.items()}
    view = RangeSet.from_spans([(4, 0x0A000000, 0x0AFFFFFF)])
    counter = TopCounter(None)

    class Stats:
        blocked_by: dict

    flush = []
    for distinct in (1000, 50_000):
        best = float("inf")
        for _ in range(rounds):
            stats = Stats()
            stats.blocked_by = {f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}": 3 for i in range(distinct)}
            t = time.perf_counter()
            counter.take(stats, view)
            best = min(best, (time.perf_counter() - t) / distinct)
        flush.append({"distinct_addresses": distinct, "us_per_address": round(best * 1e6, 3)})
    return {"screen_blocked_ns": results, "added_ns": round(results["with_counter"] - results["before"], 1),
            "flush": flush}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--out", default="bench/out/explain.json")
    args = parser.parse_args()
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    if not bootstrap:
        broker = start_broker(0)
        bootstrap = broker.bootstrap
    try:
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "load_start": os.getloadavg()[0]},
                  "top": await top_cost(), "explain": []}
        print(json.dumps(result["top"]), flush=True)
        for size in (int(s) for s in args.sizes.split(",") if s):
            row = await explain_at(bootstrap, size, args.probes, args.seed)
            print(json.dumps(row), flush=True)
            result["explain"].append(row)
        result["machine"]["load_end"] = os.getloadavg()[0]
        result["machine"]["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        if broker is not None:
            broker.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
