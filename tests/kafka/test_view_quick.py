"""The quick address check of the bootstrap path (`view._quick`) against the rule it shortcuts (`canonical`)."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from gateway.blacklist.addresses import format_address
from gateway.kafka import view
from gateway.kafka.view import _quick, canonical

GROUP = st.one_of(st.just(0), st.sampled_from([1, 0xA, 0xBC, 0xDEF, 0xFFFF]), st.integers(0, 0xFFFF))
V6 = st.lists(GROUP, min_size=8, max_size=8).map(lambda groups: int.from_bytes(
    b"".join(g.to_bytes(2, "big") for g in groups), "big"))


def spellings(version: int, value: int) -> list[str]:
    """The canonical text of an address and other texts of it a writer might send."""
    text = format_address(version, value)
    if version == 4:
        return [text, "0" + text, text + " ", text.replace(".", "..", 1)]
    packed = value.to_bytes(16, "big")
    full = ":".join(f"{g:x}" for g in (int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)))
    return [text, text.upper(), full, full.replace(":", ":0", 1), socket.inet_ntop(socket.AF_INET6, packed),
            text + "%eth0", "::ffff:" + format_address(4, value & 0xFFFFFFFF)]


def agrees(text: str) -> None:
    try:
        expected = canonical(text)
    except ValueError:
        assert _quick(text) is None, text
        return
    assert _quick(text) in (None, expected), text


@given(st.integers(0, (1 << 32) - 1))
def test_ipv4_common_case_is_quick_and_agrees(value: int) -> None:
    assert _quick(format_address(4, value)) == (4, value)  # the common case never leaves the fast path
    for text in spellings(4, value):
        agrees(text)


@given(V6)
def test_ipv6_agrees_with_canonical(value: int) -> None:
    if view._NTOP_CANONICAL and value >> 48:
        assert _quick(format_address(6, value)) == (6, value)
    for text in spellings(6, value):
        agrees(text)


@given(st.text(alphabet="0123456789abcdefABCDEF:.% ", max_size=45))
def test_any_text_agrees(text: str) -> None:
    agrees(text)


def test_this_platform_trusts_inet_ntop() -> None:
    """On glibc inet_ntop writes IPv6 as ipaddress does; a platform where it does not loses the
    fast path (every text then takes `canonical`), which this test reports."""
    assert view._ntop_is_canonical()
