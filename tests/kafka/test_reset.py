"""Invariant 7 with real processes: the broker restarted empty (Tansu keeps nothing) under a running
materializer and gateways. A gateway that holds a view keeps enforcing it, says so (status, metric,
ERROR line), never rewrites its snapshot file meanwhile, never reads the new log on top of the old
one, and adopts the new log only on an operator's word (`ctl adopt`) or a `materialize --new-log`
claim. A gateway with no view bootstraps what is there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
from helpers import eventually
from procs import TOKEN, spawn_gateway, spawn_materializer, topic_args

from gateway.bidder import bound_port, start_bidder
from gateway.broker import start_broker, stop_pid
from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import Publisher

OLD = ["BLACKLIST 10.0.0.0/24", "BLACKLIST 10.1.0.0/16", "WHITELIST 10.1.2.0/24"]
NEW = ["BLACKLIST 192.0.2.0/24"] + [f"BLACKLIST 198.51.100.{i}" for i in range(20)]


async def proxied(gateway, client_ip: str) -> int:
    """The proxy's answer to a request from `client_ip` (the gateway trusts 127.0.0.1's X-Forwarded-For)."""
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{gateway.port}/", headers={"X-Forwarded-For": client_ip},
            timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status


async def enforces(gateway, log: str) -> bool:
    """Whether the admin view and the worker's proxy both enforce `log` ("old" or "new")."""
    ranges = await gateway.ranges()
    old = ("10.0.0.0", "10.0.0.255") in ranges and ("10.1.3.0", "10.1.255.255") in ranges
    new = ("192.0.2.0", "192.0.2.255") in ranges
    if (old, new) != (log == "old", log == "new"):
        return False
    answers = await asyncio.gather(proxied(gateway, "10.0.0.7"), proxied(gateway, "192.0.2.7"))
    return answers == ([403, 200] if log == "old" else [200, 403])


async def applied(gateway, offset: int) -> bool:
    status = await gateway.status()
    return status["applied_command"] is not None and status["applied_command"] >= offset


async def test_a_broker_restarted_empty_never_silently_changes_what_gateways_enforce(topic_names, tmp_path):
    broker = start_broker()
    port = broker.port
    kafka = KafkaConfig(broker.bootstrap, topic_names.commands, topic_names.ranges)
    bidder = await start_bidder("127.0.0.1", 0)
    upstream = f"http://127.0.0.1:{bound_port(bidder)}"
    trust = ("--trusted-proxy", "127.0.0.1/32")
    snapshot = tmp_path / "view.snapshot"
    processes, gateways = [], []

    def gateway(name, *extra):
        g = spawn_gateway(kafka, tmp_path / f"{name}.log", upstream, *trust, *extra)
        gateways.append(g)
        return g

    try:
        async with Publisher(kafka) as publisher:
            offsets = [await publisher.publish(c) for c in OLD]
        processes.append(spawn_materializer(kafka, tmp_path / "materializer.log"))
        running = gateway("running")
        snapshotted = gateway("snapshot-1", "--snapshot", str(snapshot))
        for g in (running, snapshotted):
            await eventually(lambda g=g: applied(g, offsets[-1]), timeout=30, what="old log applied")
            await eventually(lambda g=g: enforces(g, "old"), timeout=10, what="old log enforced by every worker")
        snapshotted.stop()  # a clean stop writes the snapshot once more
        kept = snapshot.read_bytes()
        assert b'"claim"' in kept

        os.kill(broker.pid, signal.SIGKILL)  # killed, not stopped; memory only: every topic is gone
        broker.process.wait()
        broker = start_broker(port=port)
        async with Publisher(kafka) as publisher:
            new_offsets = [await publisher.publish(c) for c in NEW]
        restarted = gateway("snapshot-2", "--snapshot", str(snapshot))
        fresh = gateway("fresh")
        await eventually(lambda: applied(fresh, new_offsets[-1]), timeout=60, what="fresh gateway on the new log")
        await eventually(lambda: enforces(fresh, "new"), timeout=10, what="new log enforced by every worker")
        assert (await fresh.status())["static"] is None  # nothing to protect
        for g in (running, restarted):
            await eventually(lambda g=g: _static(g), timeout=30, what="held static")
            assert await enforces(g, "old")
        assert "holding the view static" in running.log.read_text()
        metrics = await _metrics(running)
        assert "gateway_view_static 1.0" in metrics, metrics
        assert snapshot.read_bytes() == kept  # never overwritten meanwhile
        verified = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "gateway", "ctl", *topic_args(kafka), "verify", "--gateway", running.admin_url,
            "--token", TOKEN], capture_output=True, text=True, timeout=120)
        assert verified.returncode == 1 and "holds its view static" in verified.stdout, verified.stdout

        # The operator's word for one gateway: `gateway ctl adopt`.
        done = subprocess.run([sys.executable, "-m", "gateway", "ctl", *topic_args(kafka), "adopt",
                               "--gateway", running.admin_url, "--token", TOKEN], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        await eventually(lambda: enforces(running, "new"), timeout=30, what="running gateway adopted the new log")
        assert (await running.status())["static"] is None
        assert await enforces(restarted, "old") and snapshot.read_bytes() == kept  # the other one still holds

        # A writer started with --new-log (next to the running one: it takes over): the log says an
        # operator started it on purpose.
        processes.append(spawn_materializer(kafka, tmp_path / "new-log.log", "--new-log"))
        await eventually(lambda: enforces(restarted, "new"), timeout=60, what="snapshot gateway adopted the --new-log log")
        assert (await restarted.status())["static"] is None
    finally:
        for g in gateways:
            g.stop()
        for process in processes:
            stop_pid(process, timeout=20)
        await bidder.cleanup()
        broker.stop()


async def _static(gateway) -> bool:
    status = await gateway.status()
    return status["static"] is not None and status["ready"]


async def _metrics(gateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(gateway.admin_url + "/metrics") as response:
        return await response.text()
