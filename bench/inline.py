"""Inline filtering bench: a bare aiohttp app vs the same app with gateway.http.middleware.

What the middleware costs an aiohttp bidder, in CPU per request: both apps answer
`GET /bid` with a tiny 200 in their own process on uvloop; the filtered one also runs
the view's follower against the embedded broker, with N IPv4 ranges in the view (none
covering loopback, so every request is looked up and passes). wrk loads each app in
turn, alternating rounds so that drift on the shared machine hits both alike; CPU per
request is utime+stime of the app's process (/proc/<pid>/stat) over a run / requests.
The follower's own idle CPU (its fetch loop) is measured apart, with no load.

    .venv/bin/python bench/inline.py [--ranges 100000] [--duration 5] [--rounds 3] [--connections 16]

Prints a table and writes bench/out/inline.json in bench/run_all.py's shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxy import blacklist, cpu_seconds, free_port, publish_blacklist, wait_http, wrk  # bench/proxy.py

from gateway.broker import start_broker, stop_pid

HERE = Path(__file__).resolve().parent
TARGETS = ("bare", "middleware", "inline")


class Prebuilt:
    """The two things the middleware reads of a follower, with the index built in-process."""

    def __init__(self, count: int) -> None:
        from gateway.blacklist.index import Index

        self.ready = asyncio.Event()
        self.ready.set()
        self.index = Index.build((4, start, end) for start, end in blacklist(count))


def role(name: str, port: int, kafka: str, count: int) -> None:
    """One app. `middleware`: the filter alone, on an index built in-process (its cost per
    request); `inline`: what an app gets from setup_blacklist, the follower included."""
    import uvloop
    from aiohttp import web
    from prometheus_client import REGISTRY, generate_latest

    from gateway.http.middleware import InlineBlacklist, setup_blacklist

    async def bid(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY))

    async def main() -> None:
        app = web.Application()
        if name == "inline":
            setup_blacklist(app, kafka, exempt=("/metrics",))
        elif name == "middleware":
            guard = InlineBlacklist(kafka, registry=None)
            guard.follower = Prebuilt(count)  # no follower task: nothing runs but the middleware
            app.middlewares.append(guard.middleware)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/{tail:.*}", bid)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def ranges_held(port: int) -> int:
    """The inline app's gateway_ranges{family="4"} (0 while it bootstraps)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith('gateway_ranges{family="4"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def idle_cpu_ms_per_s(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """CPU each process takes with no load (the follower's fetch loop, in the inline app)."""
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: round((cpu_seconds([pid]) - before[name]) * 1000 / seconds, 1) for name, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranges", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating wrk runs per app")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "out" / "inline.json"))
    parser.add_argument("--role", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kafka", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role(args.role, args.port, args.kafka, args.ranges)
        return

    ranges = blacklist(args.ranges)
    broker = start_broker()
    processes: list[subprocess.Popen] = []
    runs: dict[str, list[dict]] = {name: [] for name in TARGETS}
    try:
        processes.append(subprocess.Popen([sys.executable, "-m", "gateway", "materialize", "--kafka", broker.bootstrap],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        started = time.monotonic()
        asyncio.run(publish_blacklist(broker.bootstrap, ranges))
        apps = {}
        for name in TARGETS:
            port = free_port()
            apps[name] = (port, subprocess.Popen([sys.executable, __file__, "--role", name, "--port", str(port),
                                                  "--kafka", broker.bootstrap, "--ranges", str(args.ranges)]))
            processes.append(apps[name][1])
        for port, _ in apps.values():
            wait_http(port, timeout=120)  # the inline app answers 200 once its view is bootstrapped
        deadline = time.monotonic() + 300
        while ranges_held(apps["inline"][0]) != len(ranges):
            if time.monotonic() > deadline:
                raise RuntimeError("the inline app never held the whole blacklist")
            time.sleep(0.5)
        print(f"  inline app holds {len(ranges)} ranges ({time.monotonic() - started:.1f} s)", file=sys.stderr)
        idle = idle_cpu_ms_per_s({name: process.pid for name, (_, process) in apps.items()})
        for name, (port, process) in apps.items():
            wrk(port, args.connections, 1, [process.pid])  # warm up
        for round_ in range(args.rounds):
            for name, (port, process) in apps.items():
                runs[name].append(wrk(port, args.connections, args.duration, [process.pid]))
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for process in reversed(processes):
            stop_pid(process, timeout=10)
        broker.stop()

    report = summarize(runs, idle, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten: {args.out}")


def summarize(runs: dict[str, list[dict]], idle: dict[str, float], args: argparse.Namespace) -> dict:
    """The report in bench/run_all.py's shape (title, rows, targets, notes)."""
    rows = [
        {"target": name, "round": n + 1, "connections": args.connections, "rps": r["rps"],
         "p50_ms": round(r["p50_us"] / 1000, 3), "p99_ms": round(r["p99_us"] / 1000, 3),
         "cpu_us_per_req": r["cpu_us_per_req"], "non_2xx": r["non_2xx"]}
        for name, results in runs.items() for n, r in enumerate(results)
    ]
    cpu = {name: statistics.median(r["cpu_us_per_req"] for r in results) for name, results in runs.items()}
    rps = {name: round(statistics.median(r["rps"] for r in results)) for name, results in runs.items()}
    spread = {name: round(max(r["cpu_us_per_req"] for r in results) - min(r["cpu_us_per_req"] for r in results), 1)
              for name, results in runs.items()}
    rows += [{"target": f"{name} (median)", "rps": rps[name], "cpu_us_per_req": round(cpu[name], 1),
              "spread_us": spread[name], "idle_cpu_ms_per_s": idle[name]} for name in runs]
    added = {name: round(cpu[name] - cpu["bare"], 1) for name in ("middleware", "inline")}
    targets = [
        {"target": "the middleware adds <= 5 us CPU per request over the bare app (index built in-process)",
         "measured": f"{added['middleware']} us ({cpu['middleware']:.1f} vs {cpu['bare']:.1f} us, medians)",
         "met": added["middleware"] <= 5},
        {"target": "setup_blacklist (middleware + follower) adds <= 5 us CPU per request over the bare app",
         "measured": f"{added['inline']} us at {rps['inline']} req/s ({cpu['inline']:.1f} vs {cpu['bare']:.1f} us; "
                     f"the follower alone takes {idle['inline'] - idle['bare']:.1f} ms CPU per second, loaded or not)",
         "met": added["inline"] <= 5},
    ]
    return {
        "title": "Inline filtering: a bare aiohttp app vs the same app with the blacklist middleware (wrk, loopback)",
        "notes": (f"{args.ranges} IPv4 ranges in the filtered apps' index, none covering loopback, so every request is "
                  "looked up and passes. Three apps, each one process on uvloop answering `GET /bid` with 200 `ok`: "
                  "bare; middleware = the filter alone on an index built in-process (its cost per request); inline = "
                  "setup_blacklist as an app uses it, with the view's follower reading the embedded broker (whose "
                  "fetch loop costs CPU loaded or idle: idle_cpu_ms_per_s, over 3 s with no load). "
                  f"wrk -t1 -c{args.connections}, {args.duration} s per run, {args.rounds} rounds taking the apps in "
                  "turn; CPU = utime+stime of the app's process / requests; medians over the rounds, spread = max - "
                  "min. The machine's 2 cores are shared (wrk takes one, other work runs meanwhile): compare the "
                  "columns of one run, and read the spread as the noise."),
        "rows": rows,
        "targets": targets,
        "added_cpu_us_per_req": added,
        "idle_cpu_ms_per_s": idle,
        "machine": {"cpus": os.cpu_count()},
    }


def table(report: dict) -> str:
    lines = [f"{'target':19} {'round':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}"]
    for r in report["rows"]:
        lines.append(f"{r['target']:19} {r.get('round', ''):>5} {r['rps']:>8} {r.get('p50_ms', ''):>8} "
                     f"{r.get('p99_ms', ''):>8} {r['cpu_us_per_req']:>10}")
    for t in report["targets"]:
        lines.append(f"{'ok    ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
