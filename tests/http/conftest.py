"""Fixtures of the request-path tests (the rig itself is proxyrig.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from proxyrig import start_bidder, start_gateway

from gateway.http.engines import ENGINES


@pytest.fixture
async def bidder():
    b = await start_bidder()
    yield b
    await b.runner.cleanup()


@pytest.fixture
async def hanging():
    """An upstream that accepts and reads requests but never answers: `.url`, and
    `.abandoned`, the number of its connections the gateway closed."""
    writers = []
    upstream = SimpleNamespace(url="", abandoned=0, received=0)

    async def hang(reader, writer):
        writers.append(writer)
        upstream.received += 1
        await reader.read()
        upstream.abandoned += 1

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()
    for writer in writers:
        writer.transport.abort()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Each request-path test runs once per front-door engine: one suite for both."""
    return request.param


@pytest.fixture
async def gateway(engine):
    """Factory: start the engine under test on a loopback socket; returns (host, port, proxy)."""
    started = []

    async def start(upstreams, index=None, ready=True, host="127.0.0.1", **settings):
        server, proxy, port = await start_gateway(upstreams, index, ready, host, engine=engine, **settings)
        started.append((server, proxy))
        return host, port, proxy

    yield start
    for server, proxy in started:
        server.close()
        await proxy.drain(0.1)
