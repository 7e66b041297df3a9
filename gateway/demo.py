"""`gateway demo`: the whole system on one machine, in one command, with what to try printed.

Starts, as child processes tracked by PID: the embedded broker (Tansu, in memory), the
materializer, the demo bidder and the gateway (proxy + admin API) in front of it. Ctrl-C
(or SIGTERM) stops them in reverse order, each by its PID. Children run in their own
session, so the terminal's Ctrl-C reaches only this process, which then stops them in order;
they also die with it if it is killed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .broker import _die_with_parent, start_broker, stop_pid

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path


def _spawn(name: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> Child:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    return Child(name, process, log)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def instructions(port: int, admin_port: int, bidder_port: int, bootstrap: str, token: str, logs: Path) -> str:
    """What to try, with the live addresses and token filled in."""
    gw, admin = f"http://{HOST}:{port}", f"http://{HOST}:{admin_port}"
    bid = json.dumps({"id": "1", "imp": [{"id": "1"}]})
    auth = "-H \"Authorization: Bearer $TOKEN\""
    return f"""
gateway demo is up. Ctrl-C stops everything.

  gateway   {gw}  ->  demo bidder http://{HOST}:{bidder_port}
  admin API {admin}  (token below; /healthz /readyz /metrics need none)
  broker    {bootstrap}  (Tansu, in memory: the blacklist starts empty)
  logs      {logs}/

Try, in another terminal:

  TOKEN={token}

  # 1. a bid request through the gateway: the demo bidder answers with a bid
  curl -s {gw}/openrtb -d '{bid}'

  # 2. blacklist yourself; wait=1 answers once the gateway enforces it
  curl -s -X POST {auth} '{admin}/admin/commands?wait=1' -d '{{"command": "BLACKLIST 127.0.0.1", "reason": "demo"}}'

  # 3. the same request is now refused before it reaches the bidder
  curl -si {gw}/openrtb -d '{bid}' | head -1          # HTTP/1.1 403 Forbidden

  # 4. the blacklist as this gateway sees it
  curl -s {auth} {admin}/admin/ranges
  curl -s {auth} '{admin}/admin/lookup?ip=127.0.0.1'
  curl -s {auth} '{admin}/admin/ranges?format=cidr'

  # 5. whitelist yourself again, then look back in time (command offset 0 = after the first command)
  curl -s -X POST {auth} '{admin}/admin/commands?wait=1' -d '{{"command": "WHITELIST 127.0.0.1"}}'
  curl -s {auth} '{admin}/admin/history?at=0'

  # 6. status and metrics
  curl -s {auth} {admin}/admin/status
  curl -s {admin}/metrics | grep '^gateway_'
"""


def run_demo(
    port: int = 8080, admin_port: int = 8081, bidder_port: int = 9000, kafka_port: int = 0,
    token: str | None = None, out: TextIO | None = None,
) -> int:
    """Blocking entry of `gateway demo`; returns the exit code (0 after Ctrl-C, 1 if a part failed)."""
    out = out or sys.stdout
    token = token or secrets.token_urlsafe(16)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    logs = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    children: list[Child] = []
    broker = None
    code = 0
    try:
        with open(logs / "broker.log", "wb") as broker_log:
            broker = start_broker(kafka_port, log=broker_log)
        kafka = ["--kafka", broker.bootstrap]
        children.append(_spawn("materializer", ["-m", "gateway", "materialize", *kafka], logs))
        children.append(_spawn("bidder", ["-m", "gateway.bidder", "--listen", f"{HOST}:{bidder_port}"], logs))
        children.append(_spawn("gateway", [
            "-m", "gateway", "serve", *kafka, "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin_port}",
            "--upstream", f"http://{HOST}:{bidder_port}"], logs, env={"GATEWAY_ADMIN_TOKEN": token}))
        pids = " ".join(f"{c.name}={c.process.pid}" for c in children)
        print(f"demo: starting broker={broker.pid} {pids}", file=out, flush=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stop.is_set() and not _ready(f"http://{HOST}:{admin_port}/readyz"):
            if _failed(children, out) or time.monotonic() > deadline:
                print(f"demo: not ready after {READY_TIMEOUT_S:.0f} s; logs in {logs}/", file=out, flush=True)
                return 1
            time.sleep(0.1)
        if not stop.is_set():
            print(instructions(port, admin_port, bidder_port, broker.bootstrap, token, logs), file=out, flush=True)
        while not stop.wait(0.2):
            if _failed(children, out):
                code = 1
                break
        return code
    finally:
        print("demo: stopping", file=out, flush=True)
        for child in reversed(children):
            stop_pid(child.process, timeout=20)
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("demo: stopped", file=out, flush=True)


def _failed(children: list[Child], out: TextIO) -> bool:
    """True (after saying why) when a child has exited on its own."""
    for child in children:
        if child.process.poll() is not None:
            print(f"demo: the {child.name} exited with code {child.process.returncode}; its log ends:\n"
                  f"{_tail(child.log)}", file=out, flush=True)
            return True
    return False
