"""Batches of cached states for training: streamed in shuffled blocks, or held in RAM when they fit.

    from read_cache.training.reader import SplitReader
    reader = SplitReader(open_cache(path)["train"], batch_size=96, shuffle=True, seed=0)
    for batch in reader.epoch(0):
        batch["enc"]            # [T_b, N_E, d] float32, every real token of the batch's examples
        batch["token_example"]  # [T_b] long, the example (row in the batch) each token belongs to
        batch["cross"]          # [T_b, N_D] (or [T_b, N_D, H]) cross-attention of decoder position 0 (T5)
        batch["dec"]            # [B, N_D, d] float32 decoder states (T5)
        batch["label"]          # [B] long class ids, or float scores (STS-B)
        batch["rows"]           # [B] long, the examples' rows in the split

Random reads through zarr are slow (DESIGN section 2), so an epoch reads whole blocks of about a few
chunks, in a shuffled block order (seeded by seed and epoch), and shuffles examples within a window of
`shuffle_blocks` blocks. The order depends only on (seed, epoch, block layout), so the RAM mode, which
decodes the split once and gathers batches from memory, yields exactly the same batches. Batches a
CPU run trains on are assembled by background threads into a bounded queue: memory stays bounded
whatever the store's size. The reading threads read window i+1 (queued behind window i before the stream
waits for it) while window i's batches are made and, in training, the next epoch's first window while this
epoch's last batches train (`epoch(e, next_epoch=e + 1)`).

Three tiers hold a split: `stream` reads the store per window, `ram` holds the codes as stored in host
memory, `device` holds them as stored on a torch device (a GPU, or any device in tests) and gathers and
dequantises each batch there. Every tier yields the same batches in the same order, bit for bit.

Streaming lands each window once (training.windows: raw chunk files read by `preadv`, CRC32C checked).
Feeding a GPU (`coded`), the window lands in the GPU's memory, each chunk passing through a small pinned
buffer of the reading thread (training.staging), and a batch is only its index arrays into the window (a
`WindowBatch`, cut on the consumer's thread as it asks): `batch_to` gathers and dequantises every batch
there, 1-2 bytes a value over PCIe instead of 4, and the host neither holds the window nor gathers. On a
CPU run the window lands in host memory and each batch is copied once, one `np.take` per array, into a
slot of a `BufferRing` and dequantised there into float32 on the reader's `workers` threads (the copies
and numpy's decoding release the GIL). A slot, window or batch, is refilled only once nothing
holds what was made from it (training.buffers says the rule).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from read_cache.errors import ReadCacheError
from read_cache.kinds import READER_MODES
from read_cache.store import Cache, Split
from read_cache.store.readahead import default_inflight
from read_cache.training.buffers import BufferRing
from read_cache.training.pools import (
    Batch,
    CodedBatch,
    Decoding,
    DevicePool,
    Order,
    Pool,
    Segments,
    WindowBatch,
    batch_to,
    concat_pools,
    gather,
    window_batch,
)
from read_cache.training.windows import WindowReader

__all__ = ["Batch", "CodedBatch", "Decoding", "SplitReader", "WindowBatch", "batch_to", "choose_modes", "epoch_windows"]
T = TypeVar("T")

BLOCK_BYTES = 32 << 20
"""Target raw size of one read. A block's edges cut through chunks, and both neighbours decode an edge
chunk (and the decoder states' example chunk) whole, so small blocks decode much twice: at ~3 MB chunks
8 MB blocks streamed 1.2-1.7x fewer examples/s than 32 MB ones on T5-base shapes (docs/benchmarks.md)."""
SHUFFLE_BYTES = 128 << 20
"""Target raw size of the shuffle window (blocks whose examples are mixed together). It bounds the
streaming reader's memory (the window, its blocks while they are concatenated, and the next window
being read) whatever the store's size; the block order is shuffled across the whole split as well,
so examples still mix split-wide."""
PREFETCH_BATCHES = 4
READ_AHEAD = 1
"""Windows queued on the reading threads behind the one the stream waits for (the last window's: the next
epoch's first). They are queued before the wait, so the threads go from a window's last read straight to
the next window's first: when the next window was asked for only once this one had landed, they waited for
the stream to take it and lay the next one out at every window's end (docs/benchmarks.md, eleventh session).
One is enough while the batches are cut faster than windows are read, and it keeps a window fewer in memory
than two."""
TIERS = ("device", "ram", "stream")
"""Where a reader holds its split, fastest first (`--reader` adds auto: the fastest that fits)."""
DEVICE_SHARE = 0.8
"""Of the GPU's free memory, what the device tier may fill when --device-memory-budget is left out."""


def default_workers(device: str | torch.device | None = None) -> int:
    """Decoding threads: on a CPU run, the cores torch's step leaves free (at least 1); feeding a GPU, half the cores, up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    if str(device or "cpu").startswith("cuda"):
        return max(1, min(8, cores // 2))
    return max(1, min(4, cores // 2))


# --------------------------------------------------------------------------------------------------
# The order of an epoch


@dataclasses.dataclass(frozen=True)
class Window:
    blocks: list[int]
    """Indices into the block list, in read order."""
    order: np.ndarray
    """The rows of those blocks' examples, in the order the epoch yields them."""
    positions: np.ndarray
    """Where each of `order` lies among the blocks' rows laid end to end (block by block, in read order): its
    position in the window a streaming read makes of them (so no search is needed to find it there)."""


def epoch_windows(
    bounds: list[tuple[int, int]], *, shuffle: bool, seed: int, epoch: int, shuffle_blocks: int, rank: int = 0, world_size: int = 1
) -> list[Window]:
    """Shuffled block order, cut into windows of `shuffle_blocks` whose examples are permuted together.

    Under data-parallel training (`world_size` > 1) the epoch's block order is dealt into disjoint shares
    of about equal examples (`distributed.balanced`), and this rank windows only its own share: the
    ranks together read the whole split once, each only its blocks. One process gets every block, in
    the same order as without sharding.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(bounds)) if shuffle else np.arange(len(bounds))
    if world_size > 1:
        from read_cache.distributed.shard import balanced

        order = order[balanced([bounds[b][1] - bounds[b][0] for b in order], world_size)[rank]]
    if not shuffle:
        return [Window([int(b)], np.arange(*bounds[b]), np.arange(bounds[b][1] - bounds[b][0])) for b in order]
    windows = []
    for w in range(0, len(order), shuffle_blocks):
        blocks = [int(b) for b in order[w : w + shuffle_blocks]]
        rows = np.concatenate([np.arange(*bounds[b]) for b in blocks])
        positions = rng.permutation(len(rows))  # the same draws, and so the same order, as rng.permutation(rows)
        windows.append(Window(blocks, rows[positions], positions))
    return windows


# --------------------------------------------------------------------------------------------------
# The reader


class SplitReader:
    """Batches of one split; `epoch(e)` yields the batches of epoch e (reshuffled per epoch when shuffle)."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int = 96,
        shuffle: bool = False,
        seed: int = 0,
        mode: str = "stream",
        block_tokens: int | None = None,
        shuffle_blocks: int | None = None,
        prefetch: int = PREFETCH_BATCHES,
        workers: int | None = None,
        device: str | torch.device | None = None,
        inflight: int | None = None,
        shard: tuple[int, int] = (0, 1),
        coded: bool | None = None,
        stage: bool | None = None,
    ):
        if mode not in TIERS:
            raise ValueError(f"mode must be one of {', '.join(TIERS)}, got {mode!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mode = mode
        self.prefetch = prefetch
        self.workers = workers or default_workers(device)
        self.device = torch.device(device or "cpu")
        """Where the `device` tier holds the split (any torch device; the CLI asks for CUDA)."""
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.decoding = Decoding.of(split, on_cuda if coded is None else coded)
        """Coded batches (codes + scales, for `batch_to` to dequantise) by default only when feeding a GPU."""
        self.staged = mode == "stream" and self.decoding.coded and (self.device.type != "cpu" if stage is None else stage)
        """Streamed windows land in `device`'s memory through small host buffers (training.staging): by default
        when coded batches feed a device other than the CPU; `stage` forces it either way (tests, the bench)."""
        per_token = split.cache.geometry.bytes_per_token
        self.block_tokens = block_tokens or split.token_chunk * max(1, round(BLOCK_BYTES / (split.token_chunk * per_token)))
        self.inflight = inflight or default_inflight(split, self.block_tokens * per_token)
        """Array reads kept in flight while streaming: the workers' number on disk, more from an object store."""
        self.bounds = split.block_bounds(self.block_tokens)
        self.shuffle_blocks = shuffle_blocks or max(2, SHUFFLE_BYTES // (self.block_tokens * per_token))
        self.rank, self.world_size = shard
        """This rank's share of every epoch (see `epoch_windows`); (0, 1) reads everything."""
        self.batch_ring = BufferRing(keep=prefetch + self.workers + 3, pinned=on_cuda and self.decoding.coded)
        """Reused batch memory (training.buffers); pinned when coded batches go to a GPU."""
        queued = prefetch + self.workers + 1  # batches made or being made ahead of the consumer
        per_window = max(1, self.shuffle_blocks * len(split) // max(1, len(self.bounds)))  # examples, about
        self.window_ring = BufferRing(keep=1 + READ_AHEAD + math.ceil(queued * batch_size / per_window) + 1, pinned=on_cuda and self.decoding.coded and not self.staged)
        """Reused window memory (unused when staged): the window being read and the READ_AHEAD queued behind it,
        every window the queued batches take examples from (one, unless windows are smaller than batches), and
        one to spare; pinned when its windows are copied whole to a GPU (coded batches, `WindowBatch`, not staged)."""
        self._window_reader: WindowReader | None = None
        self._ram: Pool | None = None
        self._blocks: dict[int, Pool] = {}
        self._held: DevicePool | None = None
        self._device_blocks: dict[int, DevicePool] = {}
        self._windows: dict[int, list[Window]] = {}
        self._early: dict[int, Future[Pool]] = {}
        """The next epoch's first window, being read (streaming with `epoch(e, next_epoch)`)."""

    def __len__(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return math.ceil(len(self.split) / self.batch_size)

    @property
    def n_examples(self) -> int:
        return len(self.split)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def windows(self, epoch: int) -> list[Window]:
        """`epoch`'s windows (`epoch_windows`), kept for the two epochs whose windows were made last: an epoch asks
        for its own and the next one's (its first window is read ahead), each ~0.7 ms of the consumer's time at
        20,000 examples."""
        windows = self._windows.get(epoch)
        if windows is None:
            windows = epoch_windows(
                self.bounds, shuffle=self.shuffle, seed=self.seed, epoch=epoch, shuffle_blocks=self.shuffle_blocks,
                rank=self.rank, world_size=self.world_size,
            )
            self._windows[epoch] = windows
            while len(self._windows) > 2:  # the two made last (insertion order: a hit does not move an epoch)
                del self._windows[next(iter(self._windows))]
        return windows

    def share(self, epoch: int) -> np.ndarray:
        """The rows this rank yields in `epoch`, in order (every row of the split for one process)."""
        windows = self.windows(epoch)
        return np.concatenate([w.order for w in windows]) if windows else np.zeros(0, dtype=np.int64)

    def batches_in(self, epoch: int) -> int:
        """Batches this rank yields in `epoch` (its share may be a few examples more or less than another's)."""
        return math.ceil(len(self.share(epoch)) / self.batch_size)

    def epoch(self, epoch: int, next_epoch: int | None = None, batches: Collection[int] | None = None) -> Iterator[Batch]:
        """The batches of `epoch`. Streaming, `next_epoch` (the epoch the caller reads after this one) has
        that epoch's first window read in the background once this epoch's reads are done: an epoch's first
        batch needs its whole first window, and reading it would otherwise stall the training step.
        `batches` (indices in the epoch) makes only those, in order, and skips cutting the others: what a
        DataLoader worker of `CacheDataset` takes."""
        windows = self.windows(epoch)
        if self.mode == "device":
            # On the consumer's thread: GPU kernels are asynchronous anyway, and torch ops on a reader
            # thread would start a second OpenMP team on a CPU device (see `pools.Pool.gather`).
            return (job() for job in _chosen(self._device_jobs(windows), batches))
        if self.mode == "ram":
            return run_jobs(lambda: _chosen(self._ram_jobs(windows), batches), self.workers, self.prefetch)
        if self.decoding.coded:
            # A WindowBatch is only index arrays: cut on the consumer's thread as it asks (the windows are read
            # ahead on the reader's threads), with no queue to hand each over (that ran 0.85-0.95x as fast).
            return (job() for job in _chosen(self._stream_jobs(epoch, windows, next_epoch), batches))
        return run_jobs(lambda: _chosen(self._stream_jobs(epoch, windows, next_epoch), batches), self.workers, self.prefetch)

    def _job(self, pool: Pool, positions: np.ndarray) -> Callable[[], Batch]:
        return functools.partial(pool.gather, positions, self.decoding, self.batch_ring)

    # --- RAM: read once, gather every batch from memory ---------------------------------------------
    def load(self) -> Pool:
        if self._ram is None:
            self._ram = self._read_all()
        return self._ram

    def _read_all(self) -> Pool:
        pieces = self.split.block_bounds(self.block_tokens)
        if self.workers > 1 and len(pieces) > 1:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="read-cache-load") as executor:
                return concat_pools([Pool.from_block(b) for b in executor.map(lambda ab: self.split.read_block(*ab), pieces)])
        return Pool.from_block(self.split.read_block(0, len(self.split)))

    def _held_pool(self, windows: list[Window]) -> tuple[Pool, Callable[[np.ndarray], np.ndarray]]:
        """The RAM tier's examples and how rows map into them: the whole split for one process, only
        this rank's blocks (each read once, when the rank first needs it) under data parallelism."""
        if self.world_size == 1:
            return self.load(), lambda rows: rows
        pool = concat_pools(self._rank_blocks(windows, self._blocks, lambda block: block))
        return pool, lambda rows: _positions(pool.rows, rows)

    def _rank_blocks(self, windows: list[Window], held: dict[int, T], make: Callable[[Pool], T]) -> list[T]:
        """This rank's blocks in window order, each read (and made `make`'s form: a Pool, a DevicePool) once,
        when the rank first needs it, and held in `held` for later epochs."""
        for b in (b for w in windows for b in w.blocks if b not in held):
            held[b] = make(Pool.from_block(self.split.read_block(*self.bounds[b])))
        return [held[b] for w in windows for b in w.blocks]

    def _ram_jobs(self, windows: list[Window]) -> Iterator[Callable[[], Batch]]:
        if not windows:
            return
        pool, where = self._held_pool(windows)
        positions = where(np.concatenate([w.order for w in windows]))
        for i in range(0, len(positions), self.batch_size):
            yield self._job(pool, positions[i : i + self.batch_size])

    # --- device: the codes held on a torch device, every batch gathered and decoded there -----------
    def _device_jobs(self, windows: list[Window]) -> Iterator[Callable[[], Batch]]:
        order = np.concatenate([w.order for w in windows]) if windows else np.zeros(0, dtype=np.int64)
        if not len(order):
            return
        if self.world_size == 1:
            if self._held is None:
                self._held = DevicePool.of(self._read_all(), self.device)
            pool, positions = self._held, order  # the whole split: rows are positions
        else:  # this rank's share: each block moved to the device once, when the rank first needs it
            pool = DevicePool.concat(self._rank_blocks(windows, self._device_blocks, lambda block: DevicePool.of(block, self.device)))
            positions = _positions(pool.pool.rows, order)
        for i in range(0, len(order), self.batch_size):
            yield functools.partial(pool.batch, positions[i : i + self.batch_size], self.decoding)

    # --- streaming: a window of blocks, the next one being read -----------------------------------
    def _stream_jobs(self, epoch: int, windows: list[Window], next_epoch: int | None) -> Iterator[Callable[[], Batch]]:
        # Before waiting for window i, the READ_AHEAD windows after it are queued behind it (past this epoch's last,
        # the next epoch's first): they are read while window i's batches are made, and the reading threads
        # never wait for the stream between windows, from a disk or an object store (latency-bound) alike. The
        # examples of window i that do not fill a batch open the next batch, gathered from where they lie
        # (window i stays referenced until then).
        reads: collections.deque[Future[Pool]] = collections.deque()
        first = self._early.pop(epoch, None)  # this epoch's first window, read while the last epoch ran
        self._early.clear()  # a read ahead for an epoch the caller skipped is let go
        if first is not None:
            reads.append(first)
        started = len(reads)

        def start_through(last: int) -> None:
            """Windows up to `last` queued; past this epoch's last, the next epoch's first."""
            nonlocal started
            while started <= last and started < len(windows):
                reads.append(self._read_window(windows[started]))
                started += 1
            if last >= len(windows) and next_epoch is not None and next_epoch not in self._early:
                self.read_first_window(next_epoch)

        pending: Segments = []  # examples that do not fill a batch yet
        have = 0
        for i, window in enumerate(windows):
            start_through(i + READ_AHEAD)
            pool = reads.popleft().result()
            cut = self.batch_size if self.decoding.coded else 0  # the token -> example maps a WindowBatch slices
            order, at = Order(pool, window.positions, cut, have), 0
            while at < len(order):
                step = min(self.batch_size - have, len(order) - at)
                pending.append(order.segment(at, at + step))
                have, at = have + step, at + step
                if have == self.batch_size:
                    yield self._stream_job(pending)
                    pending, have = [], 0
            # The window's slot is idle again once its batches are made (the last ones may still take from it).
            # The heap is not trimmed here: a malloc_trim per window handed the training step's freed memory
            # back, which it then faulted in again, 6-9% of a CPU epoch; the epoch's RSS stays flat without it
            # (docs/benchmarks.md, ninth session).
            del pool, order
        if pending:
            yield self._stream_job(pending)

    def _stream_job(self, segments: Segments) -> Callable[[], Batch]:
        """Coded, a batch stays in its windows (a WindowBatch: the device gathers it); else it is gathered here."""
        if self.decoding.coded:
            return functools.partial(window_batch, segments, self.decoding)
        return functools.partial(gather, segments, self.decoding, self.batch_ring)

    def _read_window(self, window: Window) -> Future[Pool]:
        """Start reading a window's blocks on the reader's threads (training.windows)."""
        if self._window_reader is None:
            land_on = self.device if self.staged else None
            self._window_reader = WindowReader(self.split, self.window_ring, max(self.inflight, self.workers), land_on)
            blocks = self.shuffle_blocks if self.shuffle else 1  # an unshuffled epoch reads a block per window
            self.window_ring.floor = self._window_reader.largest_window_bytes(self.bounds, blocks)
        return self._window_reader.start([self.bounds[b] for b in window.blocks])

    def read_first_window(self, epoch: int) -> Future[Pool] | None:
        """Start reading `epoch`'s first window (streaming) on the reader's threads, as
        `epoch(e, next_epoch)` does for the next epoch: the streaming counterpart of `load`. Returns the
        read's future (None for an empty split)."""
        windows = self.windows(epoch)
        if not windows:
            return None
        self._early[epoch] = self._read_window(windows[0])
        return self._early[epoch]

    def wait_read_ahead(self) -> None:
        """Wait for the windows read ahead (`epoch(e, next_epoch)`, `read_first_window`) to land: a benchmark
        that stops after an epoch must not time the next thing beside a read still running."""
        for future in list(self._early.values()):
            future.result()


def _chosen(items: Iterator[T], batches: Collection[int] | None) -> Iterator[T]:
    """The items at `batches` (all when None); a job is only a closure until it runs, so skipping one is free."""
    if batches is None:
        yield from items
        return
    wanted = set(batches)
    for i, item in enumerate(items):
        if i in wanted:
            yield item


def _positions(pool_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where each of `rows` sits in `pool_rows` (both hold the same distinct rows)."""
    sorter = np.argsort(pool_rows, kind="stable")
    return sorter[np.searchsorted(pool_rows, rows, sorter=sorter)]


# --------------------------------------------------------------------------------------------------
# Choosing RAM or streaming


def split_bytes(split: Split) -> int:
    """What holding `split` in RAM as stored (16-bit, or codes + scales) costs."""
    g = split.cache.geometry
    return split.n_tokens * g.bytes_per_token + len(split) * g.bytes_per_example


def choose_modes(
    cache: Cache,
    splits: tuple[str, ...],
    mode: str,
    budget_bytes: int,
    device: torch.device | str = "cpu",
    device_budget_bytes: int | None = None,
) -> dict[str, str]:
    """A tier per split: auto holds splits on the GPU, train first, while they fit its budget, then in
    RAM while they fit --memory-budget, and streams the rest; device and ram insist (one-line errors)."""
    if mode not in READER_MODES:
        raise ReadCacheError(f"--reader {mode!r} is not one of {', '.join(READER_MODES)}")
    if mode == "stream":
        return {s: "stream" for s in splits}
    need = {s: split_bytes(cache[s]) for s in splits}
    on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if mode == "device" and not on_gpu:
        raise ReadCacheError("--reader device needs a CUDA GPU and none is in use here; use --reader ram (or auto) instead")
    gpu_left = (device_budget_bytes if device_budget_bytes is not None else gpu_share(device)) if on_gpu else 0
    if mode in ("device", "ram"):
        total, budget = sum(need.values()), gpu_left if mode == "device" else budget_bytes
        if total > budget:
            flag = "--device-memory-budget" if mode == "device" else "--memory-budget"
            raise ReadCacheError(
                f"--reader {mode} needs {total / 1e9:.2f} GB but {flag} allows {budget / 1e9:.2f} GB; raise {flag} or use --reader auto"
            )
        return {s: mode for s in splits}
    modes, left = {}, budget_bytes
    for s in splits:
        if need[s] <= gpu_left:
            modes[s], gpu_left = "device", gpu_left - need[s]
        elif need[s] <= left:
            modes[s], left = "ram", left - need[s]
        else:
            modes[s] = "stream"
    return modes


def gpu_share(device: torch.device | str) -> int:
    """What the device tier may hold by default: DEVICE_SHARE of the GPU's free memory."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * DEVICE_SHARE)


# --------------------------------------------------------------------------------------------------
# Background prefetching


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def run_jobs(make_jobs: Callable[[], Iterator[Callable[[], T]]], workers: int, depth: int) -> Iterator[T]:
    """Run the jobs `make_jobs()` yields on `workers` threads, results in order, `depth` ahead.

    With one worker the jobs run on the prefetch thread itself (no pool). With more, a producer thread
    submits jobs while the consumer takes results in submission order; at most depth + workers batches
    exist at once.
    """
    if workers <= 1:
        return prefetch(lambda: (job() for job in make_jobs()), depth)
    return _run_pooled(make_jobs, workers, depth)


def _run_pooled(make_jobs: Callable[[], Iterator[Callable[[], T]]], workers: int, depth: int) -> Iterator[T]:
    executor = ThreadPoolExecutor(workers, thread_name_prefix="read-cache-decode")
    futures = prefetch(lambda: (executor.submit(job) for job in make_jobs()), depth + workers)
    try:
        for future in futures:
            yield future.result()
    finally:
        futures.close()  # stops the producer before the pool goes, so it never submits to a closed pool
        executor.shutdown(wait=True, cancel_futures=True)


def prefetch(make: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """Run the iterator `make()` on a thread, `depth` items ahead; errors re-raise here."""
    items: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failed(e))

    thread = threading.Thread(target=run, name="read-cache-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
