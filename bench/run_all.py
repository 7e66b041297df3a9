#!/usr/bin/env python3
"""Run every bench and write bench/RESULTS.md with tables, charts, the machine and versions.

    python3 dev.py bench            # or: .venv/bin/python bench/run_all.py [--quick]

Each bench is its own script that stops by itself, loads only loopback and writes
bench/out/<name>.json as {"title", "command", "rows": [...], "targets": [...], ...}.
This script runs them one after another (never side by side: 2 cores), then renders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
PY = sys.executable

HUGEPAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # what deploy/ sets for the gateway

# name -> (script, arguments of a full run, arguments of a quick run, extra environment)
BENCHES: dict[str, tuple[str, list[str], list[str], dict[str, str]]] = {
    "lookup": ("lookup", [], ["--sizes", "1000,100000"], {}),
    # The same index with malloc on transparent huge pages, as deploy/ runs the gateway.
    "lookup-hugepages": ("lookup", [], ["--sizes", "1000,100000"], HUGEPAGES),
    # A real `gateway serve` on a 1M-range view, 1 and 2 workers: readiness, PSS of every process.
    "bootstrap": ("bootstrap", [], ["--ranges", "100000"], {}),
    "propagation": ("propagation", ["--preload", "0,1000000", "--load"], ["--commands", "200"], {}),
    # Where propagation's extra milliseconds at 1M go: one broker hop against the partition's size.
    "broker_fetch": ("broker_fetch", [], ["--sizes", "0,100000", "--samples", "50"], {}),
    "materializer": ("materializer", [], ["--commands", "50000", "--import-lines", "100000"], {}),
    "failover": ("failover", [], ["--rounds", "1"], {}),
    "proxy": ("proxy", [], ["--duration", "3"], {}),
    # The same comparison with two gateway workers: does throughput grow with --workers?
    "proxy-2-workers": ("proxy", ["--workers", "2"], ["--workers", "2", "--duration", "3"], {}),
    # What a hostile client can make one worker spend (CPU, RSS), and what others see meanwhile.
    "hostile": ("hostile", [], [], {}),
    # What gateway.http.middleware costs an aiohttp app: bare vs the filter alone vs setup_blacklist.
    "inline": ("inline", [], ["--duration", "2", "--rounds", "2"], {}),
}


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {name: metadata.version(name) for name in ("aiohttp", "aiokafka", "uvloop", "pytricia", "httptools")}
    tools = {}
    for tool, flag in (("nginx", "-v"), ("wrk", "-v")):
        try:
            done = subprocess.run([tool, flag], capture_output=True, text=True, timeout=5)
            tools[tool] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            tools[tool] = "not installed"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / 2**20:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        **tools,
    }


def run(name: str, script_name: str, args: list[str], env: dict[str, str]) -> dict | None:
    script = BENCH / f"{script_name}.py"
    command = [PY, str(script), *args, "--out", str(OUT / f"{name}.json")]
    print(f"run_all: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=BENCH.parent, env={**os.environ, **env})
    if done.returncode != 0:
        print(f"run_all: {name} failed with exit code {done.returncode}", file=sys.stderr)
        return None
    result = json.loads((OUT / f"{name}.json").read_text())
    result["command"] = " ".join([*(f"{k}={v}" for k, v in env.items()), "python", f"bench/{script_name}.py", *args])
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def charts(results: dict[str, dict]) -> list[str]:
    """PNG charts beside RESULTS.md; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    proxy = results.get("proxy")
    if proxy:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for target in dict.fromkeys(row["target"] for row in proxy["rows"]):
            rows = sorted((r for r in proxy["rows"] if r["target"] == target), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rows]
            left.plot(xs, [r["rps"] for r in rows], marker="o", label=target)
            right.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=target)
        left.set(xlabel="concurrent connections", ylabel="requests/s", title="Throughput", xscale="log")
        right.set(xlabel="concurrent connections", ylabel="p99 latency (ms)", title="p99 latency", xscale="log")
        left.legend()
        fig.tight_layout()
        fig.savefig(BENCH / "proxy.png", dpi=100)
        made.append("proxy.png")
    lookup = results.get("lookup")
    if lookup:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, style in (("lookup", "-"), ("lookup-hugepages", "--")):
            rows = results.get(name, {}).get("rows", [])
            xs = [r["ranges"] for r in rows]
            for key in ("ns_v4_hit", "ns_v4_miss", "ns_v6_hit", "ns_v6_miss"):
                label = key[3:] + (" (huge pages)" if name != "lookup" else "")
                ax.plot(xs, [r[key] for r in rows], style, marker="o", label=label)
        ax.axhline(1000, color="grey", linestyle="--", label="target 1 µs")
        ax.set(xlabel="ranges in the index", ylabel="ns per lookup", xscale="log", title="Lookup cost")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(BENCH / "lookup.png", dpi=100)
        made.append("lookup.png")
    propagation = results.get("propagation")
    if propagation and propagation.get("samples_ms"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(propagation["samples_ms"], bins=50)
        ax.set(xlabel="command published → enforced (ms)", ylabel="commands", title="Propagation")
        fig.tight_layout()
        fig.savefig(BENCH / "propagation.png", dpi=100)
        made.append("propagation.png")
    bootstrap = results.get("bootstrap")
    if bootstrap and bootstrap.get("rows") and "worker_pss_mb" in bootstrap["rows"][0]:
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = bootstrap["rows"]
        xs = [str(r["workers"]) for r in rows]
        bottom = [r["supervisor_pss_mb"] for r in rows]
        ax.bar(xs, bottom, label="supervisor")
        for i in range(max(r["workers"] for r in rows)):
            part = [r["worker_pss_mb"][i] if i < r["workers"] else 0 for r in rows]
            ax.bar(xs, part, bottom=bottom, label=f"worker {i}")
            bottom = [b + p for b, p in zip(bottom, part)]
        ax.set(xlabel="--workers", ylabel="PSS (MB)", title=f"gateway serve memory, {bootstrap['view']['ranges']:,} ranges")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(BENCH / "bootstrap.png", dpi=100)
        made.append("bootstrap.png")
    plt.close("all")
    return made


def render(results: dict[str, dict], info: dict[str, str], quick: bool) -> str:
    parts = [
        "# Bench results\n",
        f"Generated by `python3 dev.py bench{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
        " Every figure of one bench comes from one run; ratios compare targets measured side by side.\n",
        "## Machine\n",
        table([info]),
    ]
    for name, result in results.items():
        parts.append(f"## {result.get('title', name)} [{name}]\n")
        parts.append(f"Command: `{result['command']}` ({result['seconds']} s)\n")
        if result.get("notes"):
            parts.append(result["notes"] + "\n")
        parts.append(table(result["rows"]))
        if result.get("targets"):
            parts.append("Against the targets of docs/ARCHITECTURE.md:\n")
            parts.append(table(result["targets"]))
        if (BENCH / f"{name}.png").exists():
            parts.append(f"![{name}]({name}.png)\n")
    parts += workers_section(results)
    return "\n".join(parts)


def workers_section(results: dict[str, dict]) -> list[str]:
    """Gateway throughput with 1 and 2 workers, per concurrency (the two proxy runs)."""
    one, two = results.get("proxy"), results.get("proxy-2-workers")
    if not (one and two):
        return []

    def gateway_rps(result: dict) -> dict[int, int]:
        return {r["concurrency"]: r["rps"] for r in result["rows"] if r["target"] == "gateway"}

    rps1, rps2 = gateway_rps(one), gateway_rps(two)
    rows = [{"concurrency": c, "1 worker req/s": rps1[c], "2 workers req/s": rps2[c], "ratio": round(rps2[c] / rps1[c], 2)}
            for c in sorted(rps1) if c in rps2]
    return ["## Scaling with --workers\n",
            "From the two proxy runs above (wrk itself needs one of the two cores).\n", table(rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter loads")
    parser.add_argument("--only", help="comma-separated bench names")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    names = args.only.split(",") if args.only else list(BENCHES)
    results = {}
    for name in names:
        script, full, quick, env = BENCHES[name]
        result = run(name, script, quick if args.quick else full, env)
        if result is not None:
            results[name] = result
    charts(results)
    (BENCH / "RESULTS.md").write_text(render(results, machine(), args.quick))
    print(f"run_all: wrote {BENCH / 'RESULTS.md'}")
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
