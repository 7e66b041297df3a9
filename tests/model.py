"""A brute-force model of the blacklist, and hypothesis strategies for commands, for the property tests.

The model never uses the code's RangeSet: it folds commands by set algebra. Over every address
that is only possible in small spaces, so it folds over elementary intervals instead: the
commands' own boundaries cut each family's address line into intervals that every command
covers wholly or not at all, so a set of interval numbers is exact at any width, /0 included.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable

from hypothesis import assume
from hypothesis import strategies as st

from gateway.blacklist.addresses import format_address
from gateway.blacklist.commands import BLACKLIST, WHITELIST, Command
from gateway.blacklist.ranges import RangeSet

Spans = dict[int, list[tuple[int, int]]]  # family -> sorted, disjoint, never touching (first, last) spans


def reference(commands: Iterable[Command]) -> Spans:
    """The blocked addresses per family after the commands in order, as canonical spans."""
    commands = list(commands)
    blocked: Spans = {}
    for version in (4, 6):
        mine = [c for c in commands if c.version == version]
        cuts = sorted({c.first for c in mine} | {c.last + 1 for c in mine})
        pieces: set[int] = set()  # i stands for the addresses cuts[i] .. cuts[i + 1] - 1
        for c in mine:
            span = set(range(cuts.index(c.first), cuts.index(c.last + 1)))
            pieces = pieces | span if c.action == BLACKLIST else pieces - span
        blocked[version] = merged((cuts[i], cuts[i + 1] - 1) for i in sorted(pieces))
    return blocked


def merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def common(a: Spans, b: Spans) -> Spans:
    """The addresses in both (per family)."""
    both: Spans = {}
    for version in (4, 6):
        both[version] = merged((max(f1, f2), min(l1, l2)) for f1, l1 in a[version] for f2, l2 in b[version]
                               if max(f1, f2) <= min(l1, l2))
    return both


def spans(ranges: RangeSet) -> Spans:
    """What a RangeSet holds, in the model's terms (its ranges as stored, not merged)."""
    return {version: [(s, e) for _, s, e in ranges.ranges(version)] for version in (4, 6)}


def inside(spans_: list[tuple[int, int]], address: int) -> bool:
    i = bisect.bisect_right(spans_, (address, float("inf"))) - 1
    return i >= 0 and spans_[i][0] <= address <= spans_[i][1]


def copy_of(ranges: RangeSet) -> RangeSet:
    """A second RangeSet holding the same stored records (as a follower would)."""
    other = RangeSet()
    for version, start, end in ranges.ranges():
        other.store(format_address(version, start), format_address(version, end))
    return other


def _command(version: int, base: int, offset: int, length: int, action: str) -> Command:
    bits = 32 if version == 4 else 128
    host = (base + offset) >> (bits - length) << (bits - length)
    make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return Command(action, make((host, length)))


actions = st.sampled_from([BLACKLIST, WHITELIST])
BITS = {4: 32, 6: 128}

# A 64-address corner of IPv4 (10.0.0.0/26): every command interacts with the others.
tiny_commands = st.builds(
    _command, st.just(4), st.just(0x0A000000), st.integers(0, 63), st.integers(26, 32), actions
)


@st.composite
def scattered_commands(draw: st.DrawFn) -> Command:
    """Small ranges (at most 16 addresses) near one of a few random points of full IPv4/IPv6."""
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    base = draw(st.sampled_from([0, 2**bits - 64, 0x0A000000 << (bits - 32), 0x20010DB8 << (bits - 32)]))
    return _command(version, base, draw(st.integers(0, 63)), draw(st.integers(bits - 4, bits)), draw(actions))


@st.composite
def wide_commands(draw: st.DrawFn) -> Command:
    """Any prefix length, /0 to a host, wide and narrow mixed, near a few points of IPv4 or IPv6.

    The address is one of the points plus an offset of any magnitude, so a /8, a /64 and a /128
    drawn near the same point cover each other, cut each other, or touch.
    """
    version = draw(st.sampled_from([4, 6]))
    bits = BITS[version]
    base = draw(st.sampled_from([0, 2**bits - 1, 0x0A000000 << (bits - 32), 0x20010DB8 << (bits - 32)]))
    magnitude = draw(st.integers(0, bits))
    offset = draw(st.integers(-(2**magnitude) + 1, 2**magnitude - 1))
    address = min(max(base + offset, 0), 2**bits - 1)
    length = draw(st.one_of(st.integers(0, bits), st.integers(bits - 8, bits), st.integers(0, 16)))
    command = _command(version, address, 0, length, draw(actions))
    assume(not (version == 6 and command.network.subnet_of(MAPPED)))  # not a valid command: written as IPv4
    return command


MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def mapped(version: int, address: int) -> bool:
    """An IPv4-mapped IPv6 address: its text is looked up as IPv4 by design, never in the IPv6 trie."""
    return version == 6 and int(MAPPED.network_address) <= address <= int(MAPPED.broadcast_address)


# Every shape at once, so one log holds both families, tiny, scattered, wide and narrow commands.
any_command = st.one_of(tiny_commands, scattered_commands(), wide_commands())
