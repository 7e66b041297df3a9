"""Invariant 9's "no active materializer never goes unnoticed", and the recovery: after kills, freezes
and leaves on the embedded broker, some materializer is the active writer again within the session
timeout + 10 s, and its metrics say which one (gateway_materializer_active)."""

from __future__ import annotations

import os
import signal

import aiohttp
from helpers import eventually, free_port
from procs import spawn_materializer

from gateway.broker import stop_pid
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics

SESSION_MS = 3000
RECOVERY_S = SESSION_MS / 1000 + 10


async def active_metric(port: int) -> float | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as response:
            for line in (await response.text()).splitlines():
                if line.startswith("gateway_materializer_active "):
                    return float(line.split()[1])
    except (aiohttp.ClientError, OSError):
        return None
    return None


async def test_some_materializer_is_active_again_after_kills_freezes_and_leaves(kafka, tmp_path, read_view):
    await ensure_topics(kafka)
    members: dict[str, tuple] = {}

    def start(name):
        port = free_port()
        members[name] = (spawn_materializer(kafka, tmp_path / f"{name}.log", "--admin-listen", f"127.0.0.1:{port}",
                                            session_timeout_ms=SESSION_MS), port)

    async def actives():
        found = []
        for name, (process, port) in members.items():
            if process.poll() is None and await active_metric(port) == 1.0:
                found.append(name)
        return found

    async def one_active(what):
        return (await eventually(actives, timeout=RECOVERY_S, interval=0.2, what=what))[0]

    try:
        start("a")
        start("b")
        first = await one_active("a first writer")
        os.kill(members[first][0].pid, signal.SIGKILL)  # expires after the session timeout
        second = await one_active("a writer after the first was killed")
        assert second != first
        os.kill(members[second][0].pid, signal.SIGSTOP)  # frozen: expires too
        start("c")
        third = await one_active("a writer after a freeze and a newcomer")
        assert third == "c"
        stop_pid(members[third][0], timeout=20)  # leaves the group cleanly: nobody else is left
        os.kill(members[second][0].pid, signal.SIGCONT)  # the frozen one wakes, expired, with a stale claim
        start("d")
        await one_active("a writer after every member expired or left")
        async with Publisher(kafka) as publisher:
            await publisher.publish("BLACKLIST 10.0.0.0/24")
        await eventually(lambda: _folded(read_view, kafka), timeout=RECOVERY_S, what="the command folded")
        await eventually(lambda: _exactly_one(actives), timeout=RECOVERY_S, what="one active writer, the others standing by")
    finally:
        for process, _ in members.values():
            stop_pid(process, timeout=20)


async def _folded(read_view, kafka) -> bool:
    return list((await read_view(kafka)).ranges()) == [(4, 0x0A000000, 0x0A0000FF)]


async def _exactly_one(actives) -> bool:
    return len(await actives()) == 1
