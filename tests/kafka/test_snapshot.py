"""--snapshot PATH: atomic files of the view; a restart serves from a fresh one at once, ignores a stale one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest
from helpers import eventually, free_port

from gateway.bidder import bound_port, start_bidder
from gateway.broker import start_broker, stop_pid
from gateway.kafka import snapshot
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower
from gateway.kafka.materializer import Materializer
from gateway.kafka.publisher import Publisher

DAY_MS = 86_400_000
TOKEN = "snapshot-test-token"


def write_example(path, **overrides) -> None:
    args = dict(topic="t.ranges", ranges=[(4, 167772160, 167772415), (6, 1 << 120, (1 << 120) + 255)],
                offsets={0: 7}, delete_retention_ms=DAY_MS)
    snapshot.write(path, **{**args, **overrides})


def test_round_trip_keeps_records_offsets_and_time(tmp_path):
    path = tmp_path / "view.snapshot"
    write_example(path, written_at=1_700_000_000.5)
    got = snapshot.read(path)
    assert got.records == [("10.0.0.0", "10.0.0.255"), ("100::", "100::ff")]
    assert (got.topic, got.offsets, got.written_at, got.delete_retention_ms) == ("t.ranges", {0: 7}, 1_700_000_000.5,
                                                                              DAY_MS)
    assert os.listdir(tmp_path) == ["view.snapshot"]  # no temp file left


def test_a_failed_write_leaves_the_previous_snapshot_whole(tmp_path):
    path = tmp_path / "view.snapshot"
    write_example(path)

    def broken():
        yield 4, 1, 2
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_example(path, ranges=broken(), offsets={0: 99})
    assert snapshot.read(path).offsets == {0: 7}
    assert os.listdir(tmp_path) == ["view.snapshot"]


def test_only_a_fresh_snapshot_of_the_same_topic_is_trusted(tmp_path, caplog):
    path = tmp_path / "view.snapshot"
    caplog.set_level(logging.INFO, "gateway.snapshot")
    assert snapshot.load(path, "t.ranges") is None  # none yet
    write_example(path, written_at=time.time() - 3600)
    assert snapshot.load(path, "t.ranges").offsets == {0: 7}
    assert snapshot.load(path, "other.ranges") is None
    assert snapshot.load(path, "t.ranges", now=time.time() + DAY_MS / 1000) is None
    assert "older than the topic's delete.retention.ms" in caplog.text
    path.write_text('{"format": "gateway-view-snapshot/1", "topic": "t.ranges"}\n')
    assert snapshot.load(path, "t.ranges") is None
    path.write_bytes(b"\xff\xfe garbage")
    assert snapshot.load(path, "t.ranges") is None


async def test_the_writer_follows_the_view_and_writes_once_more_on_stop(kafka_bootstrap, topic_names, tmp_path):
    kafka = KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)
    path = tmp_path / "view.snapshot"
    async with control_plane(kafka) as (follower, publisher):
        writer = asyncio.create_task(snapshot.keep_writing(path, follower, kafka, interval_s=0.05))
        offset = await publisher.publish("BLACKLIST 10.0.0.0/24")
        assert await follower.wait_applied(offset, 15)
        await eventually(lambda: path.exists() and snapshot.read(path).records == [("10.0.0.0", "10.0.0.255")])
        offset = await publisher.publish("WHITELIST 10.0.0.128/25")
        assert await follower.wait_applied(offset, 15)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        written = snapshot.read(path)
        assert written.records == [("10.0.0.0", "10.0.0.127")]
        assert written.offsets == follower.offsets and written.topic == topic_names.ranges
        assert written.delete_retention_ms == DAY_MS  # Tansu sets none: Kafka's default


# -- a restarted `gateway serve` --------------------------------------------------------------------


@asynccontextmanager
async def control_plane(kafka: KafkaConfig):
    """A materializer and a follower in this process, and a publisher."""
    materializer = Materializer(kafka)
    follower = Follower(kafka)
    tasks = [asyncio.create_task(materializer.run()), asyncio.create_task(follower.run())]
    try:
        async with Publisher(kafka) as publisher:
            await asyncio.wait_for(follower.ready.wait(), 30)
            yield follower, publisher
    finally:
        materializer.stop()
        follower.stop()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)



async def get(url: str, **kwargs) -> tuple[int, object]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=3),
                                                                   **kwargs) as response:
            return response.status, await (response.json() if response.content_type == "application/json"
                                           else response.text())
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, None


async def restart_from(snapshot_path, kafka: KafkaConfig, broker, tmp_path, *, fresh: bool) -> None:
    """Start `gateway serve --snapshot` while the broker is frozen; check readiness; thaw; check catch-up."""
    bidder = await start_bidder("127.0.0.1", 0)
    port, admin = free_port(), free_port()
    admin_url = f"http://127.0.0.1:{admin}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    log = open(tmp_path / "serve.log", "w+")
    os.kill(broker.pid, signal.SIGSTOP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--kafka", kafka.bootstrap, "--commands-topic", kafka.commands_topic,
         "--ranges-topic", kafka.ranges_topic, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--admin-token", TOKEN, "--upstream", f"http://127.0.0.1:{bound_port(bidder)}",
         "--snapshot", str(snapshot_path)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while (await get(admin_url + "/healthz"))[0] != 200:
            assert proc.poll() is None and time.monotonic() - started < 20, "gateway did not start"
            await asyncio.sleep(0.05)
        if fresh:  # ready from the file alone, the broker still frozen; it blocks what the file blocks
            while (await get(admin_url + "/readyz"))[0] != 200:
                assert time.monotonic() - started < 20, "not ready from a fresh snapshot"
                await asyncio.sleep(0.05)
            assert (await get(f"http://127.0.0.1:{port}/"))[0] == 403  # 127.0.0.1 is in the snapshot
            assert (await get(admin_url + "/admin/lookup?ip=192.0.2.1", headers=auth))[1]["blocked"] is False
        else:  # a stale file is not served: not ready until the broker answers
            await asyncio.sleep(2.0)
            assert (await get(admin_url + "/readyz"))[0] == 503
            assert (await get(f"http://127.0.0.1:{port}/"))[0] == 503
        os.kill(broker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while True:  # caught up with the command published after the snapshot
            status, body = await get(admin_url + "/admin/lookup?ip=192.0.2.1", headers=auth)
            if status == 200 and body["blocked"] and (await get(f"http://127.0.0.1:{port}/"))[0] == 403:
                break
            assert time.monotonic() < deadline, "never caught up after the broker came back"
            await asyncio.sleep(0.1)
        assert (await get(admin_url + "/readyz"))[0] == 200
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        stop_pid(proc, timeout=20)
        await bidder.cleanup()
        log.seek(0)
        sys.stderr.write(f"--- gateway serve log ---\n{log.read()[-4000:]}")
        log.close()


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "stale"])
async def test_restart_serves_a_fresh_snapshot_before_the_broker_answers_and_bootstraps_past_a_stale_one(
        topic_names, tmp_path, fresh):
    broker = start_broker()  # its own: this test freezes it
    try:
        kafka = KafkaConfig(broker.bootstrap, topic_names.commands, topic_names.ranges)
        path = tmp_path / "view.snapshot"
        async with control_plane(kafka) as (follower, publisher):
            for command in ("BLACKLIST 127.0.0.1", "BLACKLIST 10.0.0.0/8"):
                assert await follower.wait_applied(await publisher.publish(command), 15)
            snapshot.write(path, topic=kafka.ranges_topic, ranges=follower.view.ranges(), offsets=follower.offsets,
                           delete_retention_ms=DAY_MS, written_at=time.time() - (0 if fresh else 2 * DAY_MS / 1000))
            assert await follower.wait_applied(await publisher.publish("BLACKLIST 192.0.2.0/24"), 15)
        header = json.loads(path.read_text().splitlines()[0])
        assert header["offsets"] == {"0": 3}  # the claim and two commands: the later command is not in the file
        await restart_from(path, kafka, broker, tmp_path, fresh=fresh)
    finally:
        broker.stop()
