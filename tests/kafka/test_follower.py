"""The follower on a real broker: complete bootstrap before ready, low-latency follow, survival of a frozen broker."""

import asyncio
import os
import signal
import time

import pytest
from aiokafka import AIOKafkaProducer
from helpers import eventually

from gateway.blacklist.addresses import format_address
from gateway.blacklist.commands import parse_command
from gateway.blacklist.ranges import RangeSet, fold
from gateway.broker import start_broker
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import STALE_PENDING_S, Follower
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics


async def write_view(kafka, ranges, linger_ms=50):
    """Write view records straight to the topic, in large batches (Tansu's end offset then lags behind)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=linger_ms, max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = []
        for i, (version, start, end) in enumerate(ranges):
            futures.append(await producer.send(
                kafka.ranges_topic, format_address(version, end).encode(), key=format_address(version, start).encode(),
                partition=0, headers=[("command-offset", b"%d" % i), ("last", b"1")],
            ))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def running_tasks(make, stop_timeout: float):
    """A fixture body: `start(kafka, **options)` runs `make(...)` as a task; each is stopped on the way out."""

    async def fixture():
        started = []

        async def start(kafka, **options):
            component = make(kafka, **options)
            started.append((component, asyncio.create_task(component.run())))
            return component

        yield start
        for component, task in started:
            component.stop()
            await asyncio.wait_for(task, stop_timeout)

    return fixture


follower_of = pytest.fixture(running_tasks(Follower, 10), name="follower_of")
materializer_of = pytest.fixture(running_tasks(Materializer, 20), name="materializer_of")


async def test_bootstrap_of_100k_ranges_is_not_ready_before_the_end_and_exact_after(kafka, follower_of):
    await ensure_topics(kafka)
    ranges = [(4, 0x0A000000 + 4 * i, 0x0A000000 + 4 * i + 1) for i in range(100_000)]
    await write_view(kafka, ranges)
    follower = await follower_of(kafka)
    seen_before_ready = set()

    def ready() -> bool:
        if follower.ready.is_set():
            return True
        seen_before_ready.add(len(follower.view))  # sampled every millisecond until ready
        return False

    await eventually(ready, timeout=60, interval=0.001, what="bootstrap of 100k ranges")
    assert seen_before_ready == {0}  # nothing partial is ever served: the bootstrapped view is swapped in whole
    assert len(follower.view) == 100_000
    expected = RangeSet()
    for version, start, end in ranges:
        expected.store(format_address(version, start), format_address(version, end))
    assert follower.view == expected
    assert follower.index.blocks("10.0.0.1") and not follower.index.blocks("10.0.0.2")
    last_start = format_address(4, ranges[-1][1])
    assert last_start == "10.6.26.124" and follower.index.blocks("10.6.26.125") and not follower.index.blocks("10.6.26.126")
    assert follower.applied_command == 99_999 and follower.lag == 0


async def test_follows_commands_with_low_latency_and_applies_each_command_whole(kafka, follower_of, materializer_of):
    await ensure_topics(kafka)
    follower = await follower_of(kafka)
    await materializer_of(kafka)
    assert await eventually(follower.ready.is_set, timeout=10)
    commands = ["BLACKLIST 10.0.0.0/24", "WHITELIST 10.0.0.100/32", "BLACKLIST 2001:db8::/48", "BLACKLIST 10.0.1.0/24"]
    async with Publisher(kafka) as publisher:
        for text in commands:
            offset = await publisher.publish(text)
            assert await follower.wait_applied(offset, timeout=20)
    assert follower.view == fold(parse_command(c) for c in commands)
    assert follower.index.blocks("10.0.0.99") and not follower.index.blocks("10.0.0.100")
    assert follower.index.blocks("10.0.1.255") and follower.index.blocks("2001:db8::1")
    assert len(follower.propagation) == len(commands)
    assert all(0 <= sample < 10 for sample in follower.propagation)
    assert follower.age_of_last_update() < 10 and follower.poison == 0


async def test_malformed_view_records_are_skipped_and_counted(kafka, follower_of):
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for key, value in [(None, b"10.0.0.9"), (b"nonsense", b"10.0.0.9"), (b"10.0.0.9", b"10.0.0.1"),
                           (b"10.0.0.0", b"10.0.0.9")]:
            await producer.send_and_wait(kafka.ranges_topic, value, key=key, partition=0)
        follower = await follower_of(kafka)
        assert await eventually(follower.ready.is_set, timeout=10)
        assert follower.poison == 3  # bootstrap: what the view holds at its end
        for key, value in [(b"10.0.1.0", b"2001:db8::"), (None, b"x"), (b"\xff", None), (b"10.0.2.0", b"10.0.2.5")]:
            await producer.send_and_wait(kafka.ranges_topic, value, key=key, partition=0)
        assert await eventually(lambda: len(follower.view) == 2, timeout=10)
    finally:
        await producer.stop()
    assert follower.poison == 6  # following: every malformed record
    assert list(follower.view.ranges()) == [(4, 0x0A000000, 0x0A000009), (4, 0x0A000200, 0x0A000205)]
    assert follower.index.blocks("10.0.2.5") and not follower.index.blocks("10.0.1.0")


@pytest.fixture
def own_broker():
    """A broker of this test's own (it gets frozen), stopped by PID after the clients using it."""
    broker = start_broker()
    yield broker
    broker.stop()


async def test_keeps_answering_while_the_broker_is_frozen_and_catches_up_after(own_broker, follower_of, materializer_of):
    kafka = KafkaConfig(own_broker.bootstrap, "frozen.commands", "frozen.ranges")
    await ensure_topics(kafka)
    follower = await follower_of(kafka, status_interval_s=0.2)
    await materializer_of(kafka)
    publisher = Publisher(kafka)
    await publisher.start()
    try:
        offset = await publisher.publish("BLACKLIST 10.0.0.0/24")
        assert await follower.wait_applied(offset, timeout=20)
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            late = asyncio.ensure_future(publisher.publish("BLACKLIST 10.9.0.0/16"))
            frozen_until = time.monotonic() + 3
            while time.monotonic() < frozen_until:
                assert follower.ready.is_set() and follower.index.blocks("10.0.0.7")
                assert not follower.index.blocks("10.9.0.1")
                await asyncio.sleep(0.1)
            assert follower.seconds_since_contact() > 2  # staleness is visible
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)
        late_offset = await asyncio.wait_for(late, 30)
        assert await follower.wait_applied(late_offset, timeout=40)
        assert follower.index.blocks("10.9.0.1") and follower.index.blocks("10.0.0.7")
        assert await eventually(lambda: follower.seconds_since_contact() < 1, timeout=10)
    finally:
        await publisher.stop()


async def test_a_commands_records_are_applied_together_on_last_and_a_command_without_last_after_a_while(
        kafka, follower_of):
    """Followers apply a command's records when its `last` arrives (never half a command); a command
    whose `last` never comes (its writer died) is applied after STALE_PENDING_S all the same."""
    await ensure_topics(kafka)
    follower = await follower_of(kafka)
    await eventually(follower.ready.is_set, timeout=10)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        async def send(key, value, tag, last=False):
            headers = [("command-offset", tag)] + ([("last", b"1")] if last else [])
            return await producer.send_and_wait(kafka.ranges_topic, value, key=key, partition=0, headers=headers)

        await send(b"10.0.0.0", b"10.0.0.255", b"0", last=True)  # the seed: BLACKLIST 10.0.0.0/24
        sent = await send(b"10.0.0.101", b"10.0.0.255", b"1")  # then WHITELIST 10.0.0.100: its first record
        await eventually(lambda: follower.offsets.get(0, 0) > sent.offset, timeout=10, what="records read")
        assert list(follower.view.ranges()) == [(4, 0x0A000000, 0x0A0000FF)]  # read, buffered, not applied
        assert follower.applied_command == 0
        await send(b"10.0.0.0", b"10.0.0.99", b"1", last=True)
        await eventually(lambda: follower.applied_command == 1, timeout=10, what="command 1 applied")
        assert list(follower.view.ranges()) == [(4, 0x0A000000, 0x0A000063), (4, 0x0A000065, 0x0A0000FF)]
        sent = await send(b"10.0.1.0", b"10.0.1.255", b"2")  # its writer died before `last`
        await eventually(lambda: follower.offsets.get(0, 0) > sent.offset, timeout=10, what="record read")
        assert follower.view.find(4, 0x0A000100) is None  # pending: not applied yet
        await eventually(lambda: follower.view.find(4, 0x0A000100) is not None, timeout=STALE_PENDING_S + 10,
                         what="the command without `last` applied after STALE_PENDING_S")
        assert follower.applied_command == 2 and follower.index.blocks("10.0.1.7")
    finally:
        await producer.stop()
