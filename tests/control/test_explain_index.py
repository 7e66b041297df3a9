"""The command table of explain and the log listing, against a brute-force scan of the same records."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from model import any_command

from gateway.control.explain import CommandTable

ACTORS = ["alice", "bob", None]
records = st.lists(st.tuples(any_command, st.sampled_from(ACTORS)), max_size=40)


def probes_of(commands):
    """Addresses at every command's edges and just outside them: where answers change."""
    out = set()
    for command in commands:
        bits = 32 if command.version == 4 else 128
        for value in (command.first, command.last, command.first - 1, command.last + 1):
            if 0 <= value < 1 << bits:
                out.add((command.version, str(ipaddress.ip_address(value) if command.version == 4
                                              else ipaddress.IPv6Address(value))))
    return sorted(out)


@settings(max_examples=150, deadline=None)
@given(records, st.integers(0, 40))
def test_deciding_covering_and_listing_match_a_scan(entries, since):
    table = CommandTable()
    for offset, (command, actor) in enumerate(entries):
        table.add(offset * 2, str(command), 1000 + offset, f"k{offset}", None, actor, "why")  # gaps, as markers leave
    table.add(len(entries) * 2, "NOT A COMMAND", 0, None, None, "alice", None)  # poison: listed, never deciding
    commands = [command for command, _ in entries]
    for version, address in probes_of(commands):
        ip = ipaddress.ip_address(address)
        covering = [i for i, c in enumerate(commands) if c.version == version and c.first <= int(ip) <= c.last]
        assert table.covering(version, address) == covering
        assert table.deciding(version, address) == (covering[-1] if covering else None)
        if covering:
            assert table.blocks(covering[-1]) is (commands[covering[-1]].action == "BLACKLIST")
        for actor in ("alice", "bob"):
            start = table.first_at_or_after(offset=since)
            want = [i for i in reversed(covering) if i >= start and entries[i][1] == actor]
            assert list(table.newest_first(since=start, actor=actor, address=(version, address))) == want
    for i, (command, actor) in enumerate(entries):
        row = table.row(i)
        assert (row.offset, row.command, row.timestamp_ms, row.key, row.actor, row.reason, row.valid) == \
            (i * 2, str(command), 1000 + i, f"k{i}", actor, "why", True)
    everything = list(table.newest_first())
    assert everything == list(range(len(entries), -1, -1)) and not table.row(len(entries)).valid
    alice = [i for i, (_, actor) in enumerate(entries) if actor == "alice"] + [len(entries)]
    assert list(table.newest_first(actor="alice")) == alice[::-1]
    assert table.first_at_or_after(offset=since) == min((since + 1) // 2, len(entries) + 1)
