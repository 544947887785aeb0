"""Batches of cached states for training: streamed in shuffled blocks, or held in RAM when they fit.

    from read_cache.reader import SplitReader
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
decodes the split once and gathers batches from memory, yields exactly the same batches. A background
thread assembles batches into a bounded queue: memory stays bounded whatever the store's size.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from read_cache.config import READER_MODES
from read_cache.errors import ReadCacheError
from read_cache.store import Block, Cache, Split, decode_floats, token_rows

Batch = dict[str, torch.Tensor]
T = TypeVar("T")

BLOCK_BYTES = 8 << 20
"""Target raw size of one read: a few chunks, so decoding a chunk twice at block edges costs little."""
SHUFFLE_BYTES = 64 << 20
"""Target raw size of the shuffle window (blocks whose examples are mixed together). It bounds the
streaming reader's memory (about twice this while a window is assembled) whatever the store's size;
the block order is shuffled across the whole split as well, so examples still mix split-wide."""
PREFETCH_BATCHES = 4


# --------------------------------------------------------------------------------------------------
# Examples held in memory, as stored


@dataclasses.dataclass
class Pool:
    """Some examples of a split in their stored 16-bit form, ragged like the store."""

    offsets: np.ndarray  # [n+1] local token offsets
    enc: np.ndarray  # [T, N_E, d]
    cross: np.ndarray | None  # [T, N_D(, H)]
    dec: np.ndarray | None  # [n, N_D, d]
    label: np.ndarray  # [n]
    rows: np.ndarray  # [n] rows in the split

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_block(cls, block: Block) -> Pool:
        rows = np.arange(block.start, block.start + len(block), dtype=np.int64)
        return cls(block.offsets, block.encoder_hidden, block.cross_attention, block.decoder_hidden, block.label, rows)

    @classmethod
    def concat(cls, pools: list[Pool]) -> Pool:
        if len(pools) == 1:
            return pools[0]
        lengths = np.concatenate([np.diff(p.offsets) for p in pools])
        return cls(
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            enc=np.concatenate([p.enc for p in pools]),
            cross=None if pools[0].cross is None else np.concatenate([p.cross for p in pools]),
            dec=None if pools[0].dec is None else np.concatenate([p.dec for p in pools]),
            label=np.concatenate([p.label for p in pools]),
            rows=np.concatenate([p.rows for p in pools]),
        )

    def take(self, positions: np.ndarray) -> Pool:
        """The examples at `positions` (in this pool), in that order, copied contiguously."""
        tokens = token_rows(self.offsets, positions)
        lengths = np.diff(self.offsets)[positions]
        return Pool(
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            enc=self.enc[tokens],
            cross=None if self.cross is None else self.cross[tokens],
            dec=None if self.dec is None else self.dec[positions],
            label=self.label[positions],
            rows=self.rows[positions],
        )

    def to_batch(self, float_dtype: str) -> Batch:
        batch = {
            "enc": decode(self.enc, float_dtype),
            "token_example": torch.from_numpy(np.repeat(np.arange(len(self)), np.diff(self.offsets))),
            "label": torch.from_numpy(np.ascontiguousarray(self.label)),
            "rows": torch.from_numpy(np.ascontiguousarray(self.rows)),
        }
        if self.cross is not None:
            batch["cross"] = decode(self.cross, float_dtype)
            batch["dec"] = decode(self.dec, float_dtype)
        return batch


def decode(stored: np.ndarray, float_dtype: str) -> torch.Tensor:
    """Stored 16-bit floats -> a float32 tensor.

    Decoded by numpy, not torch: this runs on the prefetch thread, and a torch kernel there would start
    a second OpenMP team that fights the training step's for the cores (on 2 cores, 10x slower steps).
    """
    return torch.from_numpy(decode_floats(stored, float_dtype))


def batch_to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# The order of an epoch


@dataclasses.dataclass(frozen=True)
class Window:
    blocks: list[int]
    """Indices into the block list, in read order."""
    order: np.ndarray
    """The rows of those blocks' examples, in the order the epoch yields them."""


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
        return [Window([int(b)], np.arange(*bounds[b])) for b in order]
    windows = []
    for w in range(0, len(order), shuffle_blocks):
        blocks = [int(b) for b in order[w : w + shuffle_blocks]]
        rows = np.concatenate([np.arange(*bounds[b]) for b in blocks])
        windows.append(Window(blocks, rng.permutation(rows)))
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
        shard: tuple[int, int] = (0, 1),
    ):
        if mode not in ("ram", "stream"):
            raise ValueError(f"mode must be 'ram' or 'stream', got {mode!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mode = mode
        self.prefetch = prefetch
        self.float_dtype = split.cache.geometry.float_dtype
        per_token = split.cache.geometry.bytes_per_token
        self.block_tokens = block_tokens or split.token_chunk * max(1, round(BLOCK_BYTES / (split.token_chunk * per_token)))
        self.bounds = split.block_bounds(self.block_tokens)
        self.shuffle_blocks = shuffle_blocks or max(2, SHUFFLE_BYTES // (self.block_tokens * per_token))
        self._ram: Pool | None = None
        self.rank, self.world_size = shard
        """This rank's share of every epoch (see `epoch_windows`); (0, 1) reads everything."""
        self._blocks: dict[int, Pool] = {}

    def __len__(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return math.ceil(len(self.split) / self.batch_size)

    @property
    def n_examples(self) -> int:
        return len(self.split)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def windows(self, epoch: int) -> list[Window]:
        return epoch_windows(
            self.bounds, shuffle=self.shuffle, seed=self.seed, epoch=epoch, shuffle_blocks=self.shuffle_blocks,
            rank=self.rank, world_size=self.world_size,
        )

    def share(self, epoch: int) -> np.ndarray:
        """The rows this rank yields in `epoch`, in order (every row of the split for one process)."""
        windows = self.windows(epoch)
        return np.concatenate([w.order for w in windows]) if windows else np.zeros(0, dtype=np.int64)

    def batches_in(self, epoch: int) -> int:
        """Batches this rank yields in `epoch` (its share may be a few examples more or less than another's)."""
        return math.ceil(len(self.share(epoch)) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        windows = self.windows(epoch)
        if self.mode == "ram" and self.world_size > 1:
            return prefetch(lambda: self._ram_share_batches(windows), self.prefetch)
        if self.mode == "ram":
            return prefetch(lambda: self._ram_batches(windows), self.prefetch)
        return prefetch(lambda: self._stream_batches(windows), self.prefetch)

    # --- RAM: decode once, gather every batch from memory -------------------------------------------
    def load(self) -> Pool:
        if self._ram is None:
            self._ram = Pool.from_block(self.split.read_block(0, len(self.split)))
        return self._ram

    def _ram_batches(self, windows: list[Window]) -> Iterator[Batch]:
        pool = self.load()
        order = np.concatenate([w.order for w in windows])
        for i in range(0, len(order), self.batch_size):
            yield pool.take(order[i : i + self.batch_size]).to_batch(self.float_dtype)

    def _ram_share_batches(self, windows: list[Window]) -> Iterator[Batch]:
        """RAM mode for one rank's share: blocks are decoded once, when the rank first needs them."""
        for window in windows:
            for b in window.blocks:
                if b not in self._blocks:
                    self._blocks[b] = Pool.from_block(self.split.read_block(*self.bounds[b]))
        pool = Pool.concat([self._blocks[b] for w in windows for b in w.blocks]) if windows else None
        order = np.concatenate([w.order for w in windows]) if windows else np.zeros(0, dtype=np.int64)
        positions = _positions(pool.rows, order) if pool is not None else order
        for i in range(0, len(order), self.batch_size):
            yield pool.take(positions[i : i + self.batch_size]).to_batch(self.float_dtype)

    # --- streaming: one window of blocks (plus < one batch carried over) in memory --------------------
    def _stream_batches(self, windows: list[Window]) -> Iterator[Batch]:
        carry: Pool | None = None
        pool: Pool | None = None
        for window in windows:
            pool = None  # let the last window go before the next is read: one window in memory at a time
            blocks = [Pool.from_block(self.split.read_block(*self.bounds[b])) for b in window.blocks]
            pool = Pool.concat(([carry] if carry is not None else []) + blocks)
            del blocks  # the concatenated copy is all this window needs
            pending = np.concatenate([carry.rows, window.order]) if carry is not None else window.order
            positions = _positions(pool.rows, pending)
            full = len(positions) // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                yield pool.take(positions[i : i + self.batch_size]).to_batch(self.float_dtype)
            carry = pool.take(positions[full:]) if full < len(positions) else None
        if carry is not None:
            yield carry.to_batch(self.float_dtype)


def _positions(pool_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where each of `rows` sits in `pool_rows` (both hold the same distinct rows)."""
    sorter = np.argsort(pool_rows, kind="stable")
    return sorter[np.searchsorted(pool_rows, rows, sorter=sorter)]


# --------------------------------------------------------------------------------------------------
# Choosing RAM or streaming


def split_bytes(split: Split) -> int:
    """What holding `split` decoded (16-bit, as stored) in RAM costs."""
    g = split.cache.geometry
    return split.n_tokens * g.bytes_per_token + len(split) * g.bytes_per_example


def choose_modes(cache: Cache, splits: tuple[str, ...], mode: str, budget_bytes: int) -> dict[str, str]:
    """'ram' or 'stream' per split: auto keeps splits in RAM, train first, while they fit the budget."""
    if mode not in READER_MODES:
        raise ReadCacheError(f"--reader {mode!r} is not one of {', '.join(READER_MODES)}")
    if mode == "stream":
        return {s: "stream" for s in splits}
    need = {s: split_bytes(cache[s]) for s in splits}
    if mode == "ram":
        total = sum(need.values())
        if total > budget_bytes:
            raise ReadCacheError(
                f"--reader ram needs {total / 1e9:.2f} GB but --memory-budget is {budget_bytes / 1e9:.2f} GB; "
                "raise --memory-budget or use --reader stream"
            )
        return {s: "ram" for s in splits}
    modes, left = {}, budget_bytes
    for s in splits:
        modes[s] = "ram" if need[s] <= left else "stream"
        left -= need[s] if modes[s] == "ram" else 0
    return modes


# --------------------------------------------------------------------------------------------------
# Background prefetching


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


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
