"""A streaming window: each block's whole chunks, mapped straight from the page cache where the store allows
it, read into one reused buffer elsewhere.

    reader = WindowReader(split, ring=BufferRing(keep=3), threads=2)
    pool = reader.read([(0, 400), (1200, 1610)])

The result is a `Pool` whose arrays hold each block's chunks as they lie, back to back, so a block's edge
chunks bring their neighbours' tokens along and `Pool.starts` skips them. How an array lands:

  mapped  raw chunk files whose size is a whole number of pages (format 3's codes and, usually, scales)
          are mapped back to back into one stretch of address space (util.mapping) and their CRC32C is
          checked on the mapping: no byte is copied until a batch is gathered from it
  read    other raw arrays are read by `preadv` into a slot of a `BufferRing` (store.direct)
  zarr    compressed arrays and object stores go through zarr, into the same kind of slot

Mapping saves the copy that reading makes (page cache -> buffer); on this machine it lands a window
~3x faster than `preadv` into a reused buffer (docs/benchmarks.md, "The mapped window").
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
from read_cache.training.pools import STORED, TOKEN_ARRAYS, Pool
from read_cache.util.mapping import Region


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Rows of one split array, landed whole-chunk aligned in a window (mapped, read directly, or through zarr)."""

    n_rows: int
    chunk_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    direct: DirectArray | None
    read: Callable[[slice], np.ndarray]

    @property
    def mapped(self) -> bool:
        return self.direct is not None and self.direct.mappable

    @functools.cached_property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def span(self, start: int, stop: int) -> int:
        """Window rows that rows [start, stop) take: their whole chunks."""
        if stop <= start:
            return 0
        c = self.chunk_rows
        return ((stop - 1) // c - start // c + 1) * c

    def land(self, start: int, stop: int, memory: Region | np.ndarray, at_row: int) -> int:
        """Land the chunks of rows [start, stop) at window row `at_row` of `memory` (a Region when `mapped`,
        else the window's buffer); returns where row `start` is, counted from `at_row`."""
        if stop <= start:
            return 0
        if isinstance(memory, Region):
            assert self.direct is not None
            self.direct.map_into(self.direct.chunks_of(start, stop), memory, at_row)
            return start % self.chunk_rows
        out = memory[at_row : at_row + self.span(start, stop)]
        if self.direct is not None:
            return self.direct.read_into(start, stop, out)
        low = start // self.chunk_rows * self.chunk_rows
        high = min(self.n_rows, ((stop - 1) // self.chunk_rows + 1) * self.chunk_rows)
        out[: high - low] = self.read(slice(low, high))
        return start - low


class WindowReader:
    """Reads windows of a split (mapped, or into slots of `ring`), `threads` array reads at a time (see the module)."""

    def __init__(self, split: Split, ring: BufferRing, threads: int):
        self.split = split
        self.ring = ring
        self.threads = max(1, threads)
        self.sources = _sources(split)
        self._executor: ThreadPoolExecutor | None = None

    def read(self, bounds: list[tuple[int, int]]) -> Pool:
        """Blocks [a, b) of `bounds`, in that order, each block's whole chunks after the last block's."""
        offsets = self.split.offsets
        token_spans = [self._span(True, int(offsets[a]), int(offsets[b])) for a, b in bounds]
        example_spans = [self._span(False, a, b) for a, b in bounds]
        room = {True: sum(token_spans), False: sum(example_spans)}
        memory = self._memory(room)
        jobs, places, at_token, at_example = [], [], 0, 0
        for (a, b), t_span, e_span in zip(bounds, token_spans, example_spans):
            t0, t1 = int(offsets[a]), int(offsets[b])
            for key, source in self.sources.items():
                token = key in TOKEN_ARRAYS
                at, lo, hi = (at_token, t0, t1) if token else (at_example, a, b)
                jobs.append((key, functools.partial(source.land, lo, hi, memory[key], at)))
            places.append((at_token, at_example))
            at_token, at_example = at_token + t_span, at_example + e_span
        firsts = self._run(jobs)
        arrays = {k: self._rows(k, m, room[k in TOKEN_ARRAYS]) for k, m in memory.items()}
        return self._pool(bounds, arrays, places, firsts)

    def _memory(self, room: dict[bool, int]) -> dict[str, Region | np.ndarray]:
        """Where each array of the window lands: a fresh Region to map into, or a view of one ring slot."""
        rows = {k: room[k in TOKEN_ARRAYS] for k in self.sources}
        memory: dict[str, Region | np.ndarray] = {
            k: Region(rows[k] * s.row_bytes) for k, s in self.sources.items() if s.mapped
        }
        buffered = {k: ((rows[k], *s.row_shape), s.dtype) for k, s in self.sources.items() if not s.mapped}
        if buffered:
            memory.update(self.ring.take(buffered))
        return memory

    def _rows(self, key: str, memory: Region | np.ndarray, rows: int) -> np.ndarray:
        if not isinstance(memory, Region):
            return memory
        source = self.sources[key]
        return memory.array(0, rows * source.row_bytes).view(source.dtype).reshape(rows, *source.row_shape)

    def _pool(self, bounds: list[tuple[int, int]], arrays: dict[str, np.ndarray], places: list[tuple[int, int]], firsts: list[dict[str, int]]) -> Pool:
        """The window's Pool: where each example's tokens and row landed (each block's whole chunks at
        `places`, its first row `firsts` into them)."""
        offsets = self.split.offsets
        starts, examples, rows = [], [], []
        for (a, b), (at_token, at_example), first in zip(bounds, places, firsts):
            starts.append(at_token + first.get("token", 0) + offsets[a:b] - int(offsets[a]))
            examples.append(at_example + first.get("example", 0) + np.arange(b - a))
            rows.append(np.arange(a, b, dtype=np.int64))
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        starts_all = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        lengths = np.diff(offsets)[rows_all]
        return Pool(starts_all, lengths, np.concatenate(examples) if examples else starts_all, self.split.labels[rows_all], rows_all, arrays)

    def _span(self, token: bool, start: int, stop: int) -> int:
        spans = [s.span(start, stop) for k, s in self.sources.items() if (k in TOKEN_ARRAYS) == token]
        return max(spans, default=0)

    def _run(self, jobs: list[tuple[str, Callable[[], int]]]) -> list[dict[str, int]]:
        """Run the landings (GIL-free: mmap, preadv, crc32c, zarr's decoders); per block, where its first row is."""
        if self.threads > 1 and len(jobs) > 1:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="read-cache-chunks")
            results = list(self._executor.map(lambda job: job[1](), jobs))
        else:
            results = [land() for _, land in jobs]
        per_block = len(self.sources)
        firsts: list[dict[str, int]] = []
        for i in range(0, len(jobs), per_block):
            block = {}
            for (key, _), first in zip(jobs[i : i + per_block], results[i : i + per_block]):
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
