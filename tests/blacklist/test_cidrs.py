"""Range -> CIDR decomposition: exact cover with the fewest prefixes."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.blacklist.cidrs import range_to_cidrs


def test_an_aligned_block_is_one_prefix():
    assert list(range_to_cidrs(0x0A000000, 0x0A0000FF, 32)) == [(0x0A000000, 24)]


def test_the_whole_space_is_the_zero_prefix():
    assert list(range_to_cidrs(0, 2**32 - 1, 32)) == [(0, 0)]
    assert list(range_to_cidrs(0, 2**128 - 1, 128)) == [(0, 0)]


def test_the_seed_example_splits_like_ipaddress_does():
    got = [f"{ipaddress.IPv4Address(n)}/{p}" for n, p in range_to_cidrs(0x0A000065, 0x0A0000FF, 32)]
    want = [str(n) for n in ipaddress.summarize_address_range(
        ipaddress.IPv4Address("10.0.0.101"), ipaddress.IPv4Address("10.0.0.255"))]
    assert got == want == ["10.0.0.101/32", "10.0.0.102/31", "10.0.0.104/29", "10.0.0.112/28", "10.0.0.128/25"]


@pytest.mark.parametrize(("start", "end"), [(5, 4), (-1, 3), (0, 2**32)])
def test_rejects_what_is_not_a_range(start, end):
    with pytest.raises(ValueError):
        list(range_to_cidrs(start, end, 32))


@given(st.data(), st.sampled_from([(4, 32), (6, 128)]))
def test_matches_the_minimal_cover_of_ipaddress(data, family):
    version, bits = family
    start = data.draw(st.integers(0, 2**bits - 1))
    end = data.draw(st.integers(start, min(2**bits - 1, start + data.draw(st.sampled_from([10, 2**20, 2**bits])))))
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    want = [(int(n.network_address), n.prefixlen) for n in ipaddress.summarize_address_range(make(start), make(end))]
    assert list(range_to_cidrs(start, end, bits)) == want
