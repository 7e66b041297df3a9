"""Client address resolution: the peer, or X-Forwarded-For only as far as trusted proxies vouch."""

from __future__ import annotations

import pytest

from gateway.http.clientip import ClientIP, canonical


def test_without_trusted_proxies_the_peer_is_the_client_whatever_xff_says():
    resolver = ClientIP()
    assert resolver.resolve("203.0.113.7", "10.0.0.1") == "203.0.113.7"
    assert resolver.resolve("2001:db8::7", "10.0.0.1") == "2001:db8::7"


def test_ipv4_mapped_peer_counts_as_ipv4():
    assert ClientIP().resolve("::ffff:203.0.113.7") == "203.0.113.7"
    assert ClientIP(["203.0.113.0/24"]).resolve("::ffff:203.0.113.7", "198.51.100.1") == "198.51.100.1"


def test_xff_from_an_untrusted_peer_is_ignored():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("198.51.100.9", "10.0.0.1") == "198.51.100.9"
    assert resolver.resolve("198.51.100.9", "192.0.2.1") == "198.51.100.9"


def test_trusted_peer_walks_right_to_left_past_trusted_proxies():
    resolver = ClientIP(["10.0.0.0/8", "fd00::/8"])
    # The client spoofed 1.1.1.1; the first proxy appended the real client 192.0.2.5.
    assert resolver.resolve("10.0.0.2", "1.1.1.1, 192.0.2.5, 10.0.0.1") == "192.0.2.5"
    assert resolver.resolve("fd00::2", "1.1.1.1, 2001:db8::5, fd00::1") == "2001:db8::5"


def test_the_leftmost_entry_is_never_taken_over_an_untrusted_one_to_its_right():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("10.0.0.2", "192.0.2.66, 192.0.2.5") == "192.0.2.5"


def test_only_trusted_hops_means_the_leftmost_written_by_a_trusted_hop():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("10.0.0.3", "10.0.0.1, 10.0.0.2") == "10.0.0.1"


def test_garbage_entry_stops_the_walk_at_the_trusted_hop_right_of_it():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("10.0.0.3", "192.0.2.1, unknown, 10.0.0.2") == "10.0.0.2"
    assert resolver.resolve("10.0.0.3", "not-an-ip") == "10.0.0.3"


def test_mapped_and_port_forms_in_xff_are_canonicalized():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("10.0.0.3", "::FFFF:192.0.2.9") == "192.0.2.9"
    assert resolver.resolve("10.0.0.3", "192.0.2.9:4711") == "192.0.2.9"
    assert resolver.resolve("10.0.0.3", "[2001:DB8::9]:443") == "2001:db8::9"


def test_xff_absent_or_empty_from_a_trusted_peer_gives_the_peer():
    resolver = ClientIP(["10.0.0.0/8"])
    assert resolver.resolve("10.0.0.3", None) == "10.0.0.3"
    assert resolver.resolve("10.0.0.3", "") == "10.0.0.3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("192.0.2.1", "192.0.2.1"), (" 2001:DB8:0::1 ", "2001:db8::1"), ("::ffff:1.2.3.4", "1.2.3.4"),
     ("[::1]", "::1"), ("1.2.3", None), ("", None), ("[::1", None)],
)
def test_canonical(text, expected):
    assert canonical(text) == expected
