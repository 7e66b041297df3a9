"""PROXY protocol headers as HAProxy and cloud balancers write them (the parser alone)."""

from __future__ import annotations

import pytest

from gateway.http import proxyproto

V2 = proxyproto.V2_SIGNATURE


def test_v1_tcp4_tcp6_and_unknown():
    assert proxyproto.parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 8080\r\nGET") == ("192.0.2.7", 42)
    assert proxyproto.parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n") == ("2001:db8::7", 40)
    assert proxyproto.parse(b"PROXY UNKNOWN\r\n") == (None, 15)


def test_partial_headers_wait_for_more():
    assert proxyproto.parse(b"PROX") is None
    assert proxyproto.parse(b"PROXY TCP4 192.0.2.7") is None
    assert proxyproto.parse(V2[:7]) is None
    assert proxyproto.parse(V2 + b"\x21\x11\x00\x0c" + b"\xc0\x00\x02") is None


def test_v2_proxy_and_local():
    addresses = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + b"\x9c\x40\x1f\x90"
    assert proxyproto.parse(V2 + b"\x21\x11\x00\x0c" + addresses + b"GET") == ("192.0.2.7", 28)
    assert proxyproto.parse(V2 + b"\x20\x00\x00\x00") == (None, 16)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",  # no header at all
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",  # a port missing
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",  # family and address disagree
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 70000\r\n",
    b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
    V2 + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2 + b"\x21\x11\xff\xff",  # longer than any sane header
    b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),
])
def test_anything_else_is_refused(data):
    with pytest.raises(proxyproto.Invalid):
        proxyproto.parse(data)
