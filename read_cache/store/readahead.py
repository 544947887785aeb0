"""Blocks read ahead of the consumer, many at a time: what keeps an epoch from s3:// off the latency floor.

    for block in read_ahead(cache["train"], [(0, 40), (120, 160), ...], inflight=16):
        ...   # blocks arrive in the order asked, while up to 16 further ones are being read

An object store answers each request after ~10-100 ms however small it is, but serves many requests at
once with high aggregate bandwidth; a local disk answers in microseconds. So a training epoch from a
bucket keeps `inflight` block reads going on a thread pool (each block's arrays are in turn fetched
chunk-parallel by zarr), and the blocks come back in the order asked, so batches do not change.
Memory: at most `inflight` blocks (~32 MB each, see reader.BLOCK_BYTES) wait beyond the consumer's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from read_cache.store import Block, Split

LOCAL_INFLIGHT = 1
"""A local disk gains nothing from more (the reads are decode-bound), and the cores are the trainer's."""
REMOTE_INFLIGHT_BYTES = 128 << 20
"""Raw bytes of block reads in flight from an object store: each block's chunks are fetched in parallel
as well, so 4 blocks of ~32 MB keep ~40 requests under way, which hides ~100 ms of latency at ~1 GB/s."""


def default_inflight(split: Split, block_bytes: int) -> int:
    """Block reads kept in flight: 1 from a disk; from an object store, REMOTE_INFLIGHT_BYTES' worth (at least 2)."""
    return LOCAL_INFLIGHT if split.cache.location.is_local else max(2, REMOTE_INFLIGHT_BYTES // max(block_bytes, 1))


def read_ahead(split: Split, ranges: Sequence[tuple[int, int]], inflight: int) -> Iterator[Block]:
    """`split.read_block(*r)` for each r in `ranges`, in order, with up to `inflight` reads under way."""
    if inflight <= 1:
        for start, stop in ranges:
            yield split.read_block(start, stop)
        return
    pool = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="read-cache-block")
    pending: deque[Future[Block]] = deque()
    todo = iter(ranges)
    try:
        for start, stop in todo:
            pending.append(pool.submit(split.read_block, start, stop))
            if len(pending) >= inflight:
                break
        while pending:
            block = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(split.read_block, *nxt))
            yield block
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
