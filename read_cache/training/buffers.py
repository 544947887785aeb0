"""Reused memory for the reader's windows and batches: what keeps a streaming epoch's memory flat.

    ring = BufferRing(keep=8, pinned=torch.cuda.is_available())
    views = ring.take({"enc": ((tokens, 7, 384), np.int8), "label": ((96,), np.int64)})
    views["enc"][...] = ...     # a numpy view of a slot's memory; the batch made from it holds the slot

The rule: **a slot is refilled only once nothing outside the ring references its memory.** Every array
`take` hands out is a view of one slot's buffer, and every tensor made from it (`torch.from_numpy`) holds
that view, so while anyone holds a batch (the prefetch queue, an evaluation that collects batches, a
DataLoader, a user's list) its slot is busy, and `take` uses another slot or allocates a new one: it never
waits and never overwrites what a consumer still holds. Idle slots are reused largest-first; at most
`keep` slots stay in the ring, and a busy one pushed out is freed when its last user lets go. On CUDA a
slot is pinned, and `batch_to` records an event after its asynchronous copy to the GPU: the slot counts
as busy until that event has passed, even if the host batch was already dropped.

Without this, each batch and window is a fresh allocation, and the allocator keeps the freed batch-sized
blocks of every thread's arena: peak RSS then grew with the epoch's length (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np

from read_cache.store.formats import to_torch_codes
from read_cache.util.aligned import page_aligned

ALIGN = 64
"""Each view starts on a cache line, so copies into it run at full speed."""

HEADROOM = 1.25
"""A new slot is this much larger than asked: windows and batches vary in size by a few chunks or examples."""
Layout = dict[str, tuple[tuple[int, ...], Any]]
"""name -> (shape, dtype) of the views one `take` carves out of a slot."""


class Slot:
    """One buffer of the ring: its memory, and (on CUDA) the event of the last copy out of it."""

    def __init__(self, nbytes: int, pinned: bool):
        if pinned:
            import torch

            self.memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        else:
            self.memory = page_aligned(nbytes)
        self.event: Any = None
        # Every view carved from `memory` references the ndarray at the root of its view chain (numpy
        # collapses chains to it; a pinned tensor's array is itself that root): while its count is above
        # the slot's own references, someone holds a view.
        self._owner = self.memory.base if isinstance(self.memory.base, np.ndarray) else self.memory
        self._idle_refs = sys.getrefcount(self._owner)

    def idle(self) -> bool:
        if sys.getrefcount(self._owner) > self._idle_refs:
            return False
        return self.event is None or self.event.query()

    def carve(self, layout: Layout) -> dict[str, np.ndarray]:
        return carve(self.memory, layout)


class Views(dict[str, np.ndarray]):
    """The arrays one `take` carved, and the slot they live in (`batch_to` records its copy's event there)."""

    def __init__(self, views: dict[str, np.ndarray], slot: Slot):
        super().__init__(views)
        self.slot = slot


class BufferRing:
    """Slots handed out as views; see the module for when one is reused."""

    def __init__(self, keep: int, pinned: bool = False):
        self.keep = max(1, keep)
        self.pinned = pinned
        self.floor = 0
        """Bytes every new slot holds at least: where the largest need is known ahead (a reader's largest
        window), slots sized to it are never replaced, and a replacement is fresh memory, which this VM
        first touches at ~0.5 GB/s."""
        self._slots: list[Slot] = []
        self._lock = threading.Lock()  # the reader's threads take slots concurrently
        self._largest_need = 0
        self.allocations = 0
        """Slots allocated so far (tests and the bench read it: flat memory means it stops growing)."""

    def take(self, layout: Layout) -> Views:
        """Views of an idle slot (or a new one) shaped as `layout`; they keep the slot busy while referenced."""
        need = layout_bytes(layout)
        with self._lock:
            slot = self._idle_slot(need)
            self._largest_need = max(self._largest_need, need)
            if slot is None:  # the floor, where it covers every need; else room to spare, so the next slightly
                # larger batch fits too, and at least the largest asked so far, so a slot allocated once every
                # size was seen is never replaced
                size = self.floor if self.floor >= need else int(self._largest_need * HEADROOM)
                slot = Slot(max(size, 1), self.pinned)
                self.allocations += 1
                self._slots.append(slot)
                if len(self._slots) > self.keep:
                    self._drop_one(keep=slot)
            slot.event = None
            return Views(slot.carve(layout), slot)

    def _idle_slot(self, need: int) -> Slot | None:
        idle = [s for s in self._slots if s.idle()]
        fitting = [s for s in idle if s.memory.nbytes >= need]
        if fitting:
            return min(fitting, key=lambda s: s.memory.nbytes)
        if idle:  # an idle slot too small for this one: replaced by a new one, so sizes follow the data
            self._slots.remove(max(idle, key=lambda s: s.memory.nbytes))
        return None

    def _drop_one(self, keep: Slot) -> None:
        idle = [s for s in self._slots if s is not keep and s.idle()]
        self._slots.remove(idle[0] if idle else next(s for s in self._slots if s is not keep))


def carve(memory: Any, layout: Layout) -> dict[str, Any]:
    """Views of `memory` (flat uint8: a numpy array, or a tensor on any device) shaped as `layout`, each on a
    cache line, `layout_bytes(layout)` in all; a tensor's views take the dtypes `to_torch_codes` gives."""
    views, at = {}, 0
    for name, (shape, dtype) in layout.items():
        n = _nbytes(shape, dtype)
        part = memory[at : at + n]
        views[name] = (part.view(dtype) if isinstance(part, np.ndarray) else part.view(to_torch_codes(np.empty(0, dtype)).dtype)).reshape(shape)
        at = _aligned(at + n)
    return views


def layout_bytes(layout: Layout) -> int:
    return sum(_aligned(_nbytes(shape, dtype)) for shape, dtype in layout.values())


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize  # per batch and view: numpy's prod costs 20x more


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
