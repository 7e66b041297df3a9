"""Inline filtering bench: a bare aiohttp app vs the same app with gateway.http.middleware.

What the middleware costs an aiohttp bidder, in CPU per request. Four apps, each one
process on uvloop answering `GET /bid` with a tiny 200:

- bare: no middleware at all;
- passthrough: one middleware that only awaits the handler. aiohttp runs its middleware
  chain (plus a layer of its own that sets `current_app`) only when an app has a
  middleware: this is what any middleware costs, ours or not;
- middleware: the blacklist middleware alone, on an index of N IPv4 ranges built
  in-process (its own cost per request);
- inline: `setup_blacklist` as an app uses it, with the view's follower reading N ranges
  from the embedded broker (its fetch loop costs CPU loaded or idle: measured apart).

No range covers loopback, so every request is looked up and passes. wrk loads each app in
turn, round after round, so that drift on the shared machine hits all alike; CPU per
request = utime+stime of the app's process (/proc/<pid>/stat) over a run / requests.
Because wrk shares the 2 cores with the app and anything else running, the same dispatch
path is also timed in-process (process time of `app._handle` on one request object, no
socket, no parsing), where the differences are not drowned by noise.

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

from proxy import (  # bench/proxy.py
    blacklist,
    cpu_seconds,
    free_port,
    publish_blacklist,
    wait_http,
    wrk,
)

from gateway.broker import start_broker, stop_pid

HERE = Path(__file__).resolve().parent
TARGETS = ("bare", "passthrough", "middleware", "inline")


class Prebuilt:
    """The two things the middleware reads of a follower, with the index built in-process."""

    def __init__(self, count: int) -> None:
        from gateway.blacklist.index import Index

        self.ready = asyncio.Event()
        self.ready.set()
        self.index = Index.build((4, start, end) for start, end in blacklist(count))


def make_app(name: str, kafka: str, count: int):
    """The app of one target (see the module docstring)."""
    from aiohttp import web
    from prometheus_client import REGISTRY, generate_latest

    from gateway.http.middleware import InlineBlacklist, setup_blacklist

    async def bid(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY))

    @web.middleware
    async def passthrough(request: web.Request, handler) -> web.StreamResponse:
        return await handler(request)

    app = web.Application()
    if name == "inline":
        setup_blacklist(app, kafka, exempt=("/metrics",))
    elif name == "middleware":
        guard = InlineBlacklist(kafka, registry=None)
        guard.follower = Prebuilt(count)  # no follower task: nothing runs but the middleware
        app.middlewares.append(guard.middleware)
    elif name == "passthrough":
        app.middlewares.append(passthrough)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/{tail:.*}", bid)
    return app


def role(name: str, port: int, kafka: str, count: int) -> None:
    import uvloop
    from aiohttp import web

    async def main() -> None:
        runner = web.AppRunner(make_app(name, kafka, count), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def dispatch(count: int, calls: int = 100_000, rounds: int = 5) -> dict[str, dict[str, float]]:
    """µs of process time per `app._handle(request)`: routing, middlewares, handler, response
    object; no socket and no parsing. One request object per app (aiohttp's
    make_mocked_request, peer 127.0.0.1), reused; apps taken in turn, round after round."""
    from aiohttp.test_utils import make_mocked_request

    async def run() -> dict[str, list[float]]:
        cases = {}
        for name in ("bare", "passthrough", "middleware"):
            app = make_app(name, "127.0.0.1:9", count)
            app.freeze()
            request = make_mocked_request("GET", "/bid", app=app)
            request._transport_peername = ("127.0.0.1", 40000)  # what a socket gives aiohttp
            cases[name] = (app, request)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, (app, request) in cases.items():
                started = time.process_time()
                for _ in range(calls):
                    await app._handle(request)
                times[name].append((time.process_time() - started) / calls * 1e6)
        return times

    times = asyncio.run(run())
    return {name: {"min_us": round(min(t), 2), "median_us": round(statistics.median(t), 2)} for name, t in times.items()}


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


def measure(port: int, connections: int, duration: int, pid: int, attempts: int = 3) -> dict:
    """One wrk run (bench/proxy.py's); again when its output does not parse (a stalled run on
    a machine shared with other work prints no percentile line)."""
    for attempt in range(attempts):
        try:
            return wrk(port, connections, duration, [pid])
        except (KeyError, AttributeError):
            print(f"  wrk output did not parse (attempt {attempt + 1}); again", file=sys.stderr)
    raise RuntimeError("wrk output never parsed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranges", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per app, apps taken in turn")
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
                runs[name].append(measure(port, args.connections, args.duration, process.pid))
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for process in reversed(processes):
            stop_pid(process, timeout=10)
        broker.stop()
    in_process = dispatch(args.ranges)

    report = summarize(runs, idle, in_process, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten: {args.out}")


def summarize(runs: dict[str, list[dict]], idle: dict[str, float], in_process: dict[str, dict[str, float]],
              args: argparse.Namespace) -> dict:
    """The report in bench/run_all.py's shape (title, rows, targets, notes)."""
    rows = [
        {"target": name, "round": n + 1, "rps": r["rps"], "p50_ms": round(r["p50_us"] / 1000, 3),
         "p99_ms": round(r["p99_us"] / 1000, 3), "cpu_us_per_req": r["cpu_us_per_req"], "non_2xx": r["non_2xx"]}
        for name, results in runs.items() for n, r in enumerate(results)
    ]
    cpu = {name: statistics.median(r["cpu_us_per_req"] for r in results) for name, results in runs.items()}
    low = {name: min(r["cpu_us_per_req"] for r in results) for name, results in runs.items()}
    rps = {name: round(statistics.median(r["rps"] for r in results)) for name, results in runs.items()}
    rows += [{"target": f"{name} (median)", "rps": rps[name], "cpu_us_per_req": round(cpu[name], 1),
              "min_cpu_us_per_req": low[name], "idle_cpu_ms_per_s": idle[name]} for name in runs]
    rows += [{"target": f"{name} (in-process dispatch)", "cpu_us_per_req": t["median_us"], "min_cpu_us_per_req": t["min_us"]}
             for name, t in in_process.items()]
    added = {name: round(cpu[name] - cpu["bare"], 1) for name in TARGETS[1:]}
    ours = {"bare": round(in_process["middleware"]["min_us"] - in_process["bare"]["min_us"], 2),
            "passthrough": round(in_process["middleware"]["min_us"] - in_process["passthrough"]["min_us"], 2)}
    follower = round(idle["inline"] - idle["bare"], 1)
    targets = [
        {"target": "the middleware adds <= 5 us CPU per request over the bare app (wrk, medians)",
         "measured": f"{added['middleware']} us ({cpu['middleware']:.1f} vs {cpu['bare']:.1f} us); any middleware: "
                     f"{added['passthrough']} us", "met": added["middleware"] <= 5},
        {"target": "the same, in-process dispatch (min of rounds)",
         "measured": f"{ours['bare']} us over the bare app, of which {ours['bare'] - ours['passthrough']:.2f} us is "
                     f"aiohttp's cost of having a middleware at all; {ours['passthrough']} us over an app that has one",
         "met": ours["bare"] <= 5},
        {"target": "setup_blacklist (middleware + follower) adds <= 5 us CPU per request over the bare app (wrk)",
         "measured": f"{added['inline']} us at {rps['inline']} req/s ({cpu['inline']:.1f} vs {cpu['bare']:.1f} us); "
                     f"the follower alone takes {follower} ms of CPU per second, loaded or idle",
         "met": added["inline"] <= 5},
    ]
    return {
        "title": "Inline filtering: a bare aiohttp app vs the same app with the blacklist middleware (wrk, loopback)",
        "notes": (f"{args.ranges} IPv4 ranges in the filtered apps' index, none covering loopback, so every request is "
                  "looked up and passes. bare = no middleware; passthrough = one middleware that only awaits the "
                  "handler (what aiohttp charges for having middlewares at all); middleware = the filter alone on an "
                  "index built in-process; inline = setup_blacklist, with the follower on the embedded broker "
                  "(idle_cpu_ms_per_s: with no load, over 3 s). Each app one process on uvloop, `GET /bid` -> 200. "
                  f"wrk -t1 -c{args.connections}, {args.duration} s per run, {args.rounds} rounds taking the apps in "
                  "turn; CPU = utime+stime of the app's process / requests; median and min over the rounds. "
                  "In-process dispatch: process time per `app._handle(request)` on a reused request object, 100k "
                  "calls x 5 rounds, no socket. The machine's 2 cores are shared (wrk takes one, other work runs "
                  "meanwhile): the spread between rounds of one app is the noise of the wrk rows."),
        "rows": rows,
        "targets": targets,
        "added_cpu_us_per_req": added,
        "in_process_added_us": ours,
        "idle_cpu_ms_per_s": idle,
        "machine": {"cpus": os.cpu_count()},
    }


def table(report: dict) -> str:
    lines = [f"{'target':30} {'round':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'min':>6}"]
    for r in report["rows"]:
        lines.append(f"{r['target']:30} {r.get('round', ''):>5} {r.get('rps', ''):>8} {r.get('p50_ms', ''):>8} "
                     f"{r.get('p99_ms', ''):>8} {r['cpu_us_per_req']:>10} {r.get('min_cpu_us_per_req', ''):>6}")
    for t in report["targets"]:
        lines.append(f"{'ok    ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
