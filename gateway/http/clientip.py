"""Which address a request comes from: the peer, or what trusted proxies say it was.

X-Forwarded-For is only believed when the peer itself is a configured trusted proxy,
and then only walked right to left past further trusted proxies: every entry left of
the first untrusted one could have been written by the client, so the leftmost entry
is never trusted. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, from dual-stack
listeners or proxies) count as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_MAPPED = "::ffff:"
_CACHE_LIMIT = 4096


def canonical(text: str) -> str | None:
    """The canonical text of an address (IPv4 for IPv4-mapped), or None if it is none.

    Accepts the forms proxies write in X-Forwarded-For: `a.b.c.d`, `a.b.c.d:port`,
    `v6`, `[v6]` and `[v6]:port`. A zone id (`fe80::1%eth0`) names a local link, not
    another address: it is dropped, so the index (which would raise on it) sees the address.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ClientIP:
    """Resolves the client address of a request from its peer and X-Forwarded-For."""

    __slots__ = ("_networks", "_trusted")

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies]
        self._trusted: dict[str, bool] = {}  # verdict per address seen; few peers in practice

    @property
    def any_trusted(self) -> bool:
        """Whether X-Forwarded-For can matter at all (callers skip collecting it if not)."""
        return bool(self._networks)

    def is_trusted(self, address: str) -> bool:
        """Whether a canonical address lies in a trusted proxy network (memoized)."""
        verdict = self._trusted.get(address)
        if verdict is None:
            ip = ipaddress.ip_address(address)
            verdict = any(ip in network for network in self._networks)
            if len(self._trusted) >= _CACHE_LIMIT:
                self._trusted.clear()
            self._trusted[address] = verdict
        return verdict

    def resolve(self, peer: str, forwarded_for: str | None = None) -> str:
        """The client address: `peer` (canonical socket text) unless it is a trusted proxy.

        From a trusted peer, X-Forwarded-For (all its headers joined with commas, in
        order) is walked from the right; the first entry that is not a trusted proxy is
        the client. If every entry is trusted, the leftmost is the client (all were
        vouched for). An entry that is not an address ends the walk at the trusted hop
        right of it: nothing further left can be believed.
        """
        if peer.startswith(_MAPPED) and "." in peer:
            peer = peer[7:]
        if not self._networks or not forwarded_for or not self.is_trusted(peer):
            return peer
        client = peer
        for entry in reversed(forwarded_for.split(",")):
            address = canonical(entry)
            if address is None:
                return client
            client = address
            if not self.is_trusted(address):
                return address
        return client
