"""Handing freed heap memory back to the OS, so a long epoch's peak RSS stays that of a short one.

The training step allocates activations whose size follows each batch's token count; glibc keeps what
they free in its arenas, fragmented, and a 67,349-example GRU/256 epoch peaked 1.35x higher than a
20,000-example one (docs/benchmarks.md), though the reader's own memory is reused (training.buffers).
`release_free_heap()` is glibc's `malloc_trim(0)`: it returns the free pages of every arena (madvise),
in a few milliseconds; the reader calls it once per streaming window. Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
