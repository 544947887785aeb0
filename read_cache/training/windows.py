"""A streaming window: each block's whole chunks, read into one reused buffer.

    reader = WindowReader(split, ring=BufferRing(keep=3), threads=2)
    pool = reader.read([(0, 400), (1200, 1610)])    # now
    future = reader.start([(3000, 3400)])          # queued on the reading threads; future.result() is its Pool

The result is a `Pool` whose arrays hold each block's chunks as they lie, back to back, so a block's edge
chunks bring their neighbours' tokens along and `Pool.starts` skips them. Raw local arrays (format 3's
codes and scales) are read by `preadv` + CRC32C (store.direct) straight into a slot of a `BufferRing`, a
few chunks per job so the threads stay evenly busy; compressed arrays and object stores go through zarr,
a block per job, into the same slot. The slot is page-aligned (util.aligned).

Given a device to land on (`land_on`: how a stream feeds a GPU), the window is made in that device's memory
instead, and raw chunks reach it through each thread's small host buffers (training.staging): the host never
holds the window, and the Pool comes with its device copy made (`Pool.device_copies`), which every batch
of the window gathers from (training.pools.WindowBatch).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from read_cache.store import Split
from read_cache.store.direct import DirectArray, direct_arrays
from read_cache.store.formats import to_torch_codes
from read_cache.training.buffers import BufferRing, Layout, carve, layout_bytes
from read_cache.training.pools import STORED, TOKEN_ARRAYS, DevicePool, Pool
from read_cache.training.staging import DeviceWindow, Stager

JOB_BYTES = 8 << 20
"""Raw bytes one direct read job lands: a 128 MB window is ~16 jobs, so two threads finish it together
(a block per job left one thread reading the last block alone)."""


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Rows of one split array, landed whole-chunk aligned in a window (read directly, or through zarr)."""

    n_rows: int
    chunk_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    direct: DirectArray | None
    read: Callable[[slice], np.ndarray]

    def span(self, start: int, stop: int) -> int:
        """Window rows that rows [start, stop) take: their whole chunks."""
        if stop <= start:
            return 0
        c = self.chunk_rows
        return ((stop - 1) // c - start // c + 1) * c

    def jobs(self, start: int, stop: int, out: Any, stager: Stager | None = None, window: DeviceWindow | None = None) -> list[Callable[[], object]]:
        """Reads that land the chunks of rows [start, stop) at out[0:]; row `start` is then out[start % chunk_rows].
        `out` is host memory, or with a `stager` a view of its device `window` (direct reads staged, see
        training.staging; zarr's reads copied over)."""
        if stop <= start:
            return []
        c, low = self.chunk_rows, start // self.chunk_rows * self.chunk_rows
        if self.direct is None:
            high = min(self.n_rows, ((stop - 1) // c + 1) * c)
            return [functools.partial(_assign, out, high - low, self.read, slice(low, high))]
        step = max(1, JOB_BYTES // self.direct.chunk_bytes) * c
        if stager is None:
            return [
                functools.partial(self.direct.read_into, max(start, a), min(stop, a + step), out[a - low : a - low + step])
                for a in range(low, stop, step)
            ]
        return [
            functools.partial(stager.read_into, self.direct, max(start, a), min(stop, a + step), _bytes(out[a - low : a - low + step]), window)
            for a in range(low, stop, step)
        ]


def _bytes(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows of a device window as the flat bytes the stager lands chunks in."""
    return rows.reshape(-1).view(torch.uint8)


def _assign(out: Any, rows: int, read: Callable[[slice], np.ndarray], where: slice) -> None:
    values = read(where)
    if isinstance(out, np.ndarray):
        out[:rows] = values
    else:  # a device window's view
        out[:rows].copy_(to_torch_codes(values))


class WindowReader:
    """Reads windows of a split into slots of `ring`, `threads` reads at a time (see the module)."""

    def __init__(self, split: Split, ring: BufferRing, threads: int, land_on: torch.device | None = None):
        self.split = split
        self.ring = ring
        self.stager = None if land_on is None else Stager(land_on)
        """With a device to land on, windows are made there (training.staging) and `ring` is not used."""
        self.threads = max(1, threads)
        self.sources = _sources(split)
        self._chunk_rows = {  # by group (token or example): every array of a group shares its chunk rows
            token: next((s.chunk_rows for k, s in self.sources.items() if (k in TOKEN_ARRAYS) == token), 1) for token in (True, False)
        }
        self._executor: ThreadPoolExecutor | None = None

    def start(self, bounds: list[tuple[int, int]]) -> Future[Pool]:
        """Start reading blocks [a, b) of `bounds`, in that order, each block's whole chunks after the last
        block's; the future's Pool is ready once every chunk has landed and passed its check (a failed read
        is its exception). The window is laid out and its reads queued here, on the caller's thread: the
        reading threads take them after any window queued before, so with the next window already queued
        they never wait between windows (docs/benchmarks.md, eleventh session)."""
        offsets = self.split.offsets
        token_spans, example_spans = self._spans(bounds)
        layout = self._layout(sum(token_spans), sum(example_spans))
        window = None if self.stager is None else self.stager.window(layout_bytes(layout))
        arrays = self.ring.take(layout) if window is None else carve(window.memory, layout)
        jobs, places, at_token, at_example = [], [], 0, 0
        for (a, b), t_span, e_span in zip(bounds, token_spans, example_spans):
            t0, t1 = int(offsets[a]), int(offsets[b])
            for key, source in self.sources.items():
                at, lo, hi = (at_token, t0, t1) if key in TOKEN_ARRAYS else (at_example, a, b)
                jobs += source.jobs(lo, hi, arrays[key][at:], self.stager, window)
            places.append((at_token + t0 % self._chunk_rows[True], at_example + a % self._chunk_rows[False]))
            at_token, at_example = at_token + t_span, at_example + e_span
        pool = self._pool(bounds, arrays if window is None else {}, places)
        if window is not None:  # the window lies on the device already: the batches gather from it there. Kept under
            # the device the reader was given, which `batch_to` is asked for ("cuda", where the memory says "cuda:0")
            device = self.stager.device
            pool.device_copies[device] = DevicePool(dataclasses.replace(pool), arrays, device)
        return self._submit(jobs, pool)

    def read(self, bounds: list[tuple[int, int]]) -> Pool:
        """The window of `bounds` (see `start`), read now."""
        return self.start(bounds).result()

    def largest_window_bytes(self, bounds: list[tuple[int, int]], blocks: int) -> int:
        """The most bytes a window of `blocks` of these blocks can take: the largest blocks' layouts, summed
        (each array aligned per block, so at least what `read` asks the ring for)."""
        sizes = sorted((layout_bytes(self._layout(t, e)) for t, e in zip(*self._spans(bounds))), reverse=True)
        return sum(sizes[:blocks])

    def _spans(self, bounds: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Per block, the token rows and example rows its whole chunks take in a window."""
        offsets = self.split.offsets
        return [self._span(True, int(offsets[a]), int(offsets[b])) for a, b in bounds], [self._span(False, a, b) for a, b in bounds]

    def _layout(self, token_rows: int, example_rows: int) -> Layout:
        rows = {True: token_rows, False: example_rows}
        return {k: ((rows[k in TOKEN_ARRAYS], *s.row_shape), s.dtype) for k, s in self.sources.items()}

    def _pool(self, bounds: list[tuple[int, int]], arrays: dict[str, np.ndarray], places: list[tuple[int, int]]) -> Pool:
        """The window's Pool: where each example's tokens and row landed (each block's first token and row at `places`)."""
        offsets = self.split.offsets
        starts, examples, rows = [], [], []
        for (a, b), (first_token, first_example) in zip(bounds, places):
            starts.append(first_token + offsets[a:b] - int(offsets[a]))
            examples.append(first_example + np.arange(b - a))
            rows.append(np.arange(a, b, dtype=np.int64))
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        starts_all = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        lengths = offsets[rows_all + 1] - offsets[rows_all]  # not np.diff of every offset of the split, per window
        return Pool(starts_all, lengths, np.concatenate(examples) if examples else starts_all, self.split.labels[rows_all], rows_all, arrays)

    def _span(self, token: bool, start: int, stop: int) -> int:
        spans = [s.span(start, stop) for k, s in self.sources.items() if (k in TOKEN_ARRAYS) == token]
        return max(spans, default=0)

    def _submit(self, jobs: list[Callable[[], object]], pool: Pool) -> Future[Pool]:
        """Queue the reads on the reading threads (GIL-free: preadv, crc32c, zarr's decoders); the future is
        `pool` once all are done, or the first read's error."""
        done: Future[Pool] = Future()
        if not jobs:
            done.set_result(pool)
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="read-cache-chunks")
        left, lock = [len(jobs)], threading.Lock()

        def run(job: Callable[[], object]) -> None:
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - handed to the window's future
                with lock:
                    if not done.done():
                        done.set_exception(error)
                return
            with lock:
                left[0] -= 1
                if left[0] == 0 and not done.done():
                    done.set_result(pool)

        for job in jobs:
            self._executor.submit(run, job)
        return done


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
