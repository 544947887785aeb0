"""A cache split as a torch `IterableDataset`, for training loops of your own (docs/your-own-loop.md).

    from torch.utils.data import DataLoader
    from read_cache import CacheDataset
    ds = CacheDataset("caches/t5-base/sst2", split="train", batch_size=96, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=2)   # the dataset batches; the loader must not
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader:        # exactly `SplitReader(...).epoch(epoch)`'s CPU float32 batches, in order
            ...

The dataset is a thin layer over `training.reader.SplitReader`: it yields the reader's batches, so a loop of
your own sees what `read-cache train` sees for the same seed and epoch. It holds only the cache's location and
the reader's options; each process opens the cache itself on first use (keyed by its pid), so nothing opened in
the parent is used after a fork, and the dataset pickles for spawned workers.

With `num_workers=N`, worker w yields batches w, w+N, w+2N... of the epoch; the DataLoader takes one batch from
each worker in turn, so it yields the reader's order exactly and each example once. Every worker reads the
epoch's windows (from the page cache after the first) but cuts and decodes only its own batches
(`SplitReader.epoch(e, batches=...)`), so N workers share the decoding. Inside a worker the reader decodes on
one thread (`workers=1`): N processes already use N cores. In `mode="ram"` each process decodes and holds its
own copy of the split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from read_cache.errors import ReadCacheError
from read_cache.store import Split, open_cache
from read_cache.store.location import Location
from read_cache.training.reader import Batch, SplitReader
from read_cache.training.train import shard_reader

MODES = ("stream", "ram")
"""The reader tiers a dataset may use: both yield CPU float32 batches (`device` holds codes on a GPU)."""


class CacheDataset(IterableDataset):
    """The batches of one split of a cache, as `SplitReader` yields them (`batch_size` examples each, CPU float32).

    `split_or_path` is a cache folder or URL (then `split` names the split) or an opened `Split`. `set_epoch(e)`
    picks the epoch's shuffle (seeded by `seed` and `e`, as train's epoch e + 1).

    Under torchrun (torch.distributed initialised when the dataset is made, or `shard=(rank, world)` given) each
    rank yields only its share of every epoch, dealt as `read-cache train` deals it, and every rank yields the
    same number of batches: train's rule (`train.even_steps`), not dropping the remainder, so the ranks together
    still cover the whole split once. A rank whose share is shorter repeats its last batch; each repeat carries
    `batch["weight"]` = 0.0 (fresh batches carry no "weight"): multiply the loss by
    `batch.get("weight", 1.0)` and the repeat keeps the ranks' steps in time while adding nothing.
    """

    def __init__(
        self,
        split_or_path: Split | str | os.PathLike[str],
        split: str = "train",
        batch_size: int = 96,
        shuffle: bool = True,
        seed: int = 0,
        *,
        mode: str = "stream",
        block_tokens: int | None = None,
        shuffle_blocks: int | None = None,
        storage_options: dict[str, Any] | None = None,
        shard: tuple[int, int] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ReadCacheError(f"CacheDataset mode {mode!r} must be one of {', '.join(MODES)} (both yield CPU batches)")
        if batch_size <= 0:
            raise ReadCacheError(f"CacheDataset batch_size {batch_size} must be at least 1")
        if isinstance(split_or_path, Split):
            self.location, self.split = split_or_path.cache.location, split_or_path.name
        else:
            self.location, self.split = Location.parse(split_or_path, storage_options), split
        self.options = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, mode=mode, shuffle_blocks=shuffle_blocks)
        self.block_tokens = block_tokens
        self.shard = shard or launch_shard()
        """(rank, world size): this process's share, fixed when the dataset is made so workers inherit it."""
        self.epoch = 0
        self._opened: tuple[int, Split, SplitReader] | None = None
        """(pid, split, reader) of the process that opened the cache: another process (a worker) opens its own."""

    def set_epoch(self, epoch: int) -> None:
        """The epoch (0-based) the next iteration yields; set it before each epoch, as with DistributedSampler."""
        self.epoch = epoch

    def reader(self) -> SplitReader:
        """This process's reader of this rank's share, opened on first use in each process."""
        return self._open()[2]

    def _open(self) -> tuple[int, Split, SplitReader]:
        if self._opened is None or self._opened[0] != os.getpid():
            split = open_cache(self.location)[self.split]
            self._opened = (os.getpid(), split, self._make_reader(split, self.shard))
        return self._opened

    def _make_reader(self, split: Split, shard: tuple[int, int]) -> SplitReader:
        # One decoding thread inside a DataLoader worker: the workers are the parallelism.
        workers = 1 if get_worker_info() is not None else None
        return shard_reader(split, shard, block_tokens=self.block_tokens, workers=workers, **self.options)

    def steps(self, epoch: int) -> int:
        """Batches every rank yields in `epoch`: the longest share's (each rank computes every share, no talking)."""
        _, split, reader = self._open()
        rank, world = self.shard
        others = [self._make_reader(split, (r, world)).batches_in(epoch) for r in range(world) if r != rank]  # nothing is read
        return max([reader.batches_in(epoch), *others])

    def __len__(self) -> int:
        """Batches this process's iteration yields in the current epoch (all workers together)."""
        return self.steps(self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        reader, epoch = self.reader(), self.epoch
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        own_batches, steps = reader.batches_in(epoch), self.steps(epoch)
        if self.shard[1] > 1 and own_batches == 0:
            raise ReadCacheError(
                f"rank {self.shard[0]} of {self.shard[1]} has no share of split {self.split} of {self.location}: "
                "the split is too small to share; launch fewer processes"
            )
        own = reader.epoch(epoch, batches=worker_batches(own_batches, steps, worker, workers))
        try:
            for batch, fresh in worker_steps(own, own_batches, steps, worker, workers):
                yield batch if fresh else {**batch, "weight": torch.tensor(0.0)}
        finally:
            own.close()

    def __getstate__(self) -> dict[str, Any]:
        # A spawned worker gets the location and options only, never this process's open cache.
        return {**self.__dict__, "_opened": None}


def worker_batches(n: int, steps: int, worker: int, workers: int) -> list[int]:
    """The reader's batches worker w of N needs: its steps w, w+N, ... of `steps`, a step past the rank's
    `n` batches being the last batch again (`train.even_steps`' rule), so only these are cut."""
    return sorted({min(i, n - 1) for i in range(worker, steps, workers)}) if n else []


def worker_steps(own: Iterator[Batch], n: int, steps: int, worker: int, workers: int) -> Iterator[tuple[Batch, bool]]:
    """(batch, fresh) for worker w's steps, from `own` (the reader's `worker_batches`, in order): a step past
    the rank's `n` batches repeats its last one, not fresh (weight 0), as `train.even_steps` does for a rank."""
    if n == 0 and steps:
        raise ValueError("a rank with an empty share has nothing to repeat")
    numbered = zip(worker_batches(n, steps, worker, workers), own)
    index, batch = -1, None
    for i in range(worker, steps, workers):
        while index < min(i, n - 1):
            index, batch = next(numbered)
        yield batch, i < n


def launch_shard() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
