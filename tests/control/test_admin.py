"""The admin API against a live listener: real broker, materializer and follower, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio
from helpers import eventually
from liveadmin import TOKEN, live_admin

from gateway.blacklist.ranges import RangeSet
from gateway.control.admin import DEFAULT_WAIT_S, make_admin_app, start_admin
from gateway.http.config import ServeConfig
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower

ADMIN_ROUTES = [
    ("GET", "/admin/ranges"),
    ("GET", "/admin/lookup?ip=10.0.0.1"),
    ("POST", "/admin/commands"),
    ("GET", "/admin/status"),
    ("GET", "/admin/history?at=0"),
    ("GET", "/admin/openapi.json"),
    ("GET", "/admin/explain?ip=10.0.0.1"),
    ("GET", "/admin/commands?limit=5"),
    ("GET", "/admin/top"),
]


# One live admin listener for the module (a materializer takes ~3 s to join its group on Tansu);
# tests that change the view use address blocks of their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def admin(kafka_bootstrap):
    tag = uuid.uuid4().hex[:8]
    async with live_admin(kafka_bootstrap, f"t-admin-{tag}.commands", f"t-admin-{tag}.ranges") as live:
        yield live


async def test_blacklist_with_wait_is_visible_to_the_next_lookup(admin):
    await admin.clear()
    offset = await admin.command("BLACKLIST 10.0.0.0/24", reason="abuse")
    status, body = await admin.call("GET", "/admin/lookup?ip=10.0.0.5")
    assert status == 200
    assert body == {"ip": "10.0.0.5", "blocked": True, "range": {"start": "10.0.0.0", "end": "10.0.0.255"}}

    assert await admin.command("WHITELIST 10.0.0.100") > offset  # the seed's example
    assert (await admin.call("GET", "/admin/lookup?ip=10.0.0.100"))[1]["blocked"] is False
    _, body = await admin.call("GET", "/admin/lookup?ip=::ffff:10.0.0.99")  # mapped: looked up as IPv4
    assert body == {"ip": "10.0.0.99", "blocked": True, "range": {"start": "10.0.0.0", "end": "10.0.0.99"}}

    status, body = await admin.call("POST", "/admin/commands", json={"command": "BLACKLIST 2001:db8::/32"})
    assert status == 202 and body["offset"] == offset + 2 and "applied" not in body  # no wait: just the offset


async def test_ranges_as_json_and_cidr_text_by_family(admin):
    await admin.clear()
    await admin.command("BLACKLIST 10.0.0.0/24")
    await admin.command("WHITELIST 10.0.0.100")
    await admin.command("BLACKLIST 2001:db8::/48")

    status, body = await admin.call("GET", "/admin/ranges")
    assert status == 200
    assert body == {"count": 3, "ranges": [
        {"start": "10.0.0.0", "end": "10.0.0.99"},
        {"start": "10.0.0.101", "end": "10.0.0.255"},
        {"start": "2001:db8::", "end": "2001:db8:0:ffff:ffff:ffff:ffff:ffff"},
    ]}
    assert (await admin.call("GET", "/admin/ranges?family=6"))[1]["count"] == 1
    status, text = await admin.call("GET", "/admin/ranges?family=4&format=cidr")
    assert status == 200
    assert text.splitlines() == [
        "10.0.0.0/26", "10.0.0.64/27", "10.0.0.96/30",
        "10.0.0.101/32", "10.0.0.102/31", "10.0.0.104/29", "10.0.0.112/28", "10.0.0.128/25",
    ]


async def test_status_reports_readiness_offsets_and_counts(admin):
    await admin.clear()
    sent = time.time()
    offset = await admin.command("BLACKLIST 192.0.2.0/24")
    status, body = await admin.call("GET", "/admin/status")
    received = time.time()
    assert status == 200
    assert body["ready"] is True
    assert body["ranges"] == {"4": 1, "6": 0}
    assert body["addresses"] == {"4": 256, "6": 0}
    assert body["applied_command"] == offset
    assert body["lag"] == 0  # every record of the view is applied: nothing is written after the command's own
    assert body["age_seconds"] <= received - sent + 0.002  # the command's records were applied after `sent`
    assert body["poison_records"] == 0
    assert int(body["applied_offsets"]["0"]) >= 1


async def test_history_folds_the_command_log_up_to_an_offset_or_a_time(admin, read_topic):
    first = await admin.command("BLACKLIST 10.1.0.0/16")
    [stamp] = [r.timestamp for r in await read_topic(admin.kafka.commands_topic) if r.offset == first]
    # `between` lies half a millisecond after the first command's record time; the second is sent once
    # the clock has passed it, so its record time is later.
    between = (datetime.fromtimestamp(stamp // 1000, timezone.utc)
               + timedelta(microseconds=stamp % 1000 * 1000 + 500)).isoformat()
    await eventually(lambda: time.time() * 1000 >= stamp + 2, what="the clock to pass the first command's time")
    second = await admin.command("WHITELIST 10.1.0.0/17")
    assert [r.timestamp for r in await read_topic(admin.kafka.commands_topic) if r.offset == second][0] > stamp + 1

    status, before = await admin.call("GET", f"/admin/history?at={first - 1}") if first else (200, {"ranges": []})
    status, body = await admin.call("GET", f"/admin/history?at={first}")
    assert status == 200 and body["commands"] == first + 1 and body["next_offset"] == first + 1
    added = [r for r in body["ranges"] if r not in before["ranges"]]
    assert {"start": "10.1.0.0", "end": "10.1.255.255"} in body["ranges"] and len(added) == 1
    status, body = await admin.call("GET", "/admin/history", params={"at": between, "family": "4"})
    assert status == 200 and {"start": "10.1.0.0", "end": "10.1.255.255"} in body["ranges"]
    status, text = await admin.call("GET", f"/admin/history?at={first + 1}&format=cidr&family=4")
    assert status == 200 and "10.1.128.0/17\n" in text and "10.1.0.0/16\n" not in text


async def test_health_ready_and_metrics_need_no_token(admin):
    async with admin.session.get(admin.url + "/healthz") as response:
        assert response.status == 200 and await response.json() == {"status": "ok"}
    async with admin.session.get(admin.url + "/readyz") as response:
        assert response.status == 200 and (await response.json())["ready"] is True

    async def scrape() -> str:
        async with admin.session.get(admin.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    def propagated(text: str) -> float:
        [count] = [line.split()[-1] for line in text.splitlines() if line.startswith("gateway_propagation_seconds_count")]
        return float(count)

    before = propagated(await scrape())
    await admin.clear()  # four commands
    await admin.command("BLACKLIST 198.51.100.0/24")
    # The flusher copies the view into the gauges every 0.1 s here, and in the same step the time each
    # applied command took from publish to applied: once all five are counted, the gauges show the view
    # after the last one.
    text = await eventually(scrape, until=lambda text: propagated(text) >= before + 5,
                            what="a flush that measured the five commands")
    assert 'gateway_ranges{family="4"} 1.0' in text
    assert 'gateway_addresses_blocked{family="4"} 256.0' in text
    assert "gateway_ready 1.0" in text


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
async def test_every_admin_route_needs_the_bearer_token(admin, method, path):
    async with admin.session.request(method, admin.url + path) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in (await response.json())["error"]
    for header in ("Basic dXNlcjpwYXNz", "Bearer", f"Token {TOKEN}"):
        async with admin.session.request(method, admin.url + path, headers={"Authorization": header}) as response:
            assert response.status == 401, header
    status, body = await admin.call(method, path, token="wrong-token")
    assert status == 403 and body == {"error": "wrong admin token"}


async def test_without_a_configured_token_the_admin_api_is_disabled(kafka_bootstrap, topic_names):
    async with live_admin(kafka_bootstrap, topic_names.commands, topic_names.ranges, token=None,
                          materializer=False) as live:
        status, body = await live.call("GET", "/admin/status", token="anything")
        assert status == 403 and "--admin-token" in body["error"]
        async with live.session.get(live.url + "/readyz") as response:
            assert response.status == 200


@pytest.mark.parametrize("path,message", [
    ("/admin/lookup", "missing query parameter ip"),
    ("/admin/lookup?ip=10.0.0.256", "IPv4 or IPv6 address"),
    ("/admin/lookup?ip=not-an-ip", "IPv4 or IPv6 address"),
    ("/admin/ranges?family=5", "family must be 4 or 6"),
    ("/admin/ranges?format=xml", "format must be json or cidr"),
    ("/admin/history", "missing query parameter at"),
    ("/admin/history?at=yesterday", "ISO 8601"),
    ("/admin/ranges?famly=4", "unknown query parameter(s) famly for /admin/ranges (it takes: family, format)"),
])
async def test_bad_query_parameters_are_400_with_a_message(admin, path, message):
    status, body = await admin.call("GET", path)
    assert status == 400 and message in body["error"], body


@pytest.mark.parametrize("data,message", [
    (b"{not json", "body must be JSON"),
    (b'["BLACKLIST 10.0.0.0/8"]', "JSON object"),
    (b"{}", "command must be a string"),
    (b'{"command": "BLACKLIST 10.0.0.5/24"}', "host bits set (did you mean 10.0.0.0/24?)"),
    (b'{"command": "BLACKLIST 10.0.0.0/33"}', "prefix length"),
    (b'{"command": "BLOCK 10.0.0.0/8"}', "unknown verb"),
    (b'{"command": "BLACKLIST ::ffff:10.0.0.0/104"}', "IPv4-mapped"),
    (b'{"command": "BLACKLIST 10.0.0.0/8", "reason": 5}', "reason must be a string"),
    (b'{"command": "BLACKLIST 10.0.0.0/8", "who": "me"}', "unknown field(s) who"),
])
async def test_bad_commands_are_400_and_nothing_is_published(admin, data, message):
    before = await admin.published()
    status, body = await admin.call("POST", "/admin/commands", data=data)
    assert status == 400 and message in body["error"], body
    assert await admin.published() == before


async def test_unknown_routes_methods_and_huge_bodies_answer_json(admin):
    status, body = await admin.call("GET", "/admin/nope")
    assert status == 404 and "/admin/openapi.json" in body["error"]
    status, body = await admin.call("DELETE", "/admin/ranges")
    assert status == 405 and "DELETE" in body["error"]
    status, body = await admin.call("POST", "/admin/commands", data=b"x" * 100_000)
    assert status == 413 and "too large" in body["error"]
    status, body = await admin.call("POST", "/admin/commands?wait=maybe", json={"command": "BLACKLIST 10.0.0.0/8"})
    assert status == 400 and "wait" in body["error"]


async def test_wait_answers_504_when_no_materializer_applies_the_command(kafka_bootstrap, topic_names):
    async with live_admin(kafka_bootstrap, topic_names.commands, topic_names.ranges, materializer=False) as live:
        started = time.monotonic()
        status, body = await live.call("POST", "/admin/commands?wait=1&timeout=0.5",
                                       json={"command": "BLACKLIST 10.0.0.0/8"})
        assert status == 504 and body["offset"] == 0 and "materializer" in body["error"]
        assert "within 0.5 s" in body["error"]  # it waited as long as asked ...
        assert time.monotonic() - started < DEFAULT_WAIT_S  # ... not the default wait


async def test_a_large_listing_is_streamed_and_survives_updates(kafka_bootstrap, topic_names):
    """100,000 ranges come out a chunk at a time; records applied mid-listing neither break nor duplicate it."""
    view = RangeSet()
    for n in range(100_000):
        view.store(f"10.{n >> 8 & 255}.{n & 255}.0", f"10.{n >> 8 & 255}.{n & 255}.127") if n < 65536 else \
            view.store(f"11.{n >> 8 & 255}.{n & 255}.0", f"11.{n >> 8 & 255}.{n & 255}.127")
    kafka = KafkaConfig(kafka_bootstrap, topic_names.commands, topic_names.ranges)
    follower = Follower(kafka, initial=(view, {0: 0}))  # not started: this test drives its view
    config = ServeConfig(kafka=kafka, upstreams=("http://127.0.0.1:9",), admin_token=TOKEN)
    runner = await start_admin(make_admin_app(config, follower, None), "127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: the server must wait for it
    sock.connect(("127.0.0.1", runner.addresses[0][1]))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET /admin/ranges HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        first = await reader.readexactly(1 << 16)
        follower.view.store("9.0.0.0", "9.0.0.255")  # before what was listed: not seen
        follower.view.store("10.0.0.0", None)  # listed already: stays listed
        follower.view.store("11.134.159.0", None)  # not listed yet: gone
        follower.records_applied += 3
        response = first + await reader.read()
    finally:
        writer.close()
        await runner.cleanup()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Content-Length" not in head
    listing = json.loads(body)
    starts = [r["start"] for r in listing["ranges"]]
    assert listing["count"] == len(starts) == 99_999
    assert len(set(starts)) == len(starts) and "11.134.159.0" not in starts
    assert starts[0] == "10.0.0.0" and starts[-1] == "11.134.158.0"  # the last range was removed mid-listing
