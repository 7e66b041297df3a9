"""A demo bidder: answers OpenRTB-shaped bid requests with a bid, anything else with a short hint.

It stands in for a real bidder behind the gateway in `gateway demo` and in tests. A POST
whose JSON body has `imp` entries gets one bid per impression (OpenRTB 2.x BidResponse
shape); a POST without impressions gets 204 (no bid); other requests get a JSON hint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

from aiohttp import web

log = logging.getLogger(__name__)

PRICE = 1.25  # CPM, USD


def bid_response(request: dict) -> dict | None:
    """The bid for an OpenRTB bid request, or None for no bid."""
    imps = request.get("imp")
    if not isinstance(imps, list) or not imps:
        return None
    bids = [
        {
            "id": f"bid-{n}",
            "impid": str(imp.get("id", n)) if isinstance(imp, dict) else str(n),
            "price": PRICE,
            "adm": "<div>demo ad</div>",
            "crid": "demo-creative",
        }
        for n, imp in enumerate(imps, start=1)
    ]
    return {"id": str(request.get("id", "")), "cur": "USD", "seatbid": [{"seat": "demo", "bid": bids}]}


async def handle(request: web.Request) -> web.Response:
    if request.method != "POST":
        return web.json_response({
            "bidder": "demo",
            "hint": "POST an OpenRTB bid request, e.g. {\"id\": \"1\", \"imp\": [{\"id\": \"1\"}]}",
            "you": request.headers.get("X-Forwarded-For", request.remote),
        })
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    bid = bid_response(body) if isinstance(body, dict) else None
    if bid is None:
        return web.Response(status=204)
    return web.json_response(bid)


def make_bidder_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_bidder(host: str = "127.0.0.1", port: int = 9000) -> web.AppRunner:
    """Start the bidder on host:port (0 = any free port); stop it with `await runner.cleanup()`."""
    runner = web.AppRunner(make_bidder_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on (useful after asking for port 0)."""
    return runner.addresses[0][1]


async def serve_bidder(host: str = "127.0.0.1", port: int = 9000) -> None:
    """`gateway bidder --listen HOST:PORT`: run until SIGINT/SIGTERM."""
    runner = await start_bidder(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("demo bidder listening", extra={"listen": f"{host}:{bound_port(runner)}"})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.bidder --listen HOST:PORT` (what `gateway demo` starts)."""
    import argparse

    import uvloop

    from .control.logs import setup_logging
    from .kafka.config import parse_hostport

    parser = argparse.ArgumentParser(prog="gateway.bidder", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9000", type=parse_hostport, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    setup_logging()
    uvloop.run(serve_bidder(*args.listen))


if __name__ == "__main__":
    main()
