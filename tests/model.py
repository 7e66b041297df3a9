"""A brute-force model of the blacklist, and hypothesis strategies for commands, for the property tests."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from gateway.blacklist.addresses import format_address
from gateway.blacklist.commands import BLACKLIST, WHITELIST, Command
from gateway.blacklist.ranges import RangeSet


def reference(commands: list[Command]) -> dict[int, set[int]]:
    """The blocked addresses, per family, by set algebra over every address."""
    blocked: dict[int, set[int]] = {4: set(), 6: set()}
    for command in commands:
        span = set(range(command.first, command.last + 1))
        if command.action == BLACKLIST:
            blocked[command.version] |= span
        else:
            blocked[command.version] -= span
    return blocked


def addresses(ranges: RangeSet) -> dict[int, set[int]]:
    blocked: dict[int, set[int]] = {4: set(), 6: set()}
    for version, start, end in ranges.ranges():
        blocked[version] |= set(range(start, end + 1))
    return blocked


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
