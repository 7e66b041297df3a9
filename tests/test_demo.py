"""`gateway demo` (what `python3 dev.py demo` runs) as a real process: blacklist yourself, see the 403, Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import aiohttp
from helpers import free_port

BID = {"id": "1", "imp": [{"id": "1"}]}



def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_demo_blocks_a_blacklisted_client_and_ctrl_c_stops_every_process(tmp_path):
    port, admin, bidder = free_port(), free_port(), free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", str(admin),
         "--bidder-port", str(bidder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})  # its log folder goes where pytest cleans up
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()
    output: list[str] = []

    def read_until(pattern: str, timeout: float = 90.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                output.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert demo.poll() is None, "demo exited:\n" + "".join(output)
                continue
            if match := re.search(pattern, output[-1]):
                return match
        raise AssertionError(f"no {pattern!r} in the demo's output:\n" + "".join(output))

    try:
        pids = [int(p) for p in re.findall(r"=(\d+)", read_until(r"demo: starting").string)]
        assert len(pids) == 4  # broker, materializer, bidder, gateway
        logs = read_until(r"logs\s+(\S+)/").group(1)
        assert logs.startswith(f"{tmp_path}/"), logs  # not a folder left in /tmp for each run
        token = read_until(r"TOKEN=(\S+)").group(1)
        auth = {"Authorization": f"Bearer {token}"}
        gateway, admin_url = f"http://127.0.0.1:{port}/openrtb", f"http://127.0.0.1:{admin}"
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway, json=BID) as response:
                assert response.status == 200
                assert (await response.json())["seatbid"][0]["bid"][0]["impid"] == "1"
            async with session.post(admin_url + "/admin/commands?wait=1", headers=auth,
                                    json={"command": "BLACKLIST 127.0.0.1", "reason": "test"}) as response:
                assert response.status == 202, await response.text()
            async with session.post(gateway, json=BID) as response:
                assert response.status == 403
            async with session.get(admin_url + "/admin/ranges", headers=auth) as response:
                assert (await response.json())["ranges"] == [{"start": "127.0.0.1", "end": "127.0.0.1"}]
    finally:
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert code == 0, "".join(output)
    # The demo waits for each of its processes before it exits: none may be left, not even a zombie.
    assert not [pid for pid in pids if alive(pid)], "processes left behind"
