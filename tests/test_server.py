"""`gateway serve` as real processes: real broker, real materializer, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import helpers
import pytest
from aiohttp import web
from helpers import eventually

from gateway.kafka.config import KafkaConfig
from gateway.kafka.publisher import Publisher


def free_port() -> int:
    """The gateway listens on [::] here (dual-stack): the port must be free for both families."""
    return helpers.free_port("::")


@asynccontextmanager
async def bidder(delay_s: float = 0.0):
    """A real upstream: answers `bid:<body>` after `delay_s`; records what it received and answered."""
    answered = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        handle.received += 1
        await asyncio.sleep(delay_s)
        answered.append(body)
        return web.Response(body=b"bid:" + body)

    handle.received = 0
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", answered, handle
    finally:
        await runner.cleanup()


def process(args: list[str], tmp_path: Path, name: str):
    """`python -m gateway ARGS` as a child process (helpers.running): stopped by its PID at the end."""
    return helpers.running([sys.executable, "-m", "gateway", *args], tmp_path / f"{name}.log")


def serve_args(kafka: str, topics, upstreams: list[str], port: int, admin_port: int, *extra: str) -> list[str]:
    args = ["serve", "--kafka", kafka, "--commands-topic", topics.commands, "--ranges-topic", topics.ranges,
            "--listen", f"[::]:{port}", "--admin-listen", f"127.0.0.1:{admin_port}", *extra]
    for url in upstreams:
        args += ["--upstream", url]
    return args


async def request(port: int, source: str = "127.0.0.1", body: bytes = b"", timeout: float = 5.0):
    """One request on its own connection from `source`: (status, headers, body)."""
    host = "::1" if ":" in source else "127.0.0.1"
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://[{host}]:{port}/bid" if ":" in host else f"http://{host}:{port}/bid"
        async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, response.headers, await response.read()


async def wait_status(url: str, status: int = 200, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}")


async def test_published_blacklist_blocks_the_next_requests_in_every_worker(kafka_bootstrap, topic_names, tmp_path):
    port, admin = free_port(), free_port()
    async with bidder() as (upstream, answered, _):
        with process(["materialize", "--kafka", kafka_bootstrap, "--commands-topic", topic_names.commands,
                      "--ranges-topic", topic_names.ranges], tmp_path, "materializer"), \
             process(serve_args(kafka_bootstrap, topic_names, [upstream], port, admin, "--workers", "2"),
                     tmp_path, "gateway"):
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            assert (await request(port, "127.0.0.2", b"a"))[::2] == (200, b"bid:a")
            async with Publisher(KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)) as pub:
                await pub.publish("BLACKLIST 127.0.0.2")
                await pub.publish("BLACKLIST ::1")

                async def enforced() -> bool:
                    statuses = [(await request(port, ip))[0] for ip in ("127.0.0.2", "::1") for _ in range(4)]
                    return set(statuses) == {403}

                await eventually(enforced)
                # Each request on a new connection: spread over both workers, all enforce it.
                blocked = [await request(port, "127.0.0.2", b"x") for _ in range(10)]
                assert {(status, body) for status, _, body in blocked} == {(403, b"")}
                allowed = [await request(port, "127.0.0.1", b"y") for _ in range(10)]
                assert {(status, body) for status, _, body in allowed} == {(200, b"bid:y")}
                assert b"x" not in answered

                await pub.publish("WHITELIST 127.0.0.0/8")
                await eventually(lambda: _status_is(port, "127.0.0.2", 200))


async def _status_is(port: int, source: str, status: int) -> bool:
    return (await request(port, source))[0] == status


async def test_not_ready_until_bootstrapped_answers_503_with_retry_after(topic_names, tmp_path):
    port, admin, dead_broker = free_port(), free_port(), free_port()
    async with bidder() as (upstream, answered, _):
        with process(serve_args(f"127.0.0.1:{dead_broker}", topic_names, [upstream], port, admin),
                     tmp_path, "gateway") as gateway:
            await wait_status(f"http://127.0.0.1:{admin}/readyz", 503)
            status, headers, _ = await request(port)
            assert status == 503 and headers["Retry-After"] == "1"
            assert not answered
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(10) == 0


async def test_hanging_upstream_gets_timeout_status(kafka_bootstrap, topic_names, tmp_path):
    """Outcomes only (status, counter): the budget's figures are measured in bench/proxy.py."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()  # accepts (in the backlog), never answers
    port, admin = free_port(), free_port()
    try:
        with process(serve_args(kafka_bootstrap, topic_names, [f"http://127.0.0.1:{hung.getsockname()[1]}"],
                                port, admin, "--budget-ms", "50"), tmp_path, "gateway"):
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            for _ in range(3):
                assert (await request(port))[::2] == (204, b"")

            async def counted() -> bool:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                        text = await response.text()
                return any(line.startswith("gateway_requests_total") and 'outcome="timeout"' in line
                           and float(line.split()[-1]) >= 3 for line in text.splitlines())

            await eventually(counted, what="3 timeouts in /metrics")
    finally:
        hung.close()


async def test_sigterm_drains_in_flight_requests(kafka_bootstrap, topic_names, tmp_path):
    port, admin = free_port(), free_port()
    async with bidder(delay_s=0.4) as (upstream, answered, handler):
        with process(serve_args(kafka_bootstrap, topic_names, [upstream], port, admin,
                                "--budget-ms", "2000", "--workers", "2"), tmp_path, "gateway") as gateway:
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            in_flight = [asyncio.create_task(request(port, body=str(i).encode())) for i in range(16)]
            deadline = time.monotonic() + 5
            while handler.received < 16 and time.monotonic() < deadline:  # all in flight at the bidder
                await asyncio.sleep(0.01)
            assert handler.received == 16 and not answered
            gateway.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*in_flight)
            assert sorted(body for _, _, body in results) == sorted(b"bid:%d" % i for i in range(16))
            assert {status for status, _, _ in results} == {200}
            assert await asyncio.to_thread(gateway.wait, 15) == 0
            with pytest.raises(aiohttp.ClientError):
                await request(port)


async def test_a_killed_worker_is_replaced(kafka_bootstrap, topic_names, tmp_path):
    port, admin = free_port(), free_port()
    async with bidder() as (upstream, _, _):
        with process(serve_args(kafka_bootstrap, topic_names, [upstream], port, admin, "--workers", "2"),
                     tmp_path, "gateway") as gateway:
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            workers = children(gateway.pid)
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)

            async def replaced() -> bool:
                now = children(gateway.pid)
                return len(now) == 2 and workers[0] not in now

            await eventually(replaced, timeout=10)
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            assert {(await request(port))[0] for _ in range(10)} == {200}


def children(pid: int) -> list[int]:
    """Child processes (the workers), not threads."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


# -- process safety -----------------------------------------------------------------------------

def gateway_cmd(port: int, admin: int, *extra: str) -> list[str]:
    dead_broker = f"127.0.0.1:{free_port()}"  # no broker needed: listening comes first
    return [sys.executable, "-m", "gateway", "serve", "--kafka", dead_broker, "--upstream", "http://127.0.0.1:9",
            "--listen", f"[::]:{port}", "--admin-listen", f"127.0.0.1:{admin}", *extra]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_a_second_serve_on_a_busy_port_fails_at_once_with_one_line(tmp_path):
    port, admin = free_port(), free_port()
    with process(gateway_cmd(port, admin)[3:], tmp_path, "first"):
        await wait_status(f"http://127.0.0.1:{admin}/readyz", 503)
        second = subprocess.run(gateway_cmd(port, free_port()), capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert len(lines) == 1 and "address already in use" in lines[0], lines
        # The first one still owns every connection.
        assert (await request(port))[0] == 503


async def test_a_busy_admin_port_makes_serve_exit_at_once_with_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = free_port()
    try:
        done = subprocess.run(gateway_cmd(port, busy.getsockname()[1]), capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "address already in use" in lines[0], lines
    with pytest.raises(OSError):  # nothing serves the proxy port either
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_workers_die_with_a_killed_supervisor(tmp_path):
    port, admin = free_port(), free_port()
    with process(gateway_cmd(port, admin, "--workers", "2")[3:], tmp_path, "gateway") as gateway:
        await wait_status(f"http://127.0.0.1:{admin}/readyz", 503)
        workers = await eventually(lambda: len(children(gateway.pid)) == 2 and children(gateway.pid))
        gateway.kill()  # SIGKILL: no chance to drain anything
        gateway.wait(10)
        await eventually(lambda: not any(alive(pid) for pid in workers), timeout=10, what="the workers to die")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- one view per host: the workers are forked from the supervisor's view ----------------------

async def test_a_killed_worker_is_forked_again_from_the_supervisors_current_view(own_broker, topic_names, tmp_path):
    """The worker misses a command (frozen, then SIGKILLed); the broker is gone before the supervisor
    forks its replacement. A replacement that had to read the view itself could never be ready;
    one forked from the supervisor's view is ready and enforces that command at once."""
    port, admin, kafka = free_port(), free_port(), own_broker.bootstrap
    token = {"Authorization": "Bearer t0ken"}
    async with bidder() as (upstream, _, _):
        with process(["materialize", "--kafka", kafka, "--commands-topic", topic_names.commands,
                      "--ranges-topic", topic_names.ranges], tmp_path, "materializer"), \
             process(serve_args(kafka, topic_names, [upstream], port, admin, "--workers", "1",
                                "--admin-token", "t0ken"), tmp_path, "gateway") as gateway:
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            [worker] = children(gateway.pid)
            async with Publisher(KafkaConfig(kafka, topic_names.commands, topic_names.ranges)) as pub:
                await pub.publish("BLACKLIST 127.0.0.2")
                await eventually(lambda: _status_is(port, "127.0.0.2", 403))
                os.kill(worker, signal.SIGSTOP)  # from here on the worker reads nothing
                await pub.publish("BLACKLIST 127.0.0.3")

            async def supervisor_blocks(ip: str) -> bool:
                async with aiohttp.ClientSession(headers=token) as session:
                    async with session.get(f"http://127.0.0.1:{admin}/admin/lookup", params={"ip": ip}) as response:
                        return (await response.json())["blocked"]

            await eventually(lambda: supervisor_blocks("127.0.0.3"))
            own_broker.stop()  # nothing left to bootstrap from
            os.kill(worker, signal.SIGKILL)
            replacement = await eventually(lambda: (now := children(gateway.pid)) and now[0] != worker and now[0])
            await wait_status(f"http://127.0.0.1:{admin}/readyz")
            assert children(gateway.pid) == [replacement]  # every request below reaches the new worker
            assert [(await request(port, ip))[0] for ip in ("127.0.0.3", "127.0.0.2", "127.0.0.1")] == [403, 403, 200]

