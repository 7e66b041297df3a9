"""Invariant 6 with real processes: a frozen writer that wakes up after another took over changes nothing.

Two `gateway materialize` processes and one `gateway serve` on the embedded broker. The active
writer is frozen (SIGSTOP) in the middle of folding 20k commands, or while idle; the standby takes
over after the session timeout and folds 2k more; then the zombie is thawed (SIGCONT) and writes
what it had in hand. The end state is compared exactly with a brute-force fold of the command
log (tests/kafka/reference.py): the view as the reader rules read it, the view as compaction
would leave it (last record per key, whoever wrote it), and the gateway's /admin/ranges.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import subprocess
import sys

import pytest
from helpers import eventually
from procs import (
    TOKEN,
    log_count,
    logged,
    spawn_gateway,
    spawn_materializer,
    topic_args,
)
from reference import addresses_of, blocked, canonical, random_commands, view_of

from gateway.bidder import bound_port, start_bidder
from gateway.blacklist.ranges import RangeSet
from gateway.broker import stop_pid
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics


def small_commands(n: int, seed: int) -> list[str]:
    """Commands of at most 64 addresses in 10.0.0.0/18 (brute force stays cheap), 70 % BLACKLIST, some IPv6."""
    return random_commands(n, seed, v4_bits=14, v4_lengths=(26, 32), v6_bits=10, v6_lengths=(122, 128))


def compacted(records) -> RangeSet:
    """What compaction would leave: the last record of each key, whoever wrote it (claims aside)."""
    latest = {}
    for record in records:
        if record.key != b"__writer__":
            latest[record.key] = record.value
    spans = []
    for key, value in latest.items():
        if value is not None:
            first, last = ipaddress.ip_address(key.decode()), ipaddress.ip_address(value.decode())
            spans.append((first.version, int(first), int(last)))
    return RangeSet.from_spans(spans)


def completed_command(records) -> int:
    """The highest command whose `last` record is in the view, whoever wrote it."""
    done = -1
    for record in records:
        headers = dict(record.headers)
        if "last" in headers and headers.get("command-offset", b"").isdigit():
            done = max(done, int(headers["command-offset"]))
    return done


def stale_count(records) -> int:
    """Data records written after a newer claim by an older writer (the zombie's late writes)."""
    claim, stale = None, 0
    for record in records:
        if record.key == b"__writer__":
            claim = record.offset
        elif claim is not None and dict(record.headers).get("writer") != str(claim).encode():
            stale += 1
    return stale


def to_addresses(pairs) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {4: set(), 6: set()}
    for first, last in pairs:
        a, b = ipaddress.ip_address(first), ipaddress.ip_address(last)
        result[a.version] |= set(range(int(a), int(b) + 1))
    return result


@pytest.mark.parametrize("pause", ["mid-batch", "idle"])
async def test_a_frozen_writer_that_wakes_after_a_takeover_changes_nothing(kafka, tmp_path, pause, read_topic):
    async def view_records(kafka) -> list:
        return await read_topic(kafka.ranges_topic)

    await ensure_topics(kafka)
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "gateway")}
    bidder = await start_bidder("127.0.0.1", 0)
    a = spawn_materializer(kafka, logs["a"])
    b = gateway = None
    try:
        await logged(logs["a"], "materializer active")
        b = spawn_materializer(kafka, logs["b"])
        gateway = spawn_gateway(kafka, logs["gateway"], f"http://127.0.0.1:{bound_port(bidder)}")
        await eventually(gateway.ready, timeout=30, what="gateway ready")
        first = small_commands(20_000, seed=1)
        async with Publisher(kafka) as publisher:
            if pause == "idle":
                await publisher.publish_encoded(c.encode() for c in first)
                await eventually(lambda: _done(view_records, kafka, len(first) - 1), timeout=60, what="A folded everything")
                os.kill(a.pid, signal.SIGSTOP)
            else:
                claimed = len(await view_records(kafka))
                await publisher.publish_encoded(c.encode() for c in first)
                await eventually(lambda: _grew(view_records, kafka, claimed + 50), timeout=30, interval=0.005, what="A writing")
                os.kill(a.pid, signal.SIGSTOP)
                records = await view_records(kafka)
                assert completed_command(records) < len(first) - 1, "A finished before the freeze: not mid-batch"
            await logged(logs["b"], "materializer active", timeout=30)  # B took over after the session timeout
            second = small_commands(2_000, seed=2)
            await publisher.publish_encoded(c.encode() for c in second)
            total = len(first) + len(second)
            await eventually(lambda: _done(view_records, kafka, total - 1), timeout=60, what="B folded everything")
            os.kill(a.pid, signal.SIGCONT)  # the zombie writes what it had in hand
            await eventually(lambda: log_count(logs["a"], "fenced") + log_count(logs["a"], "revoked") >= 1,
                             timeout=30, what="A noticed it lost the role")
            sentinel = await publisher.publish("BLACKLIST 192.0.2.0/24")
        commands = first + second + ["BLACKLIST 192.0.2.0/24"]
        expected = blocked(commands)
        await eventually(lambda: _view_equals(view_records, kafka, expected), timeout=60, what="view == fold of the command log")
        records = await view_records(kafka)
        assert addresses_of(compacted(records)) == expected  # no stale record is any key's last: compaction-safe
        assert canonical(view_of(records))
        code, body = await gateway.post("/admin/commands?wait=1", {"command": "BLACKLIST 192.0.2.0/24"})
        assert code == 202 and body["offset"] > sentinel
        assert to_addresses(await gateway.ranges()) == expected
        status = await gateway.status()
        assert status["static"] is None and status["unenforced_commands"] == 0
        verified = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "gateway", "ctl", *topic_args(kafka), "verify", "--gateway", gateway.admin_url,
            "--token", TOKEN], capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0 and "OK: equal" in verified.stdout, verified.stdout + verified.stderr
        print(f"{pause}: {stale_count(records)} stale records by the zombie; gateway skipped {status['stale_records']}")
    finally:
        for process in (a, b):
            if process is not None:
                stop_pid(process, timeout=20)
        if gateway is not None:
            gateway.stop()
        await bidder.cleanup()


async def _grew(view_records, kafka, count: int) -> bool:
    return len(await view_records(kafka)) >= count


async def _done(view_records, kafka, offset: int) -> bool:
    return completed_command(await view_records(kafka)) >= offset


async def _view_equals(view_records, kafka, expected) -> bool:
    return addresses_of(view_of(await view_records(kafka))) == expected
