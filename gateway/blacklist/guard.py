"""The broad-change guard: how many addresses an edit would change, and whether that is too many.

`ctl blacklist 0.0.0.0/0` is a valid command and would refuse every request. The doors that
publish commands (`gateway ctl`, POST /admin/commands) ask this module first and refuse such an
edit unless the operator says `--force` / `"force": true`. The materializer never asks: the log
is the truth, and a command that is in it is folded, forced or not. Pure arithmetic, no I/O, so
both doors refuse alike and the tests can check the numbers against a brute-force model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .addresses import BITS
from .commands import BLACKLIST, Command
from .ranges import RangeSet

DEFAULT_MAX_PREFIX = {4: 8, 6: 32}
DEFAULT_MAX_BLOCK_SHARE = 0.01  # of a family's address space: 1 % of IPv4 is ~43M addresses (a /8 is 0.39 %)
DEFAULT_MAX_UNBLOCK_SHARE = 0.10  # of what the family has blocked now


@dataclass(frozen=True, slots=True)
class Limits:
    """What the doors accept without --force."""

    max_prefix_v4: int = DEFAULT_MAX_PREFIX[4]
    max_prefix_v6: int = DEFAULT_MAX_PREFIX[6]
    max_block_share: float = DEFAULT_MAX_BLOCK_SHARE
    max_unblock_share: float = DEFAULT_MAX_UNBLOCK_SHARE

    def max_prefix(self, version: int) -> int:
        return self.max_prefix_v4 if version == 4 else self.max_prefix_v6


class TooBroad(ValueError):
    """An edit the guard refuses; the message says how many addresses it would change, and how to force it."""

    def __init__(self, message: str, addresses: int) -> None:
        super().__init__(message)
        self.addresses = addresses


def check_command(command: Command, limits: Limits = Limits()) -> None:
    """Refuse a BLACKLIST whose prefix is shorter (wider) than the family's --max-prefix."""
    if command.action != BLACKLIST:
        return
    version, length = command.version, command.network.prefixlen
    limit = limits.max_prefix(version)
    if length < limit:
        count = 1 << (BITS[version] - length)
        raise TooBroad(f"refused: {command} would block {count} addresses, wider than the /{limit} allowed for"
                       f" IPv{version} (--max-prefix); force it if you mean it", count)


@dataclass(frozen=True, slots=True)
class Impact:
    """What a batch of commands would change, per family: addresses newly blocked and newly unblocked."""

    blocked: dict[int, int]
    unblocked: dict[int, int]
    blocked_before: dict[int, int]


def impact(current: RangeSet, commands: Iterable[Command]) -> Impact:
    """Fold `commands` over a copy of `current` and count, per family, the addresses whose state changes.

    A batch of BLACKLIST only (most imported lists) is the union of its networks: sorted and merged
    instead of folded, so a million-line list costs a sort, not a million folds."""
    commands = list(commands)
    before_spans = _spans(current)
    if all(command.action == BLACKLIST for command in commands):
        added = _merge(sorted((c.version, c.first, c.last) for c in commands))
        after_spans = {v: _merge_pairs(sorted(before_spans[v] + added[v])) for v in (4, 6)}
    else:
        after = RangeSet.from_spans(current.ranges())
        for command in commands:
            after.apply(command)
        after_spans = _spans(after)
    blocked = {v: _size(_minus(after_spans[v], before_spans[v])) for v in (4, 6)}
    unblocked = {v: _size(_minus(before_spans[v], after_spans[v])) for v in (4, 6)}
    return Impact(blocked, unblocked, {v: _size(before_spans[v]) for v in (4, 6)})


def check_impact(change: Impact, limits: Limits = Limits()) -> None:
    """Refuse a batch that blocks more than max_block_share of a family's address space, or unblocks
    more than max_unblock_share of what that family has blocked now."""
    for version in (4, 6):
        space = 1 << BITS[version]
        added, removed, held = change.blocked[version], change.unblocked[version], change.blocked_before[version]
        if added > limits.max_block_share * space:
            raise TooBroad(f"refused: this would block {added} more IPv{version} addresses"
                           f" ({added / space:.4%} of the address space; the limit is {limits.max_block_share:.4%},"
                           " --max-block-share); force it if you mean it", added)
        if removed and removed > limits.max_unblock_share * held:
            raise TooBroad(f"refused: this would unblock {removed} of the {held} IPv{version} addresses blocked now"
                           f" ({removed / held:.2%}; the limit is {limits.max_unblock_share:.2%},"
                           " --max-unblock-share); force it if you mean it", removed)


Spans = dict[int, list[tuple[int, int]]]


def _spans(ranges: RangeSet) -> Spans:
    """Disjoint, sorted (first, last) pairs per family (a stored view may overlap for a moment)."""
    return _merge(list(ranges.ranges()))


def _merge(items: list[tuple[int, int, int]]) -> Spans:
    out: Spans = {4: [], 6: []}
    for version, start, end in items:
        spans = out[version]
        if spans and start <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return out


def _merge_pairs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in pairs:
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _minus(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The addresses of `a` not in `b`; both sorted and disjoint. Linear merge."""
    out: list[tuple[int, int]] = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] < start:
            j += 1
        k = j
        while start <= end:
            if k >= len(b) or b[k][0] > end:
                out.append((start, end))
                break
            if b[k][0] > start:
                out.append((start, b[k][0] - 1))
            start = max(start, b[k][1] + 1)
            k += 1
    return out


def _size(spans: list[tuple[int, int]]) -> int:
    return sum(end - start + 1 for start, end in spans)
