"""A streaming window read into one reused buffer: each block's whole chunks, straight from the chunk files
where the store allows it (store.direct), through zarr elsewhere (compressed arrays, object stores).

    reader = WindowReader(split, ring=BufferRing(keep=3), threads=2)
    pool = reader.read([(0, 400), (1200, 1610)], carry=(last_pool, leftover_positions))

The result is a `Pool` whose arrays are views of one ring slot: the carried examples (less than a batch,
copied from the last window) first, then each block's chunks as they lie, so a block's edge chunks bring
their neighbours' tokens along and `Pool.starts` skips them. Nothing is concatenated or gathered on the
way in: the bytes are read once, into the buffer the batches are cut from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from read_cache.store import Split
from read_cache.store.direct import DirectArray, direct_arrays
from read_cache.training.buffers import BufferRing
from read_cache.training.pools import STORED, TOKEN_ARRAYS, Pool, offsets_of


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Rows of one split array, landed whole-chunk aligned in a buffer (directly, or through zarr)."""

    n_rows: int
    chunk_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    direct: DirectArray | None
    read: Callable[[slice], np.ndarray]

    def span(self, start: int, stop: int) -> int:
        """Buffer rows rows [start, stop) take: their whole chunks."""
        if stop <= start:
            return 0
        c = self.chunk_rows
        return ((stop - 1) // c - start // c + 1) * c

    def read_into(self, start: int, stop: int, out: np.ndarray) -> int:
        """Land the chunks of rows [start, stop) in `out`; returns where row `start` is in it."""
        if stop <= start:
            return 0
        if self.direct is not None:
            return self.direct.read_into(start, stop, out)
        low = start // self.chunk_rows * self.chunk_rows
        high = min(self.n_rows, ((stop - 1) // self.chunk_rows + 1) * self.chunk_rows)
        out[: high - low] = self.read(slice(low, high))
        return start - low


class WindowReader:
    """Reads windows of a split into slots of `ring`, `threads` array reads at a time (see the module)."""

    def __init__(self, split: Split, ring: BufferRing, threads: int):
        self.split = split
        self.ring = ring
        self.threads = max(1, threads)
        self.sources = _sources(split)
        self._executor: ThreadPoolExecutor | None = None

    def read(self, bounds: list[tuple[int, int]], carry: tuple[Pool, np.ndarray] | None = None) -> Pool:
        """Blocks [a, b) of `bounds` (in that order), after the carried examples (`carry`: a pool and positions in it)."""
        offsets = self.split.offsets
        token_spans = [self._span(True, int(offsets[a]), int(offsets[b])) for a, b in bounds]
        example_spans = [self._span(False, a, b) for a, b in bounds]
        carried, positions = carry if carry is not None else (None, np.zeros(0, np.int64))
        carry_tokens = int(carried.lengths[positions].sum()) if carried is not None else 0
        room = {True: carry_tokens + sum(token_spans), False: len(positions) + sum(example_spans)}
        views = self.ring.take({k: ((room[k in TOKEN_ARRAYS], *s.row_shape), s.dtype) for k, s in self.sources.items()})
        if carried is not None:
            carried.copy_into(positions, views)
        jobs, places, at_token, at_example = [], [], carry_tokens, len(positions)
        for (a, b), t_span, e_span in zip(bounds, token_spans, example_spans):
            t0, t1 = int(offsets[a]), int(offsets[b])
            for key, source in self.sources.items():
                token = key in TOKEN_ARRAYS
                at, lo, hi = (at_token, t0, t1) if token else (at_example, a, b)
                jobs.append((key, source, lo, hi, views[key][at : at + (t_span if token else e_span)]))
            places.append((at_token, at_example))
            at_token, at_example = at_token + t_span, at_example + e_span
        firsts = self._run(jobs)
        return self._pool(bounds, carried, positions, views, places, firsts)

    def _pool(
        self, bounds: list[tuple[int, int]], carried: Pool | None, positions: np.ndarray, views: dict[str, np.ndarray],
        places: list[tuple[int, int]], firsts: list[dict[str, int]],
    ) -> Pool:
        """The window's Pool: where each example's tokens and row landed in the buffer (each block's whole
        chunks at `places`, its first row `firsts` into them; the carried examples in front)."""
        offsets = self.split.offsets
        starts, examples, rows = [], [], []
        if carried is not None and len(positions):
            starts.append(offsets_of(carried.lengths[positions])[:-1])
            examples.append(np.arange(len(positions)))
            rows.append(carried.rows[positions])
        for (a, b), (at_token, at_example), first in zip(bounds, places, firsts):
            starts.append(at_token + first.get("token", 0) + offsets[a:b] - int(offsets[a]))
            examples.append(at_example + first.get("example", 0) + np.arange(b - a))
            rows.append(np.arange(a, b, dtype=np.int64))
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        starts_all = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        lengths = np.diff(offsets)[rows_all]
        return Pool(starts_all, lengths, np.concatenate(examples) if examples else starts_all, self.split.labels[rows_all], rows_all, views)

    def _span(self, token: bool, start: int, stop: int) -> int:
        spans = [s.span(start, stop) for k, s in self.sources.items() if (k in TOKEN_ARRAYS) == token]
        return max(spans, default=0)

    def _run(self, jobs: list[tuple[str, RowSource, int, int, np.ndarray]]) -> list[dict[str, int]]:
        """Run the reads (GIL-free: preadv, crc32c, zarr's decoders); per block, where its first row landed."""
        if self.threads > 1 and len(jobs) > 1:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="read-cache-chunks")
            results = list(self._executor.map(lambda j: j[1].read_into(j[2], j[3], j[4]), jobs))
        else:
            results = [source.read_into(lo, hi, out) for _, source, lo, hi, out in jobs]
        per_block = len(self.sources)
        firsts: list[dict[str, int]] = []
        for i in range(0, len(jobs), per_block):
            block = {}
            for (key, *_), first in zip(jobs[i : i + per_block], results[i : i + per_block]):
                block["token" if key in TOKEN_ARRAYS else "example"] = first
            firsts.append(block)
        return firsts


def _sources(split: Split) -> dict[str, RowSource]:
    """A RowSource per stored field; every field of a group (token / example) shares that group's chunk rows,
    so one block lands at the same rows in each (a cache whose arrays disagree is read row-exact via zarr)."""
    names = set(split.array_names())
    fields = {k: STORED[k] for k in STORED if STORED[k] in names}
    direct = direct_arrays(split, tuple(fields.values()))
    sources = {}
    for token in (True, False):
        group = {k: v for k, v in fields.items() if (k in TOKEN_ARRAYS) == token}
        chunk_rows = {int(split.array(v).chunks[0]) for v in group.values()}
        aligned = len(chunk_rows) == 1
        rows = chunk_rows.pop() if aligned else 1
        for key, name in group.items():
            array = split.array(name)
            sources[key] = RowSource(
                int(array.shape[0]), rows, tuple(array.shape[1:]), np.dtype(array.dtype),
                direct.get(name) if aligned else None, functools.partial(split.read_array, name),
            )
    return sources
