"""`gateway ...` as real child processes for tests, and what a user reads from them over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
from helpers import eventually, running
from prometheus_client.parser import text_string_to_metric_families


def gateway_process(args: list[str], log: Path, *, env: dict[str, str] | None = None):
    """`python -m gateway ARGS` with its output in `log`, stopped by its PID on the way out."""
    return running([sys.executable, "-m", "gateway", *args], log, env=env)


def samples(text: bytes | str) -> dict[tuple[str, tuple], float]:
    """Parse an exposition into {(sample name, sorted labels): value}, creation times left out."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


async def answers(session: aiohttp.ClientSession, url: str, status: int = 200, timeout: float = 60.0,
                  process: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers `status` (a process starting up); fails at once if `process` exits."""
    async def check() -> str | None:
        if process is not None and process.poll() is not None:
            return f"exited with code {process.returncode}"
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
            return "answered" if response.status == status else None

    outcome = await eventually(check, timeout=timeout, interval=0.1, what=f"{url} to answer {status}")
    assert outcome == "answered", f"waiting for {url} to answer {status}, the process {outcome}"
