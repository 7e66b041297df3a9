"""The broad-change guard's arithmetic, against the brute-force model of tests/model.py."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model import any_command, reference

from gateway.blacklist.commands import parse_command
from gateway.blacklist.guard import (
    Limits,
    TooBroad,
    check_command,
    check_impact,
    impact,
)
from gateway.blacklist.ranges import fold


def size(spans):
    return sum(last - first + 1 for first, last in spans)


def minus_size(a, b):
    """|a \\ b| by brute force over the elementary intervals the model gives."""
    both = {v: [(max(f1, f2), min(l1, l2)) for f1, l1 in a[v] for f2, l2 in b[v] if max(f1, f2) <= min(l1, l2)]
            for v in (4, 6)}
    return {v: size(a[v]) - size(both[v]) for v in (4, 6)}


@settings(max_examples=200, deadline=None)
@given(st.lists(any_command, max_size=20), st.lists(any_command, max_size=20))
def test_impact_counts_what_the_model_says_changes(history, batch):
    before, after = reference(history), reference(history + batch)
    change = impact(fold(history), batch)
    assert change.blocked == minus_size(after, before)
    assert change.unblocked == minus_size(before, after)
    assert change.blocked_before == {v: size(before[v]) for v in (4, 6)}


@pytest.mark.parametrize("line, count", [
    ("BLACKLIST 0.0.0.0/0", 1 << 32),
    ("BLACKLIST 10.0.0.0/7", 1 << 25),
    ("BLACKLIST 2000::/31", 1 << 97),
    ("BLACKLIST ::/0", 1 << 128),
])
def test_a_blacklist_wider_than_the_limit_is_refused_with_its_size(line, count):
    with pytest.raises(TooBroad) as refused:
        check_command(parse_command(line))
    assert refused.value.addresses == count
    assert str(count) in str(refused.value)


@pytest.mark.parametrize("line", ["BLACKLIST 10.0.0.0/8", "BLACKLIST 2001:db8::/32", "WHITELIST 0.0.0.0/0",
                                  "BLACKLIST 203.0.113.7"])
def test_the_limit_itself_narrower_and_whitelists_pass(line):
    check_command(parse_command(line))


def test_the_limit_is_configurable_per_family():
    check_command(parse_command("BLACKLIST 0.0.0.0/0"), Limits(max_prefix_v4=0))
    with pytest.raises(TooBroad):
        check_command(parse_command("BLACKLIST 10.0.0.0/16"), Limits(max_prefix_v4=24))
    with pytest.raises(TooBroad):
        check_command(parse_command("BLACKLIST 2001:db8::/48"), Limits(max_prefix_v6=64))


def test_an_import_blocking_too_much_of_the_space_is_refused():
    many = [parse_command(f"BLACKLIST {n}.0.0.0/8") for n in range(1, 4)]  # 3 /8s: 1.17 % of IPv4
    with pytest.raises(TooBroad) as refused:
        check_impact(impact(fold([]), many))
    assert refused.value.addresses == 3 << 24
    check_impact(impact(fold([]), many[:2]))  # 0.78 %: under 1 %
    check_impact(impact(fold(many[:2]), many))  # only one /8 is new


def test_an_import_unblocking_too_much_of_what_is_blocked_is_refused():
    held = [parse_command("BLACKLIST 10.0.0.0/16")]
    whitelist = [parse_command("WHITELIST 10.0.0.0/20")]  # 4096 of 65536: 6.25 %
    check_impact(impact(fold(held), whitelist))
    wider = [parse_command("WHITELIST 10.0.0.0/19")]  # 12.5 %
    with pytest.raises(TooBroad) as refused:
        check_impact(impact(fold(held), wider))
    assert refused.value.addresses == 8192
    assert "8192 of the 65536" in str(refused.value)
    check_impact(impact(fold(held), wider), Limits(max_unblock_share=0.2))
