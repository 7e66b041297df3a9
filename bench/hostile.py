"""Hostile clients against one gateway worker: CPU and memory they can make it spend.

One run, loopback only, bounded. The worker is the fast engine alone (bench/proxy.py's
prebuilt role: Proxy on uvloop, 1,000 blacklist ranges, default limits) in front of the
nginx bidder stub. Each attack is measured from the worker's /proc/<pid>/task/*/schedstat (CPU) and
/proc/<pid>/status (VmRSS):

- 1 MiB body in 1-byte chunks (chunked, 6 MB on the wire): CPU until the answer.
- 1 MiB Content-Length body written 1 byte per send() (TCP_NODELAY): CPU until the answer.
- 200 connections, each with an unfinished header block (7 KB of lines + a partial line
  of 7 KB), held open: RSS growth.
- One client that pipelines 3,000 GETs and never reads (SO_RCVBUF 4 KB): RSS growth.
- Meanwhile (the last two held open): wrk c=8 for 3 s from a well-behaved client,
  against a run without attackers: p99 and req/s.

    .venv/bin/python bench/hostile.py [--out bench/out/hostile.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proxy import free_port, render, start_nginx, wait_http, wrk  # bench/proxy.py

from gateway.broker import stop_pid
from gateway.http.proxy import MAX_CHUNKS

HERE = Path(__file__).resolve().parent


def cpu_s(pid: int) -> float:
    """CPU time of every thread of pid, in seconds, at nanosecond resolution (schedstat)."""
    return sum(int(Path(task, "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def one_byte_chunks(port: int, pid: int) -> dict:
    body = b"1\r\nx\r\n" * (1 << 20) + b"0\r\n\r\n"
    request = b"POST /bid HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    before = cpu_s(pid)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sender = threading.Thread(target=lambda: _send_all(sock, request), daemon=True)
        sender.start()
        status = read_answer(sock)
    cpu = cpu_s(pid) - before
    return {"attack": "1 MiB body in 1-byte chunks (chunked)", "answer": status.decode(), "cpu_ms": round(cpu * 1000, 1)}


def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # answered and closed before the end: the point


def one_byte_writes(port: int, pid: int) -> dict:
    size = 1 << 20
    before = cpu_s(pid)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST /bid HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        byte = b"x"
        sent = 0
        try:
            for sent in range(1, size + 1):
                sock.send(byte)
        except OSError:
            pass  # cut off at the deadline: the rest is never read
        status = read_answer(sock)
    cpu = cpu_s(pid) - before
    return {"attack": "1 MiB Content-Length body, 1 byte per send()", "answer": status.decode(),
            "cpu_ms": round(cpu * 1000, 1), "bytes_sent": sent}


def unfinished_headers(port: int, count: int = 200) -> list[socket.socket]:
    block = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%03d: %s\r\n" % (i, b"h" * 60) for i in range(100))
    block += b"X-Partial: " + b"p" * 7000
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(block)
        socks.append(sock)
    return socks


def non_reading_pipeliner(port: int, count: int = 3000) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    threading.Thread(target=lambda: _send_all(sock, b"GET /bid HTTP/1.1\r\nHost: x\r\n\r\n" * count),
                     daemon=True).start()
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "out" / "hostile.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    bidder_port, port = free_port(), free_port()
    processes: list[subprocess.Popen] = []
    rows: list[dict] = []
    try:
        processes.append(start_nginx(workdir, "bidder", render("bidder.conf", dir=workdir, port=bidder_port)))
        wait_http(bidder_port)
        gateway = subprocess.Popen([sys.executable, str(HERE / "proxy.py"), "--role", "gateway", "--port", str(port),
                                    "--upstream", f"http://127.0.0.1:{bidder_port}", "--ranges", "1000"])
        processes.append(gateway)
        wait_http(port)
        pid = gateway.pid
        baseline = wrk(port, 8, 3, [pid])  # warm up and the well-behaved client's baseline

        rows.append(one_byte_chunks(port, pid))
        rows.append(one_byte_writes(port, pid))

        before = rss_mb(pid)
        held = unfinished_headers(port)
        time.sleep(1.0)  # let the worker read everything it will read
        grown = rss_mb(pid) - before
        rows.append({"attack": "200 connections with unfinished header blocks (14 KB each, held)",
                     "rss_growth_mb": round(grown, 1)})

        before = rss_mb(pid)
        pipeliner = non_reading_pipeliner(port)
        time.sleep(2.0)
        rows.append({"attack": "one client pipelining 3,000 GETs, never reading",
                     "rss_growth_mb": round(rss_mb(pid) - before, 2)})

        under_attack = wrk(port, 8, 3, [pid])
        for sock in [*held, pipeliner]:
            sock.close()
        rows.append({"attack": "well-behaved client, wrk c=8, no attackers", "p99_ms": round(baseline["p99_us"] / 1000, 2),
                     "rps": baseline["rps"], "non_2xx": baseline["non_2xx"]})
        rows.append({"attack": "well-behaved client, wrk c=8, 200 header blocks + pipeliner held",
                     "p99_ms": round(under_attack["p99_us"] / 1000, 2), "rps": under_attack["rps"],
                     "non_2xx": under_attack["non_2xx"]})
    finally:
        for process in reversed(processes):
            stop_pid(process, timeout=10)

    chunks, writes, headers, pipelined, _, attacked = rows
    targets = [
        {"target": "1 MiB body in 1-byte chunks: < 50 ms of worker CPU", "measured": f"{chunks['cpu_ms']} ms "
         f"({chunks['answer']})", "met": chunks["cpu_ms"] < 50},
        {"target": "200 unfinished header blocks: < 30 MB RSS growth", "measured": f"{headers['rss_growth_mb']} MB",
         "met": headers["rss_growth_mb"] < 30},
        {"target": "non-reading pipeliner: < 2 MB", "measured": f"{pipelined['rss_growth_mb']} MB",
         "met": pipelined["rss_growth_mb"] < 2},
        {"target": "other clients keep their budget (p99 <= 100 ms under attack)", "measured":
         f"p99 {attacked['p99_ms']} ms, {attacked['rps']} req/s", "met": attacked["p99_ms"] <= 100},
    ]
    report = {
        "title": "Hostile clients against one worker of the fast engine",
        "notes": ("Proxy alone on uvloop (bench/proxy.py --role gateway), default limits (1 MiB body, 8 KiB headers), "
                  "nginx bidder stub; CPU from /proc/<pid>/task/*/schedstat, RSS from VmRSS. The 1-byte-send row shows the cost "
                  "of one syscall-sized read per byte, which no parser avoids (nginx pays it too); the chunked row is "
                  f"the parser's cost, refused at {MAX_CHUNKS} chunks. Noisy on a shared 2-core machine."),
        "rows": rows,
        "targets": targets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(row)
    for target in targets:
        print(("ok     " if target["met"] else "MISSED ") + target["target"] + ": " + target["measured"])
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
