"""Invariants 8 and 10: a checkpoint that runs ahead of the command log is refused (stand by, alert),
rogue view records are found by `gateway ctl verify`, and `materialize --refold` rebuilds the view
from the whole command log, tombstoning what the commands never made."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from aiokafka import AIOKafkaProducer
from helpers import eventually
from procs import logged, spawn_materializer, topic_args
from reference import addresses_of, blocked, view_of

from gateway.broker import stop_pid
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics

FIRST = ["BLACKLIST 10.0.0.0/24", "WHITELIST 10.0.0.100", "BLACKLIST 2001:db8::/120"]
LATER = ["BLACKLIST 10.0.5.0/24", "WHITELIST 10.0.0.0/26"]


async def fold_with_a_materializer(kafka, commands) -> int:
    """Publish, fold with an in-process materializer until done, stop it; return its claim's offset."""
    async with Publisher(kafka) as publisher:
        offsets = [await publisher.publish(c) for c in commands]
    materializer = Materializer(kafka)
    task = asyncio.create_task(materializer.run())
    try:
        await eventually(lambda: materializer.active and materializer.next_offset > offsets[-1], timeout=30,
                         what="the commands folded")
        claim = materializer.claim.offset
    finally:
        materializer.stop()
        await asyncio.wait_for(task, 20)
    return claim


async def forge(kafka, records) -> None:
    """Write records straight into the view topic, as a buggy tool or an attacker with write access would."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(kafka.ranges_topic, value, key=key, partition=0, headers=headers)
    finally:
        await producer.stop()


def ctl_verify(kafka, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "ctl", *topic_args(kafka), "verify", *extra],
                          capture_output=True, text=True, timeout=60)


async def test_a_checkpoint_ahead_of_the_command_log_is_refused_until_a_refold(kafka, read_topic, tmp_path):
    await ensure_topics(kafka)
    claim = await fold_with_a_materializer(kafka, FIRST)
    writer = [("writer", str(claim).encode())]  # well formed, and tagged by the current writer
    await forge(kafka, [(b"10.9.9.0", b"10.9.9.255", writer + [("command-offset", b"99999999"), ("last", b"1")])])
    async with Publisher(kafka) as publisher:
        for command in LATER:
            await publisher.publish(command)

    materializer = Materializer(kafka)
    task = asyncio.create_task(materializer.run())
    try:
        await eventually(lambda: materializer.refused, timeout=30, what="the checkpoint refused")
        assert "runs ahead of the command log" in materializer.refused and not materializer.active
    finally:
        materializer.stop()
        await asyncio.wait_for(task, 20)
    assert "99999999" in (checked := ctl_verify(kafka)).stdout and checked.returncode == 1, checked.stdout

    log = tmp_path / "refold.log"
    process = spawn_materializer(kafka, log, "--refold")
    try:
        await logged(log, "materializer active")
        expected = blocked(FIRST + LATER)
        await eventually(lambda: _view_is(read_topic, kafka, expected), timeout=30, what="view == fold after --refold")
    finally:
        stop_pid(process, timeout=20)
    checked = ctl_verify(kafka)
    assert checked.returncode == 0 and "OK: equal" in checked.stdout, checked.stdout + checked.stderr


async def test_rogue_records_are_skipped_repaired_or_reported_and_a_refold_removes_them(kafka, read_topic, tmp_path):
    await ensure_topics(kafka)
    claim = await fold_with_a_materializer(kafka, FIRST)
    log = tmp_path / "materializer.log"
    process = spawn_materializer(kafka, log)
    try:
        await logged(log, "materializer active")
        current = [r.offset for r in await read_topic(kafka.ranges_topic) if r.key == b"__writer__"][-1]
        assert current > claim
        writer = [("writer", str(current).encode())]  # the claim the running writer just appended
        await forge(kafka, [
            (b"10.0.0.50", b"10.0.1.20", []),  # no writer: stale, skipped by every reader, re-published over
            (b"2001:DB8::900", b"2001:db8::9ff", writer),  # not canonical: poison, tombstoned by the writer
        ])
        await eventually(lambda: _last_is_repair(read_topic, kafka), timeout=30, what="the writer repaired both keys")
        checked = ctl_verify(kafka)
        assert checked.returncode == 0, checked.stdout
        # A forged record that names the current writer cannot be told from its own: verify finds it.
        await forge(kafka, [(b"10.0.3.0", b"10.0.3.9", writer + [("command-offset", b"2"), ("last", b"1")])])
        checked = ctl_verify(kafka)
        assert checked.returncode == 1 and "10.0.3.0 - 10.0.3.9" in checked.stdout, checked.stdout
    finally:
        stop_pid(process, timeout=20)
    process = spawn_materializer(kafka, log, "--refold")
    try:
        await logged(log, "materializer active", count=2)
        await eventually(lambda: _view_is(read_topic, kafka, blocked(FIRST)), timeout=30, what="refolded")
    finally:
        stop_pid(process, timeout=20)
    records = await read_topic(kafka.ranges_topic)
    claims = [json.loads(r.value) for r in records if r.key == b"__writer__"]
    assert claims[-1]["refold"] is True and len({c["log_id"] for c in claims}) == 1  # one log throughout
    checked = ctl_verify(kafka)
    assert checked.returncode == 0, checked.stdout


async def _view_is(read_topic, kafka, expected) -> bool:
    return addresses_of(view_of(await read_topic(kafka.ranges_topic))) == expected


async def _last_is_repair(read_topic, kafka) -> bool:
    last = {}
    for record in await read_topic(kafka.ranges_topic):
        last[record.key] = record
    rogue, noncanonical = last[b"10.0.0.50"], last[b"2001:DB8::900"]
    return rogue.value is None and noncanonical.value is None and dict(rogue.headers).get("writer") is not None
