"""Real processes for the integrity tests: `gateway materialize` and `gateway serve`, started through
the CLI, stopped by PID; and the reads a test makes of them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from helpers import eventually, free_port

from gateway.broker import stop_pid

TOKEN = "integrity-test-token"


def topic_args(kafka) -> list[str]:
    return ["--kafka", kafka.bootstrap, "--commands-topic", kafka.commands_topic, "--ranges-topic", kafka.ranges_topic]


def spawn_materializer(kafka, log_path: Path, *extra: str, session_timeout_ms: int = 3000) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "materialize", *topic_args(kafka),
         "--session-timeout-ms", str(session_timeout_ms), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )


def log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


async def logged(path: Path, text: str, count: int = 1, timeout: float = 30) -> None:
    await eventually(lambda: log_count(path, text) >= count, timeout=timeout,
                     what=f"{count} x {text!r} in {path.name}: {path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


@dataclass
class Gateway:
    process: subprocess.Popen
    port: int
    admin: int
    log: Path

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    async def get(self, path: str) -> tuple[int, object]:
        async with aiohttp.ClientSession() as session, session.get(
                self.admin_url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=aiohttp.ClientTimeout(total=10)) as response:
            body = await (response.json() if response.content_type == "application/json" else response.text())
            return response.status, body

    async def post(self, path: str, body: object = None) -> tuple[int, object]:
        async with aiohttp.ClientSession() as session, session.post(
                self.admin_url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status, await response.json()

    async def status(self) -> dict:
        code, body = await self.get("/admin/status")
        assert code == 200, body
        return body

    async def ranges(self) -> list[tuple[str, str]]:
        code, body = await self.get("/admin/ranges")
        assert code == 200, body
        return [(r["start"], r["end"]) for r in body["ranges"]]

    async def ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    self.admin_url + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def stop(self) -> None:
        stop_pid(self.process, timeout=20)


def spawn_gateway(kafka, log_path: Path, upstream: str, *extra: str) -> Gateway:
    port, admin = free_port(), free_port()
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", *topic_args(kafka), "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{admin}", "--admin-token", TOKEN, "--upstream", upstream, *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    return Gateway(process, port, admin, log_path)
