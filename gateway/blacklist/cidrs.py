"""Ranges of addresses as the fewest CIDR prefixes that cover exactly them."""

from __future__ import annotations

from collections.abc import Iterator


def range_to_cidrs(start: int, end: int, bits: int) -> Iterator[tuple[int, int]]:
    """Yield (network, prefix length) pairs, in address order, covering [start, end]."""
    if not 0 <= start <= end < 1 << bits:
        raise ValueError(f"not a range of {bits}-bit addresses: {start}..{end}")
    while start <= end:
        # The largest block aligned at `start` (a zero start aligns to anything) ...
        align = (start & -start).bit_length() - 1 if start else bits
        # ... that does not run past `end`.
        fit = (end - start + 1).bit_length() - 1
        size = min(align, fit)
        yield start, bits - size
        start += 1 << size
