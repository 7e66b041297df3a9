"""Request-path benchmark: direct vs the gateway's two engines vs a minimal aiohttp proxy vs nginx.

One run, loopback only, bounded durations. An nginx bidder stub answers 200; wrk drives
each target at c=16 and c=64 (throughput) and c=1 (added latency). Targets: `direct` (the
bidder), `gateway` (the fast engine), `gw-aiohttp` (the aiohttp engine, `--engine
aiohttp`), `inline` (an aiohttp bidder app filtering with gateway.http.middleware: no
proxy hop, it answers itself), `aiohttp` (the minimal ClientSession proxy) and `nginx`.
All hold the same blacklist of N IPv4 ranges (none covering loopback, so every request is
looked up and forwarded). CPU per request is read from /proc/<pid>/stat (utime + stime of
the target's processes) around each wrk run.

    .venv/bin/python bench/proxy.py [--ranges 100000] [--duration 5] [--workers 1] [--prebuilt]

Prints a table and writes bench/out/proxy.json. The gateway is the real `gateway serve`
(supervisor + workers, CPU of all counted) against the embedded broker, with the ranges
published as BLACKLIST commands and materialized first; `--prebuilt` instead runs the
Proxy alone on uvloop with an index built in-process (no broker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.broker import stop_pid

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = ("direct", "gateway", "gw-aiohttp", "inline", "aiohttp", "nginx")
ENGINES = {"gateway": "fast", "gw-aiohttp": "aiohttp"}  # target -> gateway serve --engine


# -- the ranges ---------------------------------------------------------------------------

def blacklist(count: int, seed: int = 7) -> list[tuple[int, int]]:
    """`count` disjoint, non-adjacent IPv4 ranges (sorted), none in 127.0.0.0/8."""
    rng = random.Random(seed)
    low, high = 1 << 24, 223 << 24
    starts = sorted(rng.sample(range(low, high, 1 << 9), count))  # gaps: never adjacent
    out = []
    for start in starts:
        if start >> 24 == 127:
            continue
        out.append((start, start + rng.choice((0, 15, 255))))
    return out


def dotted(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


# -- roles run in child processes -----------------------------------------------------------

async def publish_blacklist(kafka: str, ranges: list[tuple[int, int]]) -> None:
    from gateway.blacklist.commands import Command, parse_network
    from gateway.kafka.config import KafkaConfig
    from gateway.kafka.publisher import Publisher

    commands = []
    for start, end in ranges:
        prefix = 32 - (end - start + 1).bit_length() + 1
        commands.append(Command("BLACKLIST", parse_network(f"{dotted(start)}/{prefix}")))
    async with Publisher(KafkaConfig(kafka)) as publisher:
        for i in range(0, len(commands), 10_000):
            await publisher.publish_many(commands[i : i + 10_000])


def wait_view(admin_port: int, token: str, count: int, timeout: float = 180.0) -> None:
    """Until the gateway (supervisor and every worker) holds all `count` ranges."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/status",
                                         headers={"Authorization": f"Bearer {token}"})
            status = json.loads(urllib.request.urlopen(req, timeout=2).read())
            applied = status["applied_command"]
            if status["ranges"]["4"] == count and all(w["applied_command"] == applied for w in status["workers"]):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the gateway did not get the whole blacklist in time")


def role_gateway(port: int, upstream: str, count: int, engine: str = "fast") -> None:
    import uvloop

    from gateway.blacklist.index import Index
    from gateway.http.config import ServeConfig
    from gateway.http.engines import engine_class
    from gateway.kafka.config import KafkaConfig

    class View:
        ready = True
        index = Index.build((4, s, e) for s, e in blacklist(count))

    async def main() -> None:
        config = ServeConfig(kafka=KafkaConfig("unused:0"), upstreams=(upstream,), listen=("127.0.0.1", port),
                             engine=engine)
        proxy = engine_class(engine)(config, View())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
        await proxy.serve(sock)
        await asyncio.Event().wait()

    uvloop.run(main())


def role_aiohttp(port: int, upstream: str, count: int) -> None:
    """The minimal proxy the targets compare against: ClientSession, one process, uvloop."""
    import uvloop
    from aiohttp import ClientSession, web

    from gateway.blacklist.index import Index

    index = Index.build((4, s, e) for s, e in blacklist(count))

    async def main() -> None:
        session = ClientSession()

        async def handle(request: web.Request) -> web.Response:
            if index.blocks(request.remote):
                return web.Response(status=403)
            async with session.request(request.method, upstream + request.path_qs,
                                       data=await request.read()) as response:
                return web.Response(status=response.status, body=await response.read())

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    uvloop.run(main())


# -- process helpers --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answering 200 on port {port}")


def tree(pid: int) -> list[int]:
    """pid and its descendants (nginx master + workers, gateway supervisor + workers)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += map(int, children)
        frontier += map(int, children)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def render(template: str, **values: object) -> str:
    text = (HERE / "nginx" / template).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def start_nginx(workdir: Path, name: str, config: str) -> subprocess.Popen:
    path = workdir / f"{name}.conf"
    path.write_text(config)
    return subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(path)], stderr=subprocess.DEVNULL)


# -- wrk --------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(port: int, connections: int, duration: float, pids: list[int], scheme: str = "http") -> dict:
    before = cpu_seconds(pids)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", f"{scheme}://127.0.0.1:{port}/bid"],
        capture_output=True, text=True, check=True, timeout=duration + 30,
    ).stdout
    cpu = cpu_seconds(pids) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    return {
        "rps": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))),
        "p50_us": round(latency["50"] * 1e6), "p99_us": round(latency["99"] * 1e6),
        "cpu_us_per_req": round(cpu * 1e6 / requests, 1) if pids else None,
        "requests": requests, "non_2xx": int(errors.group(1)) if errors else 0,
    }


# -- HTTPS rows: the gateway and nginx terminating TLS with one certificate --------------------

def https_certificate(workdir: Path) -> tuple[Path, Path]:
    """One throwaway certificate for 127.0.0.1 (trustme), given to both TLS terminators."""
    import trustme

    issued = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = workdir / "https.pem", workdir / "https.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    key.chmod(0o600)
    return cert, key


def nginx_https_conf(workdir: Path, port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """bench/nginx/proxy.conf with its listener over TLS (1.2 and 1.3, nginx's default ciphers)."""
    conf = render("proxy.conf", dir=workdir, port=port, upstream_port=upstream_port)
    listen = f"listen 127.0.0.1:{port} reuseport backlog=4096;"
    assert listen in conf, "bench/nginx/proxy.conf changed its listen line"
    return conf.replace("proxy.pid", "proxy-https.pid").replace(listen, (
        f"listen 127.0.0.1:{port} ssl reuseport backlog=4096;\n"
        f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;"))


def tls_handshake(port: int, timeout: float = 60.0) -> dict:
    """Wait until port answers 200 over HTTPS; the protocol and cipher it negotiated (to show both match)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the bench's throwaway CA
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, context.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return {"protocol": s.version(), "cipher": s.cipher()[0]}
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answering 200 over HTTPS on port {port}")


def https_rows(args: argparse.Namespace, workdir: Path, ranges: list[tuple[int, int]], bidder_port: int,
               broker, processes: list[subprocess.Popen]) -> tuple[dict[str, dict], dict]:
    """wrk over HTTPS with keep-alive (handshakes only as wrk opens its connections) against the real
    `gateway serve --tls-cert` and nginx with the same certificate: (results, negotiated TLS per target)."""
    from gateway.broker import start_broker

    cert, key = https_certificate(workdir)
    gw = [sys.executable, "-m", "gateway"]
    if broker is None:  # --prebuilt: a broker and view of the HTTPS gateway's own
        broker = start_broker()
        processes.append(broker.process)
        processes.append(subprocess.Popen([*gw, "materialize", "--kafka", broker.bootstrap]))
        asyncio.run(publish_blacklist(broker.bootstrap, ranges))
    port, admin_port, token = free_port(), free_port(), "bench"
    gateway = subprocess.Popen([*gw, "serve", "--kafka", broker.bootstrap, "--upstream",
                                f"http://127.0.0.1:{bidder_port}", "--listen", f"127.0.0.1:{port}",
                                "--admin-listen", f"127.0.0.1:{admin_port}", "--admin-token", token,
                                "--workers", str(args.workers), "--tls-cert", str(cert), "--tls-key", str(key)])
    processes.append(gateway)
    wait_view(admin_port, token, len(ranges))
    nginx_port = free_port()
    nginx = start_nginx(workdir, "proxy-https", nginx_https_conf(workdir, nginx_port, bidder_port, cert, key))
    processes.append(nginx)
    targets = {"gateway-https": (port, gateway), "nginx-https": (nginx_port, nginx)}
    tls = {name: tls_handshake(p) for name, (p, _) in targets.items()}
    results = {}
    for name, (p, process) in targets.items():
        pids = tree(process.pid)
        wrk(p, 16, 1, pids, "https")  # warm up
        results[name] = {f"c{c}": wrk(p, c, args.duration, pids, "https") for c in (1, 16, 64)}
        print(f"  measured {name}", file=sys.stderr)
    return results, tls


def https_summary(results: dict[str, dict], tls: dict) -> dict:
    """HTTPS gateway against HTTPS nginx (same run, same certificate), and what TLS adds to each."""
    out: dict = {"negotiated": tls}
    for c in ("c16", "c64"):
        gw, ngx = results["gateway-https"][c], results["nginx-https"][c]
        out[c] = {
            "gateway_https_vs_nginx_https": round(gw["rps"] / ngx["rps"], 2),
            "cpu_us_per_req": {"gateway-https": gw["cpu_us_per_req"], "nginx-https": ngx["cpu_us_per_req"]},
            "tls_adds_cpu_us": {name: round(results[f"{name}-https"][c]["cpu_us_per_req"]
                                            - results[name][c]["cpu_us_per_req"], 1) for name in ("gateway", "nginx")},
        }
    return out


def https_table(summary: dict) -> str:
    lines = [f"TLS negotiated: {summary['negotiated']}"]
    for c in ("c16", "c64"):
        r = summary[c]
        lines.append(f"{c}: gateway-https/nginx-https = {r['gateway_https_vs_nginx_https']}x; CPU us/req "
                     f"{r['cpu_us_per_req']}; TLS adds {r['tls_adds_cpu_us']} us/req over plain HTTP")
    return "\n".join(lines)


def median_run(runs: list[dict]) -> dict:
    """Per figure, the median over rounds (one round: that run)."""
    out = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs if r[key] is not None)
        out[key] = values[len(values) // 2] if values else None
    return out


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranges", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--workers", type=int, default=1, help="gateway serve --workers")
    parser.add_argument("--prebuilt", action="store_true", help="gateway without broker: index built in-process")
    parser.add_argument("--no-https", action="store_true", help="skip the HTTPS rows (gateway and nginx over TLS)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="wrk runs per target and concurrency, targets taken in turn; the median is reported")
    parser.add_argument("--out", default=str(HERE / "out" / "proxy.json"))
    parser.add_argument("--role", choices=("gateway", "gw-aiohttp", "aiohttp"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "gw-aiohttp":
        role_gateway(args.port, args.upstream, args.ranges, engine="aiohttp")
        return
    if args.role:
        {"gateway": role_gateway, "aiohttp": role_aiohttp}[args.role](args.port, args.upstream, args.ranges)
        return
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian: apt-get install -y wrk nginx)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    ranges = blacklist(args.ranges)
    (workdir / "blacklist.geo").write_text("".join(f"{dotted(s)}-{dotted(e)} 1;\n" for s, e in ranges))
    bidder_port = free_port()
    upstream = f"http://127.0.0.1:{bidder_port}"
    processes: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    https_tls: dict = {}
    broker = None
    try:
        bidder = start_nginx(workdir, "bidder", render("bidder.conf", dir=workdir, port=bidder_port))
        processes.append(bidder)
        wait_http(bidder_port)
        targets = {"direct": (bidder_port, [])}
        for name in TARGETS[1:]:
            port = free_port()
            if name == "nginx":
                conf = render("proxy.conf", dir=workdir, port=port, upstream_port=bidder_port)
                process = start_nginx(workdir, "proxy", conf)
            elif name in ENGINES and not args.prebuilt:
                from gateway.broker import start_broker

                gw = [sys.executable, "-m", "gateway"]
                started = time.monotonic()
                if broker is None:
                    broker = start_broker()
                    processes.append(subprocess.Popen([*gw, "materialize", "--kafka", broker.bootstrap]))
                    asyncio.run(publish_blacklist(broker.bootstrap, ranges))
                admin_port, token = free_port(), "bench"
                process = subprocess.Popen([*gw, "serve", "--kafka", broker.bootstrap, "--upstream", upstream,
                                            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
                                            "--admin-token", token, "--workers", str(args.workers),
                                            "--engine", ENGINES[name]])
                processes.append(process)
                wait_view(admin_port, token, len(ranges))
                print(f"  {name} holds {len(ranges)} ranges ({time.monotonic() - started:.1f} s)", file=sys.stderr)
            elif name == "inline":  # bench/inline.py's app with the middleware, index built in-process
                process = subprocess.Popen([sys.executable, str(HERE / "inline.py"), "--role", "middleware",
                                            "--port", str(port), "--kafka", "unused:9", "--ranges", str(args.ranges)])
            else:
                process = subprocess.Popen([sys.executable, __file__, "--role", name, "--port", str(port),
                                            "--upstream", upstream, "--ranges", str(args.ranges)])
            if process not in processes:
                processes.append(process)
            wait_http(port)
            targets[name] = (port, tree(process.pid))
        for name, (port, pids) in targets.items():
            wrk(port, 16, 1, pids)  # warm up: connections, caches
        runs: dict[str, dict[str, list[dict]]] = {name: {f"c{c}": [] for c in (1, 16, 64)} for name in targets}
        for round_ in range(args.rounds):  # targets in turn, round after round: drift hits all alike
            for name, (port, pids) in targets.items():
                for c in (1, 16, 64):
                    runs[name][f"c{c}"].append(wrk(port, c, args.duration, pids))
                print(f"  measured {name} (round {round_ + 1}/{args.rounds})", file=sys.stderr)
        results = {name: {conc: median_run(rs) for conc, rs in by_conc.items()} for name, by_conc in runs.items()}
        if not args.no_https:
            https, https_tls = https_rows(args, workdir, ranges, bidder_port, broker, processes)
            results.update(https)
    finally:
        for process in reversed(processes):
            stop_pid(process, timeout=10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    report = summarize(results, args)
    if https_tls:
        report["https"] = https_summary(results, https_tls)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    if "https" in report:
        print(https_table(report["https"]))
    print(f"\nwritten: {args.out}")


def summarize(results: dict[str, dict], args: argparse.Namespace) -> dict:
    """The report in bench/run_all.py's shape (title, rows, targets, notes) plus the details."""
    gw, gwa, aio, ngx, direct = (results[k] for k in ("gateway", "gw-aiohttp", "aiohttp", "nginx", "direct"))
    ratios = {
        f"c{c}": {
            "gateway_vs_aiohttp": round(gw[f"c{c}"]["rps"] / aio[f"c{c}"]["rps"], 2),
            "gateway_vs_nginx": round(gw[f"c{c}"]["rps"] / ngx[f"c{c}"]["rps"], 2),
            "gw-aiohttp_vs_aiohttp": round(gwa[f"c{c}"]["rps"] / aio[f"c{c}"]["rps"], 2),
            "gw-aiohttp_vs_gateway": round(gwa[f"c{c}"]["rps"] / gw[f"c{c}"]["rps"], 2),
            "gw-aiohttp_vs_nginx": round(gwa[f"c{c}"]["rps"] / ngx[f"c{c}"]["rps"], 2),
        }
        for c in (16, 64)
    }
    added = {
        name: {"p50_us": results[name]["c1"]["p50_us"] - direct["c1"]["p50_us"],
               "p99_us": results[name]["c1"]["p99_us"] - direct["c1"]["p99_us"]}
        for name in TARGETS[1:]
    }
    cpu_aio = max(gwa[c]["cpu_us_per_req"] for c in ("c16", "c64"))
    worst_aio_engine = min(r["gw-aiohttp_vs_aiohttp"] for r in ratios.values())
    cpu_ratio = min(aio[c]["cpu_us_per_req"] / gwa[c]["cpu_us_per_req"] for c in ("c16", "c64"))
    rows = [
        {"target": name, "concurrency": int(conc[1:]), "rps": r["rps"], "p50_ms": round(r["p50_us"] / 1000, 3),
         "p99_ms": round(r["p99_us"] / 1000, 3), "cpu_us_per_req": r["cpu_us_per_req"], "non_2xx": r["non_2xx"]}
        for name, runs in results.items() for conc, r in runs.items()
    ]
    cpu = max(gw[c]["cpu_us_per_req"] for c in ("c16", "c64"))
    worst_aio = min(r["gateway_vs_aiohttp"] for r in ratios.values())
    worst_ngx = min(r["gateway_vs_nginx"] for r in ratios.values())
    targets = [
        {"target": "CPU per forwarded request <= 24 us (goal 20 us)", "measured": f"{cpu} us (worst of c=16, c=64)",
         "met": cpu <= 24},
        {"target": "throughput >= 3x minimal aiohttp proxy", "measured": f"{worst_aio}x (worst)", "met": worst_aio >= 3},
        {"target": "throughput >= 0.65x nginx proxy_pass (goal 0.8x)", "measured": f"{worst_ngx}x (worst)",
         "met": worst_ngx >= 0.65},
        {"target": "added latency at c=1, p50 <= 100 us", "measured": f"{added['gateway']['p50_us']} us",
         "met": added["gateway"]["p50_us"] <= 100},
        {"target": "added latency at c=1, p99 <= 300 us", "measured": f"{added['gateway']['p99_us']} us",
         "met": added["gateway"]["p99_us"] <= 300},
        {"target": "aiohttp engine: CPU per forwarded request <= 50 us", "measured": f"{cpu_aio} us (worst of c=16, "
         "c=64)", "met": cpu_aio <= 50},
        {"target": "aiohttp engine: throughput >= 2.5x minimal aiohttp proxy", "measured": f"{worst_aio_engine}x "
         "(worst)", "met": worst_aio_engine >= 2.5},
        {"target": "aiohttp engine: CPU per request <= 1/2.5 of the minimal aiohttp proxy's",
         "measured": f"{round(cpu_ratio, 2)}x less (worst)", "met": cpu_ratio >= 2.5},
    ]
    gateway = ("gateway serve (supervisor + %d worker, real broker and follower)" % args.workers
               if not args.prebuilt else "the Proxy alone, index built in-process")
    return {
        "title": "Request path: the gateway's engines vs minimal aiohttp proxy vs nginx (wrk, loopback)",
        "notes": (f"{args.ranges} IPv4 blacklist ranges in every proxy (loopback not covered, so every request is "
                  f"looked up and forwarded). gateway = the fast engine, {gateway}; gw-aiohttp = the same with "
                  "--engine aiohttp; inline = an aiohttp app answering itself behind the blacklist middleware "
                  "(index built in-process; no proxy hop); aiohttp = ClientSession proxy, one process, "
                  "uvloop; nginx = proxy_pass + geo, 1 worker, keepalive upstream. Bidder: nginx return 200. "
                  f"wrk -t1, {args.duration} s per run, {args.rounds} round(s) with targets in turn, medians; "
                  "CPU = utime+stime of the proxy's processes / requests. "
                  "Added latency = p50/p99 at c=1 minus direct (noisy on a shared 2-core machine)."),
        "rows": rows,
        "targets": targets,
        "ratios": ratios,
        "added_latency_c1_us": added,
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version()},
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(report: dict) -> str:
    lines = [f"{'target':10} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'non-2xx':>7}"]
    for r in report["rows"]:
        cpu = "-" if r["cpu_us_per_req"] is None else f"{r['cpu_us_per_req']:.1f}"
        lines.append(f"{r['target']:10} {r['concurrency']:>4} {r['rps']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                     f"{cpu:>10} {r['non_2xx']:>7}")
    lines.append("")
    for conc, r in report["ratios"].items():
        lines.append(f"{conc}: gateway/aiohttp = {r['gateway_vs_aiohttp']}x  gateway/nginx = {r['gateway_vs_nginx']}x  "
                     f"gw-aiohttp/aiohttp = {r['gw-aiohttp_vs_aiohttp']}x  gw-aiohttp/gateway = "
                     f"{r['gw-aiohttp_vs_gateway']}x  gw-aiohttp/nginx = {r['gw-aiohttp_vs_nginx']}x")
    for name, a in report["added_latency_c1_us"].items():
        lines.append(f"added latency at c=1, {name}: p50 {a['p50_us']:+} us, p99 {a['p99_us']:+} us")
    for t in report["targets"]:
        lines.append(f"{'ok    ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
