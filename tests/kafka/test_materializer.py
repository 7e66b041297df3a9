"""The materializer on a real broker: exact view records, restart safety, one active writer, poison pills."""

import asyncio
import json
import os
import signal
import uuid

import reference
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from helpers import eventually
from procs import spawn_materializer

from gateway.blacklist.commands import Command, parse_command, parse_network
from gateway.blacklist.ranges import fold
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics


async def running(materializer):
    task = asyncio.create_task(materializer.run())
    await eventually(lambda: materializer.active, timeout=20, what="an active materializer")
    return task


async def stopped(materializer, task):
    materializer.stop()
    await asyncio.wait_for(task, 20)


def random_commands(n, seed):
    """Commands that overlap a lot: prefixes /20../32 in 10.0.0.0/16, some IPv6, 70 % BLACKLIST."""
    return [parse_command(text) for text in reference.random_commands(n, seed)]


async def test_seed_commands_produce_exactly_the_design_records(kafka, read_topic):
    async with Publisher(kafka) as publisher:
        await publisher.publish("BLACKLIST 10.0.0.0/24")
        await publisher.publish("WHITELIST 10.0.0.100/32")
    materializer = Materializer(kafka)
    task = await running(materializer)
    await eventually(lambda: materializer.applied == 2)
    await stopped(materializer, task)
    claim, *records = [(r.key, r.value, dict(r.headers)) for r in await read_topic(kafka.ranges_topic)]
    assert claim[0] == b"__writer__" and claim[2] == {}
    body = json.loads(claim[1])
    assert body["commands_topic"] == kafka.commands_topic and uuid.UUID(body["log_id"])
    writer = {"writer": b"0"}  # the claim's offset: the fencing token
    assert records == [
        (b"10.0.0.0", b"10.0.0.255", {**writer, "command-offset": b"0", "last": b"1"}),
        (b"10.0.0.101", b"10.0.0.255", {**writer, "command-offset": b"1"}),
        (b"10.0.0.0", b"10.0.0.99", {**writer, "command-offset": b"1", "last": b"1"}),
    ]


async def test_garbage_commands_are_skipped_counted_and_nothing_stops(kafka, read_view):
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    garbage = [b"\xff\xfe", b"DROP TABLE ranges", b"", None, b"BLACKLIST 10.0.0.5/24", b"BLACKLIST " + b"9" * 500]
    valid = ["BLACKLIST 10.0.0.0/24", "WHITELIST 10.0.0.7", "BLACKLIST 2001:db8::/64"]
    try:
        for value in [garbage[0], valid[0].encode(), *garbage[1:4], valid[1].encode(), *garbage[4:]]:
            await producer.send_and_wait(kafka.commands_topic, value, key=None if value else b"k", partition=0)
        materializer = Materializer(kafka)
        task = await running(materializer)
        await eventually(lambda: materializer.applied == 2)
        await producer.send_and_wait(kafka.commands_topic, valid[2].encode(), partition=0)
        await eventually(lambda: materializer.applied == 3)
        await stopped(materializer, task)
    finally:
        await producer.stop()
    assert materializer.poison == len(garbage)
    assert await read_view(kafka) == fold(parse_command(v) for v in valid)


async def test_restart_repairs_a_half_written_command(kafka, read_view, read_topic):
    """Crash after the first of two records of WHITELIST 10.0.0.100: the restart writes the rest."""
    async with Publisher(kafka) as publisher:
        await publisher.publish_many([parse_command("BLACKLIST 10.0.0.0/24"), parse_command("WHITELIST 10.0.0.100")])
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(kafka.ranges_topic, b"10.0.0.255", key=b"10.0.0.0", partition=0,
                                     headers=[("command-offset", b"0"), ("last", b"1")])
        await producer.send_and_wait(kafka.ranges_topic, b"10.0.0.255", key=b"10.0.0.101", partition=0,
                                     headers=[("command-offset", b"1")])
    finally:
        await producer.stop()
    materializer = Materializer(kafka)
    task = await running(materializer)
    await stopped(materializer, task)
    assert materializer.next_offset == 2 and materializer.applied == 0
    assert await read_view(kafka) == fold([parse_command("BLACKLIST 10.0.0.0/24"), parse_command("WHITELIST 10.0.0.100")])
    last = (await read_topic(kafka.ranges_topic))[-1]
    assert (last.key, last.value, dict(last.headers)) == (b"10.0.0.0", b"10.0.0.99", {"writer": b"2", "command-offset": b"1", "last": b"1"})


async def test_a_trailing_no_op_still_records_progress(kafka, read_view):
    async with Publisher(kafka) as publisher:
        await publisher.publish("BLACKLIST 10.0.0.0/24")
        await publisher.publish("BLACKLIST 10.0.0.0/25")  # already covered: changes nothing
    first = Materializer(kafka)
    task = await running(first)
    await eventually(lambda: first.applied == 2)
    await stopped(first, task)
    second = Materializer(kafka)
    task = await running(second)
    await stopped(second, task)
    assert second.next_offset == 2 and second.applied == 0  # nothing re-applied
    assert await read_view(kafka) == fold([parse_command("BLACKLIST 10.0.0.0/24")])


async def test_a_no_op_on_an_empty_view_is_still_marked_applied(kafka, read_topic, read_view):
    async with Publisher(kafka) as publisher:
        await publisher.publish("WHITELIST 10.0.0.0/24")  # nothing is blacklisted: changes nothing
    materializer = Materializer(kafka)
    task = await running(materializer)
    await eventually(lambda: materializer.applied == 1)
    await stopped(materializer, task)
    marker = (await read_topic(kafka.ranges_topic))[-1]
    assert (marker.key, marker.value, dict(marker.headers)) == (
        b"0.0.0.0", None, {"writer": b"0", "command-offset": b"0", "last": b"1"})
    assert len(await read_view(kafka)) == 0


async def test_sigkill_in_the_middle_of_a_command_ends_exact(kafka, read_view, read_topic, tmp_path):
    """Kill -9 while the view holds only part of one command's records: the restart repairs it.

    20k disjoint /32s, then one WHITELIST 10.0.0.0/16 that covers them all: its records are 20k
    tombstones, about twenty producer batches; only re-applying it removes the rest. The kill lands once the view
    holds some of them; the test checks it did land mid-command (that command's `last` is missing)
    before it checks the restarted writer ends with exactly the fold."""
    singles = [Command("BLACKLIST", parse_network(f"10.0.{i >> 7}.{(i & 127) * 2}")) for i in range(20_000)]
    big = parse_command("WHITELIST 10.0.0.0/16")
    after = [parse_command("BLACKLIST 192.0.2.0/24"), parse_command("WHITELIST 192.0.2.128/25")]  # elsewhere: no cover-up
    commands = singles + [big] + after
    async with Publisher(kafka) as publisher:
        await publisher.publish_many(commands)
    log = tmp_path / "materializer.log"
    process = spawn_materializer(kafka, log)
    try:
        await eventually(lambda: _grew(view_end(kafka), len(singles) + 1_000), timeout=60, interval=0.005,
                         what="the big command being written")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    records = await read_topic(kafka.ranges_topic)
    assert ends_mid_command(records), "the kill did not land in the middle of the big command"
    assert dict(records[-1].headers)["command-offset"] == str(len(singles)).encode()
    process = spawn_materializer(kafka, log)
    try:
        await eventually(lambda: _equals(read_view(kafka), fold(commands)), timeout=60, interval=0.5,
                         what="the view equal to the fold")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
    assert f"resuming at command {len(singles) + 1}" in log.read_text()  # the big command re-applied, not skipped


def ends_mid_command(records) -> bool:
    """Whether the view's last data record belongs to a command whose `last` record is not there."""
    data = [r for r in records if r.key != b"__writer__"]
    if not data:
        return False
    tail = dict(data[-1].headers).get("command-offset")
    return tail is not None and not any(
        dict(r.headers).get("command-offset") == tail and "last" in dict(r.headers) for r in data)


async def _equals(view_coroutine, expected):
    return await view_coroutine == expected


async def _grew(end_coroutine, before):
    return await end_coroutine > before


async def view_end(kafka) -> int:
    """The end offset of the view topic's partition 0 (0 before the topic exists)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await consumer.start()
    try:
        partition = TopicPartition(kafka.ranges_topic, 0)
        return (await consumer.end_offsets([partition]))[partition]
    finally:
        await consumer.stop()


async def test_two_materializers_one_writer_and_handover(kafka, read_view, tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    await ensure_topics(kafka)
    processes = [spawn_materializer(kafka, path) for path in logs]
    try:
        first = random_commands(2_000, seed=11)
        async with Publisher(kafka) as publisher:
            await publisher.publish_many(first)
        assert await eventually(lambda: _equals(read_view(kafka), fold(first)), timeout=60), [p.read_text() for p in logs]
        active = [i for i, path in enumerate(logs) if "materializer active" in path.read_text()]
        assert len(active) == 1, [p.read_text() for p in logs]
        survivor = 1 - active[0]
        os.kill(processes[active[0]].pid, signal.SIGKILL)
        processes[active[0]].wait()
        second = random_commands(2_000, seed=12)
        async with Publisher(kafka) as publisher:
            await publisher.publish_many(second)
        assert await eventually(lambda: _equals(read_view(kafka), fold(first + second)), timeout=60)
        assert "materializer active" in logs[survivor].read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                process.wait(20)
