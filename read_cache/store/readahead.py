"""How many reads a streaming window keeps in flight: what keeps an epoch from s3:// off the latency floor.

An object store answers each request after ~10-100 ms however small it is, but serves many requests at
once with high aggregate bandwidth; a local disk answers in microseconds. So a training epoch from a
bucket reads a window's arrays, block by block, on `default_inflight` threads (training.windows; each
array read is in turn fetched chunk-parallel by zarr); every read lands at its own place in the window's
buffer, so batches do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from read_cache.store import Split

LOCAL_INFLIGHT = 1
"""A local disk gains nothing from more (the reads are decode-bound), and the cores are the trainer's."""
REMOTE_INFLIGHT_BYTES = 128 << 20
"""Raw bytes of block reads in flight from an object store: each block's chunks are fetched in parallel
as well, so 4 blocks of ~32 MB keep ~40 requests under way, which hides ~100 ms of latency at ~1 GB/s."""


def default_inflight(split: Split, block_bytes: int) -> int:
    """Block reads kept in flight: 1 from a disk; from an object store, REMOTE_INFLIGHT_BYTES' worth (at least 2)."""
    return LOCAL_INFLIGHT if split.cache.location.is_local else max(2, REMOTE_INFLIGHT_BYTES // max(block_bytes, 1))

