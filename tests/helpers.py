"""The synchronisation tools every test uses: a port nobody else is given, a wait with a
deadline that fails loudly, and a child process that is always stopped by its PID.

Tests import them (`from helpers import eventually, free_port`); tests/ is on sys.path
because tests/conftest.py sits there.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import itertools
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range: it never hands them to an outgoing connection."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_PORTS = _below_ephemeral()
# Start somewhere different in each process, so parallel test runs on one machine rarely
# meet; then walk the range, so one process never hands out the same port twice.
_NEXT = itertools.count(random.Random(os.getpid() ^ time.time_ns()).randrange(len(_PORTS)))
# Every test run on the machine (several worktrees, several engineers) claims its ports with
# an flock on one file per port; the kernel drops a claim when its process dies.
_CLAIMS = os.path.join(tempfile.gettempdir(), f"gateway-test-ports-{os.getuid()}")
_HELD: list[int] = []  # the claimed files' descriptors, open for the life of this process


def _claim(port: int) -> bool:
    """Whether this process now holds `port` against every other process that asks here."""
    os.makedirs(_CLAIMS, exist_ok=True)
    fd = os.open(os.path.join(_CLAIMS, str(port)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _HELD.append(fd)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that is free now and that no other caller gets while this process lives.

    Binding port 0, closing and reusing the number races with the kernel, which may give
    that number to any outgoing connection (a broker client, say) before the server binds
    it. Ports below the ephemeral range are never given out that way. Another test run on
    the machine (another worktree) could still pick the same number: every caller claims
    its port with a lock file first, so only a process outside the tests can take it
    before the test's own server binds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_NEXT) % len(_PORTS)]
        if not _claim(port):
            continue  # another test run holds it
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue  # in use by something else; keep the claim, it is no use to anyone here
        return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} on {host}")


async def eventually(check: Callable[[], Any], *, until: Callable[[Any], Any] | None = None,
                     timeout: float = 30.0, interval: float = 0.05, what: str | None = None) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy, and return that.

    With `until`, poll until `until(check())` is truthy and return what `check()` returned:
    `await eventually(read_status, until=lambda s: s["lag"] == 0)` shows the last status
    read when it fails, not just False.

    Past `timeout` seconds it raises AssertionError naming what was awaited and the last
    value seen, so a test fails where it waited, never later with a misleading message.
    An exception from `check` counts as "not yet" and is shown if time runs out. An async
    check that hangs (a request to a frozen process) is cut off at the deadline too.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await asyncio.wait_for(last, max(deadline - time.monotonic(), interval))
        except Exception as error:  # noqa: BLE001 - shown below if it never clears
            last = error
        else:
            if (until(last) if until is not None else last):
                return last
        if time.monotonic() >= deadline:
            name = what or getattr(check, "__qualname__", repr(check))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {name}; last: {last!r}")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], Any], *, until: Callable[[Any], Any] | None = None, timeout: float = 30.0,
               interval: float = 0.05, what: str | None = None) -> Any:
    """`eventually` for synchronous tests (subprocesses, files)."""
    return asyncio.run(eventually(check, until=until, timeout=timeout, interval=interval, what=what))


@contextmanager
def running(argv: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child process logging to `log_path`; stopped by its PID on the way out (SIGTERM, then
    SIGKILL), and the tail of its log written to stderr, where pytest shows it on failure."""
    from gateway.broker import stop_pid

    with open(log_path, "w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            yield proc
        finally:
            stop_pid(proc, timeout=20)
            log.seek(0)
            sys.stderr.write(f"--- {log_path.name} (exit {proc.returncode}) ---\n{log.read()[-3000:]}\n")


async def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and return once every thread of it is stopped.

    kill() returns when the signal is queued, not when the process has stopped: a thread
    still running for a moment can answer one more request, and a test that freezes a broker
    and then expects silence would sometimes see it answer."""
    import signal

    os.kill(pid, signal.SIGSTOP)

    def states() -> set[str]:
        out = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        return out

    await eventually(states, until=lambda s: s <= {"T", "t"}, timeout=timeout, interval=0.005,
                     what=f"every thread of {pid} stopped")
