"""Publishing commands: offsets back, headers carried, blocklist files validated completely before sending."""

import asyncio
import getpass
import re
import subprocess
import sys

import pytest

from gateway.blacklist.commands import CommandError
from gateway.kafka.publisher import (
    ImportFileError,
    Publisher,
    import_file,
    parse_lines,
    publish,
)
from gateway.kafka.topics import ensure_topics


async def test_publish_returns_offsets_and_carries_key_and_headers(kafka, read_topic):
    first = await publish(kafka, "BLACKLIST 10.0.0.0/24", key="cmd-1", actor="alice", reason="abuse", request_id="r-9")
    async with Publisher(kafka) as publisher:
        second = await publisher.publish("whitelist 10.0.0.100")
    assert (first, second) == (0, 1)
    records = await read_topic(kafka.commands_topic)
    assert [r.value for r in records] == [b"BLACKLIST 10.0.0.0/24", b"WHITELIST 10.0.0.100/32"]
    assert records[0].key == b"cmd-1"
    assert dict(records[0].headers) == {"actor": b"alice", "reason": b"abuse", "request-id": b"r-9"}
    assert records[1].key is None and list(records[1].headers) == []


async def test_publish_refuses_an_invalid_command_before_sending(kafka, read_topic):
    with pytest.raises(CommandError, match="host bits set"):
        await publish(kafka, "BLACKLIST 10.0.0.5/24")
    assert await read_topic(kafka.commands_topic) == []


def test_netset_lines_comments_blanks_and_full_commands():
    lines = ["# FireHOL level1", "", "1.2.3.0/24", "  5.6.7.8  # a host", "2001:db8::/32", "WHITELIST 1.2.3.4"]
    assert [c.decode() for c in parse_lines(lines)] == [
        "BLACKLIST 1.2.3.0/24", "BLACKLIST 5.6.7.8/32", "BLACKLIST 2001:db8::/32", "WHITELIST 1.2.3.4/32",
    ]


def test_bad_lines_are_all_named_by_number():
    with pytest.raises(ImportFileError) as caught:
        parse_lines([b"1.2.3.0/24", b"not-an-ip", b"# ok", b"10.0.0.5/8", b"\xff\xfe"], source="list.netset")
    message = str(caught.value)
    assert "list.netset: 3 invalid line(s), nothing sent" in message
    assert "line 2:" in message and "line 4:" in message and "host bits set" in message and "line 5:" in message
    assert [n for n, _ in caught.value.errors] == [2, 4, 5]


async def test_import_file_publishes_in_order_and_reports_offsets(kafka, read_topic, tmp_path):
    path = tmp_path / "block.netset"
    path.write_text("# list\n" + "".join(f"10.{i // 256}.{i % 256}.0/24\n" for i in range(3000)))
    result = await import_file(kafka, path, reason="firehol")
    assert (result.count, result.first_offset, result.last_offset) == (3000, 0, 2999)
    records = await read_topic(kafka.commands_topic)
    assert [r.value for r in records[:2]] == [b"BLACKLIST 10.0.0.0/24", b"BLACKLIST 10.0.1.0/24"]
    assert len(records) == 3000 and dict(records[-1].headers) == {"reason": b"firehol"}


async def test_import_file_with_one_bad_line_sends_nothing(kafka, read_topic, tmp_path):
    path = tmp_path / "bad.netset"
    path.write_text("1.2.3.0/24\n" * 100 + "1.2.3.300\n")
    await ensure_topics(kafka)  # readers never auto-create a topic
    with pytest.raises(ImportFileError, match="line 101:"):
        await import_file(kafka, path)
    assert await read_topic(kafka.commands_topic) == []


def test_the_fast_ipv4_path_agrees_with_parse_network():
    from gateway.blacklist.commands import parse_network

    lines = ["1.2.3.4", "1.2.3.0/24", "0.0.0.0/0", "255.255.255.255/32", "1.2.3.0/024", "10.0.0.0/8",
             "01.2.3.4", "1.2.3.4/33", "1.2.3.4/24", "1.2.3", "1.2.3.4/", "1.2.3.4/+8", "1.2.3.4/ 8", "::1", "::ffff:1.2.3.4"]
    for line in lines:
        try:
            expected = str(parse_network(line))
        except CommandError as exc:
            with pytest.raises(ImportFileError, match="line 1: " + re.escape(str(exc))):
                parse_lines([line])
        else:
            assert parse_lines([line]) == [f"BLACKLIST {expected}".encode()], line


def ctl(kafka, *args):
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ctl", "--kafka", kafka.bootstrap, "--commands-topic", kafka.commands_topic,
         "--ranges-topic", kafka.ranges_topic, *args],
        capture_output=True, text=True, timeout=60,
    )


async def test_ctl_blacklist_and_import_report_offsets(kafka, read_topic, tmp_path):
    out = await asyncio.to_thread(ctl, kafka, "blacklist", "192.0.2.0/24", "--reason", "abuse")
    assert out.returncode == 0 and "offset 0" in out.stdout, out.stderr
    path = tmp_path / "level1.netset"
    path.write_text("# FireHOL level1\n\n198.51.100.7\n203.0.113.0/24\n")
    out = await asyncio.to_thread(ctl, kafka, "import", str(path))
    assert out.returncode == 0 and "1..2" in out.stdout, out.stderr
    bad = tmp_path / "bad.netset"
    bad.write_text("10.0.0.0/8\n10.0.0.1/8\n")
    out = await asyncio.to_thread(ctl, kafka, "import", str(bad))
    assert out.returncode != 0 and "line 2:" in out.stderr
    records = await read_topic(kafka.commands_topic)
    assert [r.value for r in records] == [b"BLACKLIST 192.0.2.0/24", b"BLACKLIST 198.51.100.7/32", b"BLACKLIST 203.0.113.0/24"]
    assert dict(records[0].headers) == {"reason": b"abuse", "actor": getpass.getuser().encode()}  # the OS user by default
