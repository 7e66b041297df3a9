"""The command log held in columns, for "who blocked this and why" and "what changed".

Every command is one CIDR, so the commands that cover an address are exactly those whose network
is one of the address's at most 33 (IPv4) or 129 (IPv6) enclosing prefixes. A Patricia trie per
family maps each network ever commanded to the positions of its commands: explaining an address
is a longest-prefix match and a walk up its parents, microseconds at a million commands, and the
last position found is the deciding command (the fold's last word on that address). Filtering the
log by address is the same walk. The admin process (the supervisor) fills it from the commands
topic once and then only with what was appended (commandlog.CommandIndex), so no request ever
rescans the topic.

The columns are compact (arrays of integers, interned actors and reasons) because a log is kept
forever: about 150 bytes per command with its request id.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytricia

from ..blacklist.commands import BLACKLIST, WHITELIST, CommandError, parse_command

POISON, BLOCK, ALLOW = 0, 1, 2
_VERB = {BLACKLIST: BLOCK, WHITELIST: ALLOW}


@dataclass(frozen=True, slots=True)
class Row:
    """One command record as the log holds it (poison records too: `valid` False)."""

    offset: int
    command: str
    timestamp_ms: int
    key: str | None
    request_id: str | None
    actor: str | None
    reason: str | None
    valid: bool


class CommandTable:
    """Command records by position, their networks in tries, their actors in lists of positions."""

    def __init__(self) -> None:
        self.offsets = array("q")
        self.times = array("q")
        self.verbs = bytearray()
        self.commands: list[str] = []
        self.keys: list[str | None] = []
        self.request_ids: list[str | None] = []
        self._actor_of = array("i")
        self._reason_of = array("i")
        self.actors: dict[str, array] = {}  # actor -> positions, ascending
        self._actor_names: list[str] = []
        self._actor_id: dict[str, int] = {}
        self._reason_id: dict[str, int] = {}
        self._reasons: list[str] = []
        self._tries = {4: pytricia.PyTricia(32), 6: pytricia.PyTricia(128)}

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, value: str, timestamp_ms: int, key: str | None, request_id: str | None,
            actor: str | None, reason: str | None) -> None:
        """Append the record at `offset` (offsets only grow: the caller reads the partition in order)."""
        if self.offsets and offset <= self.offsets[-1]:
            return
        position = len(self.offsets)
        try:
            command = parse_command(value)
        except CommandError:
            verb, text = POISON, value
        else:
            # The text as the log holds it (our publishers write the canonical form); the network's
            # packed bytes as the trie key: formatting an ipaddress is the costliest step of a catch-up.
            verb, text = _VERB[command.action], value
            trie = self._tries[command.version]
            network = command.network
            packed, length = network.network_address.packed, network.prefixlen
            if not trie.has_key((packed, length)):
                trie.insert(packed, length, position)
            else:
                held = trie.get((packed, length))
                if isinstance(held, list):
                    held.append(position)
                else:
                    trie.insert(packed, length, [held, position])
        self.offsets.append(offset)
        self.times.append(timestamp_ms)
        self.verbs.append(verb)
        self.commands.append(text)
        self.keys.append(key)
        self.request_ids.append(request_id)
        self._actor_of.append(self._actor(actor, position))
        self._reason_of.append(self._reason(reason))

    def _actor(self, actor: str | None, position: int) -> int:
        if actor is None:
            return -1
        positions = self.actors.get(actor)
        if positions is None:
            positions = self.actors[actor] = array("q")
            self._actor_id[actor] = len(self._actor_names)
            self._actor_names.append(actor)
        positions.append(position)
        return self._actor_id[actor]

    def _reason(self, reason: str | None) -> int:
        if reason is None:
            return -1
        at = self._reason_id.get(reason)
        if at is None:
            at = self._reason_id[reason] = len(self._reasons)
            self._reasons.append(reason)
        return at

    def row(self, position: int) -> Row:
        actor, reason = self._actor_of[position], self._reason_of[position]
        return Row(self.offsets[position], self.commands[position], self.times[position], self.keys[position],
                   self.request_ids[position], self._actor_names[actor] if actor >= 0 else None,
                   self._reasons[reason] if reason >= 0 else None, self.verbs[position] != POISON)

    def blocks(self, position: int) -> bool:
        return self.verbs[position] == BLOCK

    # -- queries -----------------------------------------------------------------------

    def covering(self, version: int, address: str) -> list[int]:
        """Positions of every command whose network holds `address` (text of that family), ascending."""
        trie = self._tries[version]
        found: list[int] = []
        prefix = trie.get_key(address)
        while prefix is not None:
            held = trie[prefix]
            if isinstance(held, list):
                found.extend(held)
            else:
                found.append(held)
            prefix = trie.parent(prefix)
        found.sort()
        return found

    def deciding(self, version: int, address: str) -> int | None:
        """Position of the last command covering `address`, or None when none ever did."""
        trie = self._tries[version]
        best = -1
        prefix = trie.get_key(address)
        while prefix is not None:
            held = trie[prefix]
            last = held[-1] if isinstance(held, list) else held
            if last > best:
                best = last
            prefix = trie.parent(prefix)
        return best if best >= 0 else None

    def first_at_or_after(self, *, offset: int | None = None, time_ms: int | None = None) -> int:
        """The first position at or after a command offset, or (timestamps taken in log order) a time."""
        if offset is not None:
            return bisect.bisect_left(self.offsets, offset)
        return bisect.bisect_left(self.times, time_ms if time_ms is not None else 0)

    def newest_first(self, *, since: int = 0, actor: str | None = None,
                     address: tuple[int, str] | None = None) -> Iterator[int]:
        """Positions at or after `since`, newest first, that match every filter given."""
        candidates: Any
        if address is not None:
            candidates = self.covering(*address)
            if actor is not None:
                positions = self.actors.get(actor, ())
                candidates = [p for p in candidates if _holds(positions, p)]
        elif actor is not None:
            candidates = self.actors.get(actor, ())
        else:
            candidates = range(len(self.offsets))
        for position in reversed(candidates):
            if position < since:
                return
            yield position


def _holds(sorted_positions: Any, position: int) -> bool:
    i = bisect.bisect_left(sorted_positions, position)
    return i < len(sorted_positions) and sorted_positions[i] == position
