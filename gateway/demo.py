"""`gateway demo`: the whole system on one machine, in one command, with what to try printed.

Starts, as child processes tracked by PID: the embedded broker (Tansu, in memory), the
materializer, the demo bidder and the gateway (proxy + admin API) in front of it. Ctrl-C
(or SIGTERM) stops them in reverse order, each by its PID, the broker last. Every child,
the broker too, runs in its own session, so the terminal's Ctrl-C reaches only this process,
which then stops them in order; they also die with it if it is killed.

It refuses to start when one of its ports is taken, and it is ready only when the admin API
answers to this demo's own token (a readiness answer from another process cannot fool it).
The children's logs live in a temporary folder, removed after a clean stop and kept (and
named) when something failed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
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

from .broker import _die_with_parent, free_port, port_in_use, start_broker, stop_pid

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path


def _spawn(name: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> Child:
    log = logs / f"{name}.log"
    # The demo wires its children itself: settings from the caller's GATEWAY_* variables stay out.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**inherited, **(env or {})},
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    return Child(name, process, log)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _answers(url: str, token: str | None = None) -> int | None:
    """The HTTP status url answers (None: no answer)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def port_problem(ports: dict[str, int]) -> str | None:
    """Why the demo cannot use these ports (flag -> port), or None."""
    given = [p for p in ports.values() if p]
    if len(given) != len(set(given)):
        return f"demo: {', '.join(f'{flag} {port}' for flag, port in ports.items())}: give each part its own port"
    for flag, port in ports.items():
        if port and port_in_use(port):
            return f"demo: port {port} ({flag}) is already in use on {HOST}: stop what holds it, or pick another with {flag}"
    return None


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
  logs      {logs}/  (removed after a clean stop unless --keep-logs)

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
    token: str | None = None, out: TextIO | None = None, keep_logs: bool = False,
) -> int:
    """Blocking entry of `gateway demo`; returns the exit code (0 after Ctrl-C, 1 if a part failed).

    A port of 0 means a free port, chosen here (and printed)."""
    out = out or sys.stdout
    problem = port_problem({"--port": port, "--admin-port": admin_port, "--bidder-port": bidder_port,
                            "--kafka-port": kafka_port})
    if problem:
        print(problem, file=out, flush=True)
        return 1
    port, admin_port, bidder_port = (p or free_port(HOST) for p in (port, admin_port, bidder_port))
    token = token or secrets.token_urlsafe(16)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    logs = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    children: list[Child] = []
    broker = None
    code = 1
    try:
        try:
            with open(logs / "broker.log", "wb") as broker_log:
                broker = start_broker(kafka_port, log=broker_log, new_session=True)
        except RuntimeError as exc:  # no broker binary, or it would not start on that port
            print(f"demo: {exc}", file=out, flush=True)
            return 1
        kafka = ["--kafka", broker.bootstrap]
        children.append(_spawn("materializer", ["-m", "gateway", "materialize", *kafka], logs))
        children.append(_spawn("bidder", ["-m", "gateway.bidder", "--listen", f"{HOST}:{bidder_port}"], logs))
        children.append(_spawn("gateway", [
            "-m", "gateway", "serve", *kafka, "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin_port}",
            "--upstream", f"http://{HOST}:{bidder_port}"], logs, env={"GATEWAY_ADMIN_TOKEN": token}))
        pids = " ".join(f"{c.name}={c.process.pid}" for c in children)
        print(f"demo: starting broker={broker.pid} {pids}", file=out, flush=True)
        if not _wait_ready(admin_port, token, children, stop, out):
            return 1
        if not stop.is_set():
            print(instructions(port, admin_port, bidder_port, broker.bootstrap, token, logs), file=out, flush=True)
        while not stop.wait(0.2):
            if _failed(children, out):
                return 1
        code = 0
        return code
    finally:
        print("demo: stopping", file=out, flush=True)
        for child in reversed(children):  # the gateway first, the broker last: nobody loses its broker
            stop_pid(child.process, timeout=20)
            _kill_group(child.process.pid)  # a worker its parent left behind
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if code == 0 and not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
            print("demo: stopped", file=out, flush=True)
        else:
            print(f"demo: stopped; the logs are in {logs}/", file=out, flush=True)


def _wait_ready(admin_port: int, token: str, children: list[Child], stop: threading.Event, out: TextIO) -> bool:
    """Until our gateway is ready: /readyz says so and the admin API takes this demo's token
    (another process answering on the port gets 403 with it)."""
    admin = f"http://{HOST}:{admin_port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set():
        if _failed(children, out):
            return False
        if _answers(admin + "/readyz") == 200:
            status = _answers(admin + "/admin/status", token)
            if status == 200:
                return True
            if status in (401, 403):
                print(f"demo: {admin} answers, but not to this demo's token: another process holds port"
                      f" {admin_port}", file=out, flush=True)
                return False
        if time.monotonic() > deadline:
            print(f"demo: the gateway was not ready after {READY_TIMEOUT_S:.0f} s", file=out, flush=True)
            for child in children:
                print(f"demo: the {child.name}'s log ends:\n{_tail(child.log)}", file=out, flush=True)
            return False
        time.sleep(0.1)
    return True


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a child's process group (each child leads its own: pgid = its PID)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _failed(children: list[Child], out: TextIO) -> bool:
    """True (after saying why) when a child has exited on its own."""
    for child in children:
        if child.process.poll() is not None:
            print(f"demo: the {child.name} exited with code {child.process.returncode}; its log ends:\n"
                  f"{_tail(child.log)}", file=out, flush=True)
            return True
    return False
