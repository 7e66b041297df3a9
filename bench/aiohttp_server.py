"""Which aiohttp server the aiohttp engine builds on: the low-level `web.Server` or an
`Application` with one catch-all route. Both answer `GET /bid` with a tiny 200 (what
aiohttp costs before any proxying); wrk loads each in turn, round after round, so drift on
the shared machine hits both alike; CPU per request = utime+stime of the server's process
(/proc/<pid>/stat) over a run / requests.

    .venv/bin/python bench/aiohttp_server.py [--duration 5] [--rounds 3] [--connections 16]

Prints a table and writes bench/out/aiohttp_server.json in bench/run_all.py's shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

from proxy import free_port, wait_http, wrk  # bench/proxy.py

from gateway.broker import stop_pid

HERE = Path(__file__).resolve().parent
TARGETS = ("lowlevel", "application")


def role(name: str, port: int) -> None:
    import uvloop
    from aiohttp import web

    async def answer(request: web.BaseRequest) -> web.Response:
        return web.Response(body=b"ok")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if name == "lowlevel":
            await loop.create_server(web.Server(answer, access_log=None), "127.0.0.1", port, backlog=4096)
        else:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", answer)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "out" / "aiohttp_server.json"))
    parser.add_argument("--role", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role(args.role, args.port)
        return
    processes, ports = {}, {}
    try:
        for name in TARGETS:
            ports[name] = free_port()
            processes[name] = subprocess.Popen([sys.executable, __file__, "--role", name, "--port", str(ports[name])])
            wait_http(ports[name])
        runs: dict[str, list[dict]] = {name: [] for name in TARGETS}
        for name in TARGETS:
            wrk(ports[name], args.connections, 1, [processes[name].pid])  # warm up
        for _ in range(args.rounds):
            for name in TARGETS:
                runs[name].append(wrk(ports[name], args.connections, args.duration, [processes[name].pid]))
    finally:
        for process in processes.values():
            stop_pid(process, timeout=10)
    rows = [{"target": name, "connections": args.connections,
             "rps": round(statistics.median(r["rps"] for r in runs[name])),
             "cpu_us_per_req": round(statistics.median(r["cpu_us_per_req"] for r in runs[name]), 1)}
            for name in TARGETS]
    low, app = rows
    report = {
        "title": "aiohttp's low-level server vs an Application with one catch-all route (trivial 200, wrk)",
        "notes": f"wrk -t1 -c{args.connections}, {args.rounds} rounds of {args.duration} s, targets in turn; medians.",
        "rows": rows,
        "targets": [{"target": "the aiohttp engine builds on the cheaper server",
                     "measured": f"low-level {low['cpu_us_per_req']} us/req, application {app['cpu_us_per_req']} "
                                 "us/req", "met": low["cpu_us_per_req"] <= app["cpu_us_per_req"]}],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['target']:12} {row['rps']:>8} req/s {row['cpu_us_per_req']:>7} us CPU/req")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
