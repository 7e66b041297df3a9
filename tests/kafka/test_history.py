"""The time machine: replay --offset N equals the fold of the first N commands; --until TIME, of those up to then."""

import asyncio
import ipaddress
import random
import subprocess
import sys
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer

from gateway.blacklist.commands import Command, parse_network
from gateway.blacklist.ranges import fold
from gateway.kafka.history import replay
from gateway.kafka.publisher import Publisher
from gateway.kafka.topics import ensure_topics


def commands(n, seed):
    rng = random.Random(seed)
    result = []
    for _ in range(n):
        length = rng.randint(22, 32)
        host = (0x0A000000 | rng.getrandbits(12) << 4) >> (32 - length) << (32 - length)
        network = parse_network(f"{ipaddress.IPv4Address(host)}/{length}")
        result.append(Command("BLACKLIST" if rng.random() < 0.7 else "WHITELIST", network))
    return result


async def test_replay_to_an_offset_folds_the_first_n_commands_skipping_poison(kafka):
    log = commands(300, seed=5)
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=20)
    await producer.start()
    try:
        values = [c.encode() for c in log]
        values.insert(100, b"not a command")
        futures = [await producer.send(kafka.commands_topic, v, partition=0) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    for n in (0, 1, 100, 101, 250, 301, 10_000):
        result = await replay(kafka, offset=n)
        valid = [c for c in log[: min(n, 100)]] + (log[100 : n - 1] if n > 100 else [])
        assert result.view == fold(valid), n
        assert result.commands == len(valid) and result.poison == (1 if n > 100 else 0)


async def test_replay_until_a_time_folds_what_was_published_by_then(kafka):
    before, after = commands(50, seed=1), commands(50, seed=2)
    async with Publisher(kafka) as publisher:
        await publisher.publish_many(before)
        await asyncio.sleep(0.05)
        moment = datetime.now(timezone.utc)
        await asyncio.sleep(0.05)
        await publisher.publish_many(after)
    assert (await replay(kafka, until=moment)).view == fold(before)
    assert (await replay(kafka)).view == fold(before + after)


async def test_ctl_replay_prints_the_ranges_after_the_first_n_commands(kafka):
    log = commands(60, seed=9)
    async with Publisher(kafka) as publisher:
        await publisher.publish_many(log)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "ctl", "--kafka", kafka.bootstrap, "--commands-topic", kafka.commands_topic,
         "--ranges-topic", kafka.ranges_topic, "replay", "--offset", "25"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    printed = [tuple(line.split()) for line in out.stdout.splitlines()]
    expected = [(str(ipaddress.ip_address(s)), str(ipaddress.ip_address(e))) for _, s, e in fold(log[:25]).ranges()]
    assert printed == expected and expected
