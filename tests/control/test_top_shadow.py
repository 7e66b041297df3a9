"""What the blacklist does to traffic: the top refusing ranges summed over workers, and shadow mode.
Real `gateway serve --workers 2` and `gateway materialize` processes on the real broker; clients
on distinct loopback addresses, each request on its own connection so both workers take some."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import eventually, free_port
from liveserve import gateway_process, samples

from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import Publisher

TOKEN = "top-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def bidder():
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"bid")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def hit(port: int, source: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"http://127.0.0.1:{port}/bid", data=b"x",
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url, headers=AUTH) as response:
        return response.status, await response.json()


async def run_gateway(kafka_bootstrap, topic_names, tmp_path: Path, mode: str, check) -> None:
    port, admin = free_port(), free_port()
    runner, upstream = await bidder()
    try:
        with gateway_process(["materialize", "--kafka", kafka_bootstrap, "--commands-topic", topic_names.commands,
                              "--ranges-topic", topic_names.ranges], tmp_path / "materializer.log"), \
             gateway_process(["serve", "--kafka", kafka_bootstrap, "--commands-topic", topic_names.commands,
                              "--ranges-topic", topic_names.ranges, "--listen", f"127.0.0.1:{port}",
                              "--admin-listen", f"127.0.0.1:{admin}", "--upstream", upstream, "--workers", "2",
                              "--admin-token", TOKEN, "--mode", mode], tmp_path / "gateway.log"):
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{admin}"

                async def ready():
                    async with session.get(base + "/readyz") as response:
                        return response.status == 200
                await eventually(ready, timeout=60)
                kafka = KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)
                async with Publisher(kafka) as publisher:
                    await publisher.publish("BLACKLIST 127.0.0.16/28")
                    last = await publisher.publish("BLACKLIST 127.0.0.40/30")

                async def applied():
                    status, body = await get(session, base + "/admin/status")
                    return all(w["applied_command"] >= last for w in body["workers"]) and body["applied_command"] >= last
                await eventually(applied)
                await check(session, base, port)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_top_sums_refusals_per_range_over_every_worker(kafka_bootstrap, topic_names, tmp_path, mode):
    sent = {"127.0.0.17": 7, "127.0.0.30": 5, "127.0.0.41": 4, "127.0.0.2": 6}  # .2 is not blacklisted
    want_status = {"enforce": 403, "shadow": 200}[mode]

    async def check(session: aiohttp.ClientSession, base: str, port: int) -> None:
        statuses = {}
        for source, count in sent.items():
            statuses[source] = {await hit(port, source) for _ in range(count)}
        assert statuses == {"127.0.0.17": {want_status}, "127.0.0.30": {want_status}, "127.0.0.41": {want_status},
                            "127.0.0.2": {200}}
        # The reference: requests sent per range, by the test's own arithmetic.
        want = [{"start": "127.0.0.16", "end": "127.0.0.31", "blocked": 12, "blocked_last_minute": 12,
                 "in_view": True},
                {"start": "127.0.0.40", "end": "127.0.0.43", "blocked": 4, "blocked_last_minute": 4, "in_view": True}]

        async def counted():
            return await get(session, base + "/admin/top?limit=5")
        status, body = await eventually(counted, until=lambda answer: answer[1].get("ranges") == want)
        assert body["last_minute"] == want and body["mode"] == mode
        # Which worker accepts a connection is the kernel's choice: one may have taken every
        # refusal (then only it wrote a file). Summing two workers' files is test_top's.
        assert body["workers"] in (1, 2)
        status, body = await get(session, base + "/admin/top?limit=1")
        assert body["ranges"] == want[:1]
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "ctl", "top", "--gateway", base,
                                                       "--token", TOKEN, "--json"], capture_output=True, timeout=60)
        assert run.returncode == 0 and json.loads(run.stdout)["ranges"] == want, run
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "ctl", "top", "--gateway", base,
                                                       "--token", "wrong"], capture_output=True, timeout=60)
        assert run.returncode == 1 and b"403 wrong admin token" in run.stderr, run
        status, body = await get(session, base + "/admin/top?limit=1001")
        assert status == 400 and "limit" in body["error"]

        status, body = await get(session, base + "/admin/status")
        assert body["mode"] == mode
        async with session.get(base + "/metrics") as response:
            exposed = samples(await response.read())
        outcome = {"enforce": "blocked", "shadow": "shadow_blocked"}[mode]
        other = {"enforce": "shadow_blocked", "shadow": "blocked"}[mode]

        async def metrics():
            async with session.get(base + "/metrics") as response:
                return samples(await response.read())
        exposed = await eventually(metrics, until=lambda s: s.get(
            ("gateway_requests_total", (("outcome", outcome),))) == 16)
        assert exposed[("gateway_requests_total", (("outcome", other),))] == 0
        status, body = await get(session, base + "/admin/explain?ip=127.0.0.17")
        assert body["blocked"] is True and body["decided_by"]["command"] == "BLACKLIST 127.0.0.16/28"

    await run_gateway(kafka_bootstrap, topic_names, tmp_path, mode, check)
    if mode == "shadow":
        log = (tmp_path / "gateway.log").read_text()
        assert "shadow mode: forwarded a request the blacklist would refuse" in log


@pytest.mark.parametrize("tokens, words", [
    (["alice=same", "bob=same"], "two names share one token"),
    (["one", "two"], "at most one bare token"),
    (["alice=x1", "alice=x2"], "given twice"),
])
def test_admin_tokens_that_cannot_say_who_is_who_are_refused(tokens, words):
    args = [sys.executable, "-m", "gateway", "serve", "--kafka", "127.0.0.1:9", "--upstream", "http://127.0.0.1:9"]
    for token in tokens:
        args += ["--admin-token", token]
    run = subprocess.run(args, capture_output=True, timeout=60, text=True)
    assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    assert "same" not in run.stderr and "x1" not in run.stderr  # a token is never echoed
