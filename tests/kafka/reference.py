"""An independent reading of the view topic and of the command log, for exact comparisons.

Written apart from gateway/kafka/view.py (plain `ipaddress` and dicts) so a test compares the
code under test with a second reading of the rules of docs/ARCHITECTURE.md, not with itself.
"""

from __future__ import annotations

import ipaddress
import json
import random

from gateway.blacklist.ranges import RangeSet


def view_of(records) -> RangeSet:
    """The view topic's records read by the reader rules: claims fence older writers, only
    canonical address text counts, the last valid record of each key wins."""
    claim = None
    latest: dict[tuple[int, int], int | None] = {}
    for record in records:
        if record.key == b"__writer__":
            try:
                body = json.loads(record.value)
                if isinstance(body.get("log_id"), str) and body["log_id"]:
                    claim = record.offset
            except (ValueError, TypeError, AttributeError):
                pass
            continue
        if claim is not None and dict(record.headers).get("writer") != str(claim).encode():
            continue  # stale: written by a writer that had lost the role
        try:
            text = record.key.decode()
            first = ipaddress.ip_address(text)
            if str(first) != text:
                continue
            if record.value is None:
                latest[(first.version, int(first))] = None
                continue
            last = ipaddress.ip_address(record.value.decode())
            if str(last) != record.value.decode() or last.version != first.version or last < first:
                continue
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue
        latest[(first.version, int(first))] = int(last)
    return RangeSet.from_spans((v, s, e) for (v, s), e in latest.items() if e is not None)


def blocked(commands) -> dict[int, set[int]]:
    """Brute force: the addresses each family's commands leave blocked, in log order."""
    result: dict[int, set[int]] = {4: set(), 6: set()}
    for text in commands:
        try:
            action, cidr = text.split()
            network = ipaddress.ip_network(cidr, strict=True)
        except (ValueError, AttributeError):
            continue
        if action not in ("BLACKLIST", "WHITELIST"):
            continue
        span = set(range(int(network.network_address), int(network.broadcast_address) + 1))
        if action == "BLACKLIST":
            result[network.version] |= span
        else:
            result[network.version] -= span
    return result


def addresses_of(ranges: RangeSet) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {4: set(), 6: set()}
    for version, start, end in ranges.ranges():
        result[version] |= set(range(start, end + 1))
    return result


def canonical(ranges: RangeSet) -> bool:
    """Disjoint and never adjacent: one set of addresses has exactly one set of records."""
    previous = None
    for version, start, end in ranges.ranges():
        if previous is not None and previous[0] == version and start <= previous[1] + 1:
            return False
        previous = (version, end)
    return True


def random_commands(n: int, seed: int, *, v4_bits: int = 16, v4_lengths=(20, 32), v6_bits: int = 16,
                    v6_lengths=(116, 128)) -> list[str]:
    """Commands that overlap a lot: prefixes in 10.0.0.0/(32 - v4_bits) (90 %) or 2001:db8::/(128 - v6_bits),
    70 % BLACKLIST, as text."""
    rng = random.Random(seed)
    commands = []
    for _ in range(n):
        action = "BLACKLIST" if rng.random() < 0.7 else "WHITELIST"
        if rng.random() < 0.9:
            length = rng.randint(*v4_lengths)
            host = (0x0A000000 | rng.getrandbits(v4_bits)) >> (32 - length) << (32 - length)
            commands.append(f"{action} {ipaddress.IPv4Address(host)}/{length}")
        else:
            length = rng.randint(*v6_lengths)
            host = (0x20010DB8 << 96 | rng.getrandbits(v6_bits)) >> (128 - length) << (128 - length)
            commands.append(f"{action} {ipaddress.IPv6Address(host)}/{length}")
    return commands
