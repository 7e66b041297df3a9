#!/usr/bin/env python3
"""An OpenRTB-style bidder written in aiohttp that enforces the blacklist itself, with no proxy hop.

    python examples/aiohttp_bidder.py --kafka 127.0.0.1:9092 --listen 127.0.0.1:9000 \
        [--listen [::]:9000 ...] [--trusted-proxy 10.0.0.0/8 ...] [--reject-status 403|204] \
        [--commands-topic blacklist.commands] [--ranges-topic blacklist.ranges]

`POST /<anything>` with an OpenRTB bid request (JSON with `imp` entries) gets a bid; one
whose `device.ip` / `device.ipv6` is blacklisted gets 204 (no bid). A client the blacklist
covers gets the reject status before the handler runs, and every client gets 503 until
the view is bootstrapped: both come from gateway.http.middleware, which follows the view
topic inside this process. `/healthz`, `/readyz` and `/metrics` are exempt from the filter
(probes and scrapes must answer while the view bootstraps). `--listen [::]:PORT` listens
dual-stack: IPv4 clients then arrive as `::ffff:a.b.c.d` and are judged as IPv4.
SIGINT or SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway.bidder import bid_response
from gateway.http.middleware import BLACKLIST, setup_blacklist
from gateway.kafka.config import (
    DEFAULT_COMMANDS_TOPIC,
    DEFAULT_RANGES_TOPIC,
    KafkaConfig,
    parse_hostport,
)

PROBES = ("/healthz", "/readyz", "/metrics")


async def bid(request: web.Request) -> web.Response:
    """The bidder's own logic: only requests the blacklist let through get here."""
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return web.Response(status=204)
    device = body.get("device")
    if isinstance(device, dict):
        blacklist = request.app[BLACKLIST]
        if any(isinstance(device.get(key), str) and blacklist.blocks(device[key]) for key in ("ip", "ipv6")):
            return web.Response(status=204)  # the device the exchange names is blacklisted: no bid
    answer = bid_response(body)
    return web.Response(status=204) if answer is None else web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[BLACKLIST].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(kafka: KafkaConfig, trusted_proxies: list[str], reject_status: int) -> web.Application:
    app = web.Application()
    setup_blacklist(app, kafka, trusted_proxies=trusted_proxies, reject_status=reject_status, exempt=PROBES)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/{tail:.*}", bid)
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket; `::` is dual-stack (IPv4 clients as IPv4-mapped peers), as a bidder host often has."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
    sock.bind((host, port))
    return sock


async def serve(app: web.Application, listen: list[tuple[str, int]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        for host, port in listen:
            await web.SockSite(runner, listening_socket(host, port)).start()
            logging.info("aiohttp bidder listening on %s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops the follower (cleanup_ctx) after the sites close


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kafka", required=True, metavar="HOST:PORT", help="broker bootstrap address")
    parser.add_argument("--listen", action="append", type=parse_hostport, metavar="HOST:PORT",
                        help="address to serve on (repeatable; default 127.0.0.1:9000)")
    parser.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                        help="believe X-Forwarded-For from peers in this network (repeatable)")
    parser.add_argument("--reject-status", type=int, default=403, help="answer to blacklisted clients (204: no bid)")
    parser.add_argument("--commands-topic", default=DEFAULT_COMMANDS_TOPIC)
    parser.add_argument("--ranges-topic", default=DEFAULT_RANGES_TOPIC)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kafka = KafkaConfig(args.kafka, args.commands_topic, args.ranges_topic)
    app = make_app(kafka, args.trusted_proxy, args.reject_status)
    uvloop.run(serve(app, args.listen or [("127.0.0.1", 9000)]))


if __name__ == "__main__":
    main()
