"""The command language: what parses, how it prints, and the errors people see."""

import ipaddress

import pytest

from gateway.blacklist.commands import (
    BLACKLIST,
    WHITELIST,
    Command,
    CommandError,
    parse_command,
    parse_network,
)


@pytest.mark.parametrize(
    ("raw", "action", "network"),
    [
        ("BLACKLIST 10.0.0.0/24", BLACKLIST, "10.0.0.0/24"),
        (b"WHITELIST 10.0.0.100/32", WHITELIST, "10.0.0.100/32"),
        ("BLACKLIST 10.0.0.7", BLACKLIST, "10.0.0.7/32"),
        ("BLACKLIST 2001:db8::/32", BLACKLIST, "2001:db8::/32"),
        ("WHITELIST 2001:db8::1", WHITELIST, "2001:db8::1/128"),
        ("  blacklist   192.0.2.0/24 \n", BLACKLIST, "192.0.2.0/24"),
        ("BLACKLIST 0.0.0.0/0", BLACKLIST, "0.0.0.0/0"),
        ("BLACKLIST ::/0", BLACKLIST, "::/0"),
    ],
)
def test_parses_both_verbs_and_families(raw, action, network):
    command = parse_command(raw)
    assert command == Command(action, ipaddress.ip_network(network))


def test_prints_the_wire_form_that_parses_back():
    command = parse_command("blacklist 2001:DB8:0:0::/64")
    assert str(command) == "BLACKLIST 2001:db8::/64"
    assert command.encode() == b"BLACKLIST 2001:db8::/64"
    assert parse_command(command.encode()) == command


def test_exposes_the_range_it_covers():
    command = parse_command("BLACKLIST 10.0.0.0/24")
    assert (command.version, command.first, command.last) == (4, 0x0A000000, 0x0A0000FF)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty command"),
        ("   ", "empty command"),
        ("BLOCK 10.0.0.0/24", "unknown verb 'BLOCK'"),
        ("BLACKLIST", "exactly one CIDR, got 0"),
        ("BLACKLIST 10.0.0.0/24 10.1.0.0/24", "exactly one CIDR, got 2"),
        ("BLACKLIST 10.0.0.5/24", "host bits set (did you mean 10.0.0.0/24?)"),
        ("BLACKLIST 2001:db8::1/32", "host bits set (did you mean 2001:db8::/32?)"),
        ("BLACKLIST 10.0.0.0/33", "prefix length must be a number from 0 to 32"),
        ("BLACKLIST 2001:db8::/129", "prefix length must be a number from 0 to 128"),
        ("BLACKLIST 10.0.0.0/-1", "prefix length must be a number"),
        ("BLACKLIST 10.0.0.0/", "prefix length must be a number"),
        ("BLACKLIST 10.0.0.0/255.255.255.0", "prefix length must be a number"),
        ("BLACKLIST 10.0.0.0/٢٤", "prefix length must be a number"),
        ("BLACKLIST 10.0.0.256", "is not an IPv4 or IPv6 address"),
        ("BLACKLIST banana", "'banana' is not an IPv4 or IPv6 address"),
        ("BLACKLIST fe80::1%eth0", "scoped addresses"),
        ("BLACKLIST ::ffff:10.0.0.0/120", "write it as IPv4"),
        (b"BLACKLIST \xff10.0.0.0/8", "not UTF-8 text (bad byte at 10)"),
        ("BLACKLIST " + "1" * 500, "command too long: 510 bytes"),
    ],
)
def test_rejects_bad_input_naming_the_problem(raw, message):
    with pytest.raises(CommandError) as caught:
        parse_command(raw)
    assert message in str(caught.value)


def test_a_bare_address_is_a_host_route():
    assert parse_network("10.1.2.3") == ipaddress.ip_network("10.1.2.3/32")
    assert parse_network("2001:db8::5") == ipaddress.ip_network("2001:db8::5/128")


def test_ipv4_mapped_addresses_outside_the_mapped_block_are_fine():
    # ::/0 covers the mapped block too; only ranges inside it are refused.
    assert parse_network("::/0").prefixlen == 0


@pytest.mark.parametrize("text", ["10.0.0.0/24", "1.2.3.4", "1.2.3.4/32", "0.0.0.0/0", "010.0.0.0/8", "10.0.0.5/24",
                                  "10.0.0.0/33", "10.0.0.0/ 8", "10.0.0.0/+8", "1.2.3", "2001:db8::/32"])
def test_the_ipv4_fast_path_agrees_with_ipaddress(text):
    """Canonical IPv4 skips ipaddress's parser; anything else must still get the same answer or error."""
    try:
        expected = ipaddress.ip_network(text)
    except ValueError:
        with pytest.raises(CommandError):
            parse_network(text)
    else:
        assert parse_network(text) == expected
