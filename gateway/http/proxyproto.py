"""PROXY protocol v1 (text) and v2 (binary): the client address an L4 balancer hands over.

An L4 balancer (HAProxy `send-proxy-v2`, AWS NLB, ...) cannot add X-Forwarded-For; it
writes one PROXY header at the start of the TCP connection instead. It is read only
from trusted peers (`--trusted-proxy`); there it is required (a trusted peer that does
not send one would otherwise make every client look like the balancer).
Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import socket

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included
V2_MAX = 16 + 1024  # header plus addresses and a reasonable amount of TLVs


class Invalid(ValueError):
    """Not a PROXY protocol header: the connection is refused."""


def parse(data: bytes) -> tuple[str | None, int] | None:
    """(source address, or None for LOCAL/UNKNOWN; header length), or None if more is needed."""
    if data[:1] == b"P":
        return _v1(data)
    if data[:1] == b"\r":
        return _v2(data)
    raise Invalid("no PROXY protocol header")


def _v1(data: bytes) -> tuple[str | None, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or not b"PROXY "[: len(data)] == data[:6]:
            raise Invalid("bad PROXY v1 header")
        return None
    fields = data[:end].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise Invalid("bad PROXY v1 header")
    if fields[1] == b"UNKNOWN":
        return None, end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise Invalid("bad PROXY v1 header")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    try:
        source = socket.inet_ntop(family, socket.inet_pton(family, fields[2].decode("ascii")))
        socket.inet_pton(family, fields[3].decode("ascii"))
        ports = [int(p) for p in fields[4:]]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Invalid("bad PROXY v1 addresses") from exc
    if not all(0 <= p <= 65535 for p in ports):
        raise Invalid("bad PROXY v1 ports")
    return source, end + 2


def _v2(data: bytes) -> tuple[str | None, int] | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise Invalid("bad PROXY v2 signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise Invalid("bad PROXY v2 signature")
    version_command, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2 or version_command & 0xF > 1 or 16 + length > V2_MAX:
        raise Invalid("bad PROXY v2 header")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0xF == 0:  # LOCAL: the balancer's own connection (health check)
        return None, total
    address_family = family >> 4
    if address_family == 1 and length >= 12:
        return socket.inet_ntop(socket.AF_INET, data[16:20]), total
    if address_family == 2 and length >= 36:
        return socket.inet_ntop(socket.AF_INET6, data[16:32]), total
    if address_family in (0, 3):  # UNSPEC, UNIX: no address to use
        return None, total
    raise Invalid("bad PROXY v2 addresses")
