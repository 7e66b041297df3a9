"""The lookup index: family isolation, IPv4-mapped clients, owner counts, bulk build."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model import any_command, inside, mapped, reference

from gateway.blacklist.addresses import LAST, format_address
from gateway.blacklist.commands import parse_command
from gateway.blacklist.index import Index
from gateway.blacklist.ranges import RangeSet, fold


def index_of(*lines: str) -> Index:
    return Index.build(fold(parse_command(line) for line in lines).ranges())


def test_blocks_inside_and_not_outside_a_range():
    index = index_of("BLACKLIST 10.0.0.0/24", "WHITELIST 10.0.0.100/32")
    assert index.blocks("10.0.0.0") and index.blocks("10.0.0.99") and index.blocks("10.0.0.255")
    assert not index.blocks("10.0.0.100")
    assert not index.blocks("10.0.1.0") and not index.blocks("9.255.255.255")


def test_ipv6_ranges():
    index = index_of("BLACKLIST 2001:db8::/32")
    assert index.blocks("2001:db8::1") and index.blocks("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
    assert not index.blocks("2001:db9::")


@pytest.mark.parametrize(
    ("blacklisted", "client"),
    [
        ("0.0.0.0/0", "::1"),  # every IPv4 address, yet no IPv6 one
        ("10.0.0.0/8", "a00::1"),  # the same leading bits as 10/8 in a 128-bit address
        ("::/0", "10.0.0.1"),  # every IPv6 address, yet no IPv4 one
        ("a00::/8", "10.0.0.1"),
    ],
)
def test_families_never_match_each_other(blacklisted, client):
    assert not index_of(f"BLACKLIST {blacklisted}").blocks(client)


def test_ipv4_mapped_clients_are_looked_up_as_ipv4():
    index = index_of("BLACKLIST 10.0.0.0/24")
    assert index.blocks("::ffff:10.0.0.5")
    assert not index.blocks("::ffff:10.0.1.5")
    assert not index_of("BLACKLIST ::/1").blocks("::ffff:10.0.0.5")


def test_a_prefix_shared_by_two_overlapping_ranges_stays_until_both_are_gone():
    index = Index()
    index.add(4, 0x0A000000, 0x0A0000FF)
    index.add(4, 0x0A000000, 0x0A0001FF)  # overlaps: shares 10.0.0.0/24
    index.remove(4, 0x0A000000, 0x0A0001FF)
    assert index.blocks("10.0.0.7")
    index.remove(4, 0x0A000000, 0x0A0000FF)
    assert not index.blocks("10.0.0.7")
    assert index == Index()


def test_update_applies_one_stored_view_record():
    view, index = RangeSet(), Index()
    index.update(view.store("10.0.0.0", "10.0.0.255"))
    assert index.blocks("10.0.0.200")
    index.update(view.store("10.0.0.0", "10.0.0.99"))
    assert index.blocks("10.0.0.99") and not index.blocks("10.0.0.200")
    index.update(view.store("10.0.0.0", None))
    assert not index.blocks("10.0.0.5")


def test_bulk_build_counts_owners_of_overlapping_input():
    overlapping = [(4, 0x0A000000, 0x0A0000FF), (4, 0x0A000000, 0x0A0001FF), (4, 0x0A000080, 0x0A000080)]
    index = Index.build(overlapping)
    for _, start, end in overlapping:
        index.remove(4, start, end)
    assert index == Index()


@settings(max_examples=200)
@given(st.lists(any_command, max_size=30))
def test_the_index_answers_like_the_reference_model(commands):
    """At every command's edges, wide or narrow, either family: blocked exactly where the brute-force fold says."""
    index = Index.build(fold(commands).ranges())
    blocked = reference(commands)
    edges = {(c.version, a) for c in commands for a in (c.first - 1, c.first, c.last, c.last + 1)}
    for version, address in edges:
        if 0 <= address <= LAST[version] and not mapped(version, address):
            ip = format_address(version, address)
            assert index.blocks(ip) == inside(blocked[version], address), ip
