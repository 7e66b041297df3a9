"""IP addresses as (version, integer) pairs: the form every range computation uses."""

from __future__ import annotations

import ipaddress
import socket

BITS = {4: 32, 6: 128}
LAST = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


def parse_address(text: str) -> tuple[int, int]:
    """Parse an IPv4 or IPv6 address; raise ValueError naming the text if it is neither."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError):
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, TypeError):
        raise ValueError(f"not an IP address: {text!r}") from None


def format_address(version: int, value: int) -> str:
    """The canonical text of an address (`ipaddress` str form), as view keys use it."""
    if version == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    return str(ipaddress.IPv6Address(value))


def packed(version: int, value: int) -> bytes:
    """The network-order bytes of an address."""
    return value.to_bytes(BITS[version] // 8, "big")
