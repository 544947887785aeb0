"""Who does what: each rank's share of build units, sweep configurations and training blocks.

Every function is pure arithmetic on (items, rank, world_size), so every rank computes every rank's
share the same way without talking, and one process (world_size 1) gets everything in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def round_robin(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items rank, rank+W, rank+2W, ...: similar-sized work spread evenly, neighbours on different ranks."""
    return list(items[rank::world_size])


def balanced(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Positions of `sizes` dealt in order, each to the rank with the least so far (ties: the lower rank).

    Used for training blocks, whose example counts differ: shares then differ by less than one block.
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for position, size in enumerate(sizes):
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        shares[rank].append(position)
        totals[rank] += size
    return shares
