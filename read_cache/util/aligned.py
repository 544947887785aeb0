"""Buffers that start on a page boundary, for the copies the kernel makes into them.

    buffer = page_aligned(nbytes)       # uint8, uninitialised; buffer.base keeps the larger block alive

On the AMD EPYC machine this was measured on, `preadv` from the page cache (whose pages start on page
boundaries) into a buffer starting 16 bytes past a page ran ~2 GB/s, and into one starting on a page 7-8 GB/s
(docs/benchmarks.md, "Where a buffer starts"): the kernel copies with `rep movsb`, which these cores run
slowly when the destination lies a few bytes past the source modulo a page. glibc's `malloc`, and so numpy,
places every large block 16 bytes past a page, so the reader's read buffers, and the bench's limit, start
on a page instead.
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE


def page_aligned(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` that starts on a page boundary (see the module)."""
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start : start + nbytes]
