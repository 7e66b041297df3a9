"""`gateway demo` as a real process: it refuses ports it cannot have, handles port 0, stops on the
terminal's Ctrl-C with the broker last and no error in any log, and leaves no folder behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, wait_until

FLAGS = ("--port", "--admin-port", "--bidder-port")


class Demo:
    """The demo in its own process group, as a terminal runs it; TMPDIR shows what it leaves behind."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        tmp.mkdir(exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "demo", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp)},
                                        start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.process.stdout], daemon=True)
        self.reader.start()

    def seen(self, pattern: str) -> re.Match | None:
        """The first output line matching pattern so far (None: not yet); the demo must still run."""
        self._drain()
        assert self.process.poll() is None, "demo exited:\n" + self.text
        return next((m for line in self.output if (m := re.search(pattern, line))), None)

    def ctrl_c(self) -> int:
        """What the terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.reader.join(10)
        self._drain()
        return code

    @property
    def text(self) -> str:
        return "".join(self.output)

    def _drain(self) -> None:
        while not self.lines.empty():
            self.output.append(self.lines.get())


@pytest.mark.parametrize("held", FLAGS)
def test_a_held_port_is_refused_in_one_line_before_anything_starts(held: str, tmp_path: Path) -> None:
    ports = {flag: free_port() for flag in FLAGS}
    with socket.socket() as holder:  # another demo, or anything else, listening there
        holder.bind(("127.0.0.1", ports[held]))
        holder.listen()
        run = subprocess.run([sys.executable, "-m", "gateway", "demo", *[a for f, p in ports.items() for a in (f, str(p))]],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 1
    assert run.stdout + run.stderr == (f"demo: port {ports[held]} ({held}) is already in use on 127.0.0.1:"
                                       f" stop what holds it, or pick another with {held}\n")
    assert list(tmp_path.iterdir()) == []  # no log folder for a demo that never started


def test_the_same_port_twice_is_refused(tmp_path: Path) -> None:
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", str(port)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 1 and "give each part its own port" in run.stdout, run.stdout + run.stderr


def test_port_0_ctrl_c_stops_children_in_order_and_a_clean_stop_leaves_no_folder(tmp_path: Path) -> None:
    demo = Demo(["--port", "0", "--admin-port", "0", "--bidder-port", "0", "--keep-logs"], tmp_path / "kept")
    try:
        pids = [int(p) for p in re.findall(r"=(\d+)", wait_until(lambda: demo.seen(r"demo: starting"), timeout=60).string)]
        admin = wait_until(lambda: demo.seen(r"admin API (http://127\.0\.0\.1:\d+)"), timeout=90,
                           what="the demo's instructions").group(1)
        token = wait_until(lambda: demo.seen(r"TOKEN=(\S+)"), timeout=5).group(1)
        request = urllib.request.Request(admin + "/admin/status", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200  # port 0 became a real port, and it is ours
    finally:
        code = demo.ctrl_c()
    assert code == 0, demo.text
    assert len(pids) == 4
    wait_until(lambda: not [pid for pid in pids if Path(f"/proc/{pid}").exists()], timeout=10, what="every child gone")
    (logs,) = (tmp_path / "kept").iterdir()  # --keep-logs: what each child said while it stopped
    for log in sorted(logs.iterdir()):
        body = log.read_text(errors="replace")
        assert "ERROR" not in body and "Traceback" not in body, f"{log.name} (the broker stopped first?):\n{body}"

    demo = Demo(["--port", "0", "--admin-port", "0", "--bidder-port", "0"], tmp_path / "clean")
    try:
        wait_until(lambda: demo.seen(r"TOKEN="), timeout=90, what="the second demo ready")
    finally:
        code = demo.ctrl_c()
    assert code == 0, demo.text
    assert list((tmp_path / "clean").iterdir()) == []  # a clean stop removes its log folder


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_dev_py_passes_a_stop_signal_sent_to_its_own_pid_on_to_the_child(sig: signal.Signals) -> None:
    """`kill -INT` or `kill <pid of python3 dev.py demo>` stops the demo, never orphans it (a
    terminal's Ctrl-C reaches both)."""
    root = Path(__file__).resolve().parents[1]
    child = (f"import signal, sys, time; signal.signal({int(sig)}, lambda *_: (print('stopping', flush=True),"
             " sys.exit(0))); print('ready', flush=True); time.sleep(60); sys.exit(3)")
    runner = subprocess.Popen(  # started with SIGINT ignored, as `python3 dev.py demo &` in a script is
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); import dev;"
                               f" sys.exit(dev.run([sys.executable, '-c', {child!r}]))"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert runner.stdout.readline() == "ready\n"
        runner.send_signal(sig)  # to dev.py's PID only, not its group
        assert runner.wait(30) == 0
        assert runner.stdout.read() == "stopping\n"
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
