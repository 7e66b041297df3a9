"""The two synchronisation tools every test uses: a port nobody else is given, and a wait
with a deadline that fails loudly; and a child process that is always stopped by its PID.

Tests import them (`from helpers import eventually, free_port`); tests/ is on sys.path
because tests/conftest.py sits there.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import random
import socket
import subprocess
import sys
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that is free now and that no other caller in this process gets.

    Binding port 0, closing and reusing the number races with the kernel, which may give
    that number to any outgoing connection (a broker client, say) before the server binds
    it. Ports below the ephemeral range are never given out that way, so a port that binds
    here stays free until the test's own server takes it, unless another test run on the
    machine picks the very same one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_NEXT) % len(_PORTS)]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} on {host}")


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05,
                     what: str | None = None) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy, and return that.

    Past `timeout` seconds it raises AssertionError naming what was awaited and the last
    value seen, so a test fails where it waited, never later with a misleading message.
    An exception from `check` counts as "not yet" and is shown if time runs out.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except Exception as error:  # noqa: BLE001 - shown below if it never clears
            last = error
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            name = what or getattr(check, "__qualname__", repr(check))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {name}; last: {last!r}")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05,
               what: str | None = None) -> Any:
    """`eventually` for synchronous tests (subprocesses, files)."""
    return asyncio.run(eventually(check, timeout=timeout, interval=interval, what=what))


@contextmanager
def running(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A child process logging to `log_path`; stopped by its PID on the way out (SIGTERM, then
    SIGKILL), and the tail of its log written to stderr, where pytest shows it on failure."""
    from gateway.broker import stop_pid

    log = open(log_path, "w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_pid(proc, timeout=15)
        log.seek(0)
        sys.stderr.write(f"--- {log_path.name} ---\n{log.read()[-3000:]}")
        log.close()
