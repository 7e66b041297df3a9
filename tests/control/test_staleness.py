"""Staleness as a user sees it (DESIGN invariant 5): `gateway serve` as a process, read through its own
/admin/status and /metrics while its broker answers, is killed, or is frozen.

The rules:
- the age of the view is the time since the gateway last knew its view was current: while the broker
  answers and nothing is left to apply, it follows the broker's answers, not the last record applied;
- while the broker is down or frozen, the age grows from the broker's last answer, the lag stays the
  last number the broker gave (a number, never "unknown"), and the last view is still enforced;
- once the broker answers again, the age falls back.

No timing here is a limit: OUTAGE_S is how stale a view must visibly get (a target that a broken
gateway never reaches), and every wait has a deadline that fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from helpers import eventually, free_port
from liveserve import answers, gateway_process, samples

from gateway.broker import Broker

TOKEN = "staleness-test-token"
OUTAGE_S = 3.0
AGE, LAG, READY = ("gateway_view_age_seconds", ()), ("gateway_view_lag_records", ()), ("gateway_ready", ())


@dataclass
class Reading:
    """One /admin/status answer and the test's own clock around the request."""

    body: dict
    sent: float
    received: float

    def __getitem__(self, key: str):
        return self.body[key]


@dataclass
class Gateway:
    """A running `gateway serve`: its front door, its admin listener, and the broker it follows."""

    port: int
    admin: str
    session: aiohttp.ClientSession
    started: float

    async def status(self) -> Reading:
        sent = time.time()
        async with self.session.get(self.admin + "/admin/status", headers={"Authorization": f"Bearer {TOKEN}"},
                                    timeout=aiohttp.ClientTimeout(total=10)) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        return Reading(body, sent, time.time())

    async def metrics(self) -> dict:
        async with self.session.get(self.admin + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as response:
            assert response.status == 200
            return samples(await response.text())

    async def blacklist(self, cidr: str) -> float:
        """Publish through the admin API and wait until this gateway applied it; returns when it was sent."""
        sent = time.time()
        async with self.session.post(self.admin + "/admin/commands?wait=1&timeout=60",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     json={"command": f"BLACKLIST {cidr}"}) as response:
            assert response.status == 202, await response.text()
        return sent

    async def front_door(self) -> int:
        """The status of one request from 127.0.0.1 on a connection of its own (any worker may take it)."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            async with fresh.post(f"http://127.0.0.1:{self.port}/", data=b"{}",
                                  timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status

    async def blocks_everywhere(self) -> None:
        """Every worker refuses 127.0.0.1: ten requests on fresh connections in a row answer 403."""
        async def all_blocked() -> bool:
            return [await self.front_door() for _ in range(10)] == [403] * 10

        await eventually(all_blocked, timeout=60, interval=0.2, what="every worker to refuse 127.0.0.1")


@contextlib.asynccontextmanager
async def serving(bootstrap: str, tmp_path: Path, *extra: str, materializer: bool = True) -> AsyncIterator[Gateway]:
    """`gateway materialize` (optional) and `gateway serve --workers 2` on that broker, as processes."""
    port, admin = free_port(), free_port()
    kafka = ["--kafka", bootstrap, *extra]
    with contextlib.ExitStack() as processes:
        if materializer:
            processes.enter_context(gateway_process(["materialize", *kafka], tmp_path / "materialize.log"))
        started = time.time()
        serve = processes.enter_context(gateway_process(
            ["serve", *kafka, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
             "--admin-token", TOKEN, "--upstream", "http://127.0.0.1:9", "--workers", "2"], tmp_path / "serve.log"))
        async with aiohttp.ClientSession() as session:
            await answers(session, f"http://127.0.0.1:{admin}/readyz", process=serve)
            yield Gateway(port, f"http://127.0.0.1:{admin}", session, started)


async def test_an_idle_gateway_whose_broker_answers_reports_its_view_as_current(kafka_bootstrap, topic_names, tmp_path):
    """No record arrives, yet the view is known current: the age follows the broker's answers and the lag is 0."""
    topics = ("--commands-topic", topic_names.commands, "--ranges-topic", topic_names.ranges)
    async with serving(kafka_bootstrap, tmp_path, *topics, materializer=False) as gateway:
        ready = time.time()  # the process took its baseline before this; nothing was applied since
        reading = await eventually(
            gateway.status, until=lambda r: r["age_seconds"] + 1 < r.sent - ready and r["lag"] == 0,
            timeout=60, interval=0.2, what="an age below the time since the gateway got ready")
        assert reading["ready"] is True and reading["seconds_since_contact"] is not None
        assert reading["age_seconds"] <= reading["seconds_since_contact"] + 0.002  # never older than the last answer
        metrics = await eventually(gateway.metrics, until=lambda m: m.get(AGE, 1e9) + 2 < time.time() - ready,
                                   timeout=60, interval=0.2, what="gateway_view_age_seconds to follow the broker")
        assert metrics[LAG] == 0 and metrics[READY] == 1


async def stale(gateway: Gateway, posted: float) -> Reading:
    """Wait until /admin/status and /metrics both show a view at least OUTAGE_S old, with the lag a number;
    returns the status read."""
    reading = await eventually(
        gateway.status, until=lambda r: r["age_seconds"] >= OUTAGE_S and r["seconds_since_contact"] >= OUTAGE_S,
        timeout=60, interval=0.2, what=f"/admin/status to show a view at least {OUTAGE_S:g} s old")
    assert reading["ready"] is True
    assert reading["lag"] == 0  # the last lag the broker gave: a number, not "unknown"
    assert reading["age_seconds"] <= reading.received - posted + 0.002  # the command applied after `posted`
    assert reading["ranges"] == {"4": 1, "6": 0} and reading["applied_command"] is not None
    metrics = await eventually(gateway.metrics, until=lambda m: m.get(AGE, 0) >= OUTAGE_S, timeout=60,
                               interval=0.2, what=f"gateway_view_age_seconds >= {OUTAGE_S:g}")
    assert metrics[LAG] == 0 and metrics[READY] == 1
    assert await gateway.front_door() == 403  # the last view is still enforced
    return reading


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_while_the_broker_is_down_the_age_grows_the_lag_stays_a_number_and_the_view_is_served(
        own_broker: Broker, tmp_path, sig):
    async with serving(own_broker.bootstrap, tmp_path) as gateway:
        posted = await gateway.blacklist("127.0.0.1")
        await gateway.blocks_everywhere()
        os.kill(own_broker.pid, sig)
        assert own_broker.process.wait(15) is not None
        first = await stale(gateway, posted)
        later = await eventually(gateway.status, until=lambda r: r.sent > first.received + 1, interval=0.2,
                                 what="a second reading a second later")  # still down: still growing
        assert later["age_seconds"] >= first["age_seconds"] + (later.sent - first.received) - 0.002
        assert later["lag"] == 0 and later["ready"] is True


async def test_while_the_broker_is_frozen_the_age_grows_and_once_thawed_it_falls_back(own_broker: Broker, tmp_path):
    """SIGSTOP keeps every TCP connection open and answers nothing: the gateway must not wait for it."""
    async with serving(own_broker.bootstrap, tmp_path) as gateway:
        posted = await gateway.blacklist("127.0.0.1")
        await gateway.blocks_everywhere()
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            frozen = await stale(gateway, posted)
            frozen_metric = (await gateway.metrics())[AGE]
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)
        thawed = await eventually(
            gateway.status, until=lambda r: r["seconds_since_contact"] < frozen["seconds_since_contact"]
            and r["age_seconds"] < frozen["age_seconds"], timeout=60, interval=0.2,
            what="/admin/status to show the view fresh again after the broker thawed")
        assert thawed["lag"] == 0 and thawed["ready"] is True
        await eventually(gateway.metrics, until=lambda m: m[AGE] < frozen_metric, timeout=60, interval=0.2,
                         what="gateway_view_age_seconds to fall back after the thaw")
        again = await gateway.blacklist("127.0.0.2")  # and commands are applied again
        reading = await gateway.status()
        assert reading["applied_command"] > frozen["applied_command"]
        assert reading["age_seconds"] <= reading.received - again + 0.002
