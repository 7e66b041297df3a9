"""The test helpers keep their promises: ports nobody else is given, waits that fail loudly at their deadline."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import _claim, eventually, free_port, wait_until

TESTS = Path(__file__).resolve().parent


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(1024 <= p < low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_handed_out_here_is_refused_to_another_test_run():
    mine = [free_port() for _ in range(5)]
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from helpers import _claim; " \
             f"print([p for p in {mine!r} if _claim(p)])"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert other.stdout.strip() == "[]"  # every one of them is held by this process
    assert not _claim(mine[0])  # and this process never hands one out twice either


async def test_eventually_returns_the_first_truthy_value():
    values = iter([0, None, "", 7])
    assert await eventually(lambda: next(values), interval=0.001) == 7


async def test_eventually_fails_loudly_at_its_deadline_even_when_the_check_hangs():
    never = asyncio.Event()
    with pytest.raises(AssertionError, match=r"timed out after 0.3 s waiting for the hung check; last: TimeoutError"):
        await asyncio.wait_for(eventually(never.wait, timeout=0.3, what="the hung check"), 30)


def test_wait_until_shows_the_last_error_of_the_check():
    def check():
        raise ConnectionRefusedError("not listening yet")

    with pytest.raises(AssertionError, match="not listening yet"):
        wait_until(check, timeout=0.2, what="a listener")


async def test_eventually_until_returns_the_value_and_shows_the_last_one_when_it_never_comes():
    readings = iter(range(100))
    assert await eventually(lambda: next(readings), until=lambda n: n >= 3, interval=0.001) == 3
    with pytest.raises(AssertionError, match=r"waiting for a big number; last: \{'n': 1\}"):
        await eventually(lambda: {"n": 1}, until=lambda r: r["n"] > 5, timeout=0.1, what="a big number")
