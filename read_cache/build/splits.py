"""One split of a build: create (or resume) its skeleton, compute and write this rank's pending units, merge
their measured reconstruction error in unit order, and mark the split complete once every unit is durable
(after the next split's computing has started: see `ComputedSplit`)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from read_cache import distributed
from read_cache.backbone.inputs import Tokenized
from read_cache.backbone.load import Backbone
from read_cache.build.progress import BuildProgress
from read_cache.build.units import Ahead, UnitWriter, compute_unit
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import CacheWriter, Unit, plan_units
from read_cache.store.formats import ErrorStats
from read_cache.tasks.data import SplitData


class Written:
    """What of a split is durable: bytes this process wrote, and examples over every rank. The writer thread and
    rank 0's poller thread both add to it, so every change goes through one lock."""

    def __init__(self, examples: int):
        self._lock = threading.Lock()
        self.bytes, self.examples = 0, examples

    def add(self, nbytes: int, examples: int) -> int:
        """Count a durable unit; returns the examples written so far (what the split's status records)."""
        with self._lock:
            self.bytes += nbytes
            self.examples += examples
            return self.examples


@dataclasses.dataclass
class SplitReport:
    split: str
    examples: int
    tokens: int
    truncated: int
    units_written: int
    seconds: float
    bytes_written: int
    resumed: bool


@dataclasses.dataclass(frozen=True)
class OpenedSplit:
    """A split whose skeleton exists (`prepare_split`): whether an earlier build made it, and its units still to write."""

    resumed: bool
    pending: list[int]


@dataclasses.dataclass
class ComputedSplit:
    """A split whose units are all computed and handed to its writer thread, the last ones perhaps not yet
    durable. The build computes the next split before finishing this one, so writing a split's last units
    overlaps the next split's forward pass instead of holding the backbone up."""

    tail: contextlib.ExitStack
    """Waits for the writer thread (re-raising its error) and stops rank 0's poller of other ranks' units."""
    complete: Callable[[], SplitReport]

    def finish(self) -> SplitReport:
        """Wait for every unit to be durable, then mark the split complete; returns its report."""
        self.tail.close()
        return self.complete()

    def abandon(self) -> None:
        """After a failure elsewhere: let the writer finish what it holds (so nothing writes after the lock
        is released), without marking anything complete."""
        with contextlib.suppress(Exception):
            self.tail.close()


def prepare_split(writer: CacheWriter, split: str, data: SplitData, tokenized: Tokenized, launch: distributed.Launch) -> OpenedSplit:
    """Create the split's skeleton (rank 0) or check the one a resumed build made (every rank)."""
    resumed, pending = distributed.on_main(launch, lambda: open_split(writer, split, data, tokenized))
    distributed.agree(launch, lambda: check_skeleton(writer, split, data, tokenized.offsets))
    return OpenedSplit(resumed, pending)


def build_split(
    writer: CacheWriter, backbone: Backbone, split: str, data: SplitData, tokenized: Tokenized, cfg: BuildConfig,
    forward_seconds: list[float], launch: distributed.Launch = distributed.SINGLE, ahead: Ahead | None = None, *, opened: OpenedSplit,
) -> ComputedSplit:
    """Compute this rank's share of the `opened` split's pending units (its first unit taking the states in `ahead`);
    `finish()` the result once the caller has started on the next split: rank 0 then marks the split complete,
    once every unit is durable."""
    offsets = tokenized.offsets
    resumed, pending = opened.resumed, opened.pending
    units = plan_units(offsets, writer.group[split].attrs["unit_examples"], writer.geometry.token_chunk)
    mine = [units[u] for u in distributed.round_robin(pending, launch.rank, launch.world_size)]
    status = {"n_examples": len(offsets) - 1, "n_tokens": int(offsets[-1]), "truncated": tokenized.truncated, "source": data.source}
    started = time.perf_counter()
    written = Written(len(offsets) - 1 - sum(units[u].examples[1] - units[u].examples[0] for u in pending))
    # The measured reconstruction error of the durable units: a resumed build continues the recorded one.
    # Units are merged in index order, whichever rank computed them, so every launch shape records the same sums.
    errors = {name: ErrorStats.from_dict(d) for name, d in writer.split_status(split).get("reconstruction_error", {}).items()} if launch.is_main else {}
    unit_errors_of: dict[int, dict[str, ErrorStats]] = {}
    if launch.is_main:
        writer.update_split_status(split, {**status, "examples_written": written.examples, "complete": not pending})
    progress = BuildProgress(cfg.progress and launch.is_main, split, len(offsets) - 1, written.examples)

    def on_written(unit: Unit, nbytes: int, unit_errors: dict[str, ErrorStats]) -> None:
        examples_written = written.add(nbytes, unit.examples[1] - unit.examples[0])
        progress.written(nbytes)
        if launch.distributed:  # merged on rank 0 at the end, in unit order
            unit_errors_of[unit.index] = unit_errors
        else:  # one process writes units in index order: merge as they become durable (a resume continues it)
            merge_errors(errors, unit_errors)
        if not launch.distributed:  # under torchrun rank 0's poller records the count of every rank
            writer.update_split_status(split, {**status, "examples_written": examples_written, "complete": False, **error_status(errors)})

    others = sorted(set(pending) - {u.index for u in mine}) if launch.is_main else []
    tail = contextlib.ExitStack()
    tail.enter_context(others_progress(writer, split, units, others, progress, status, written))
    unit_writer = UnitWriter(writer, split, on_written)
    tail.callback(unit_writer.close)
    compute_units(mine, backbone, tokenized, cfg, writer, unit_writer, progress, tail, forward_seconds, ahead)
    computed = time.perf_counter() - started

    def complete() -> SplitReport:
        waited = time.perf_counter()
        distributed.barrier(launch)  # every rank's units are durable now
        ours = distributed.gather(launch, (len(mine), written.bytes, unit_errors_of))
        for _, by_unit in sorted(((u, e) for _, _, rank_units in ours for u, e in rank_units.items()), key=lambda ue: ue[0]):
            merge_errors(errors, by_unit)
        distributed.on_main(launch, lambda: finish_split(writer, split, units, {**status, **error_status(errors)}))
        return SplitReport(
            split, len(offsets) - 1, int(offsets[-1]), tokenized.truncated, sum(n for n, _, _ in ours),
            computed + time.perf_counter() - waited, sum(b for _, b, _ in ours), resumed,
        )

    return ComputedSplit(tail, complete)


def compute_units(
    mine: list[Unit], backbone: Backbone, tokenized: Tokenized, cfg: BuildConfig, writer: CacheWriter, unit_writer: UnitWriter,
    progress: BuildProgress, tail: contextlib.ExitStack, forward_seconds: list[float], ahead: Ahead | None = None,
) -> None:
    """Run the backbone over this rank's units, handing each to the writer thread; on failure the units already
    computed are still written (`tail`), as a rerun resumes from them."""
    offsets = tokenized.offsets
    channels = writer.channel_scales()  # stored with the cache: the same for every unit, resume and rank
    try:
        with progress:
            for unit in mine:
                t = time.perf_counter()
                tokens, examples, unit_errors = compute_unit(
                    backbone, unit, tokenized, offsets, cfg, writer.geometry, progress.computed, channels, ahead
                )
                forward_seconds[0] += time.perf_counter() - t
                unit_writer.put(unit, tokens, examples, unit_errors)
    except BaseException:
        tail.close()
        raise
    finally:
        if ahead is not None:
            ahead.clear()  # what no unit here took (another rank owns train's first unit, or it was done before)


def open_split(writer: CacheWriter, split: str, data: SplitData, tokenized: Tokenized) -> tuple[bool, list[int]]:
    """Create the split's skeleton unless a resumed build made it; returns (resumed, the pending units' indices).

    Under torchrun rank 0 alone calls this and hands the pending list to every rank, so all of them share
    out the same units (a rank reading units_done itself might see another's first unit already done)."""
    resumed = writer.has_split(split)
    if not resumed:
        offsets = tokenized.offsets
        writer.create_split(
            split,
            offsets=offsets,
            input_ids=tokenized.stored_ids(),
            labels=np.asarray(data.labels),
            index=np.asarray(data.index),
            info={"source": data.source, "truncated": tokenized.truncated},
        )
    done = writer.group[split]["units_done"][...]
    return resumed, [int(u) for u in np.flatnonzero(done == 0)]


def check_skeleton(writer: CacheWriter, split: str, data: SplitData, offsets: np.ndarray) -> None:
    skeleton = writer.split_skeleton(split)
    if not np.array_equal(skeleton["offsets"], offsets) or not np.array_equal(skeleton["label"], np.asarray(data.labels, skeleton["label"].dtype)):
        raise ReadCacheError(f"split {split!r} of {writer.path} was built from other data or another tokenizer; choose another --out")


def finish_split(writer: CacheWriter, split: str, units: list[Unit], status: dict[str, Any]) -> None:
    """Mark the split complete, after checking every unit is durable (re-read, not assumed)."""
    done = writer.group[split]["units_done"][...]
    missing = [u.index for u in units if not done[u.index]]
    if missing:
        raise ReadCacheError(f"split {split!r} of {writer.path} still misses units {missing[:5]} after every rank finished; rerun the same command to resume")
    writer.update_split_status(split, {**status, "examples_written": status["n_examples"], "complete": True})


def others_progress(writer: CacheWriter, split: str, units: list[Unit], others: list[int], progress: BuildProgress, status: dict, written: Written) -> Any:
    """On rank 0 of a launch: count the units other ranks make durable into the bar and the split's status."""
    if not others:
        return contextlib.nullcontext()
    per_token, per_example = writer.geometry.bytes_per_token, writer.geometry.bytes_per_example

    def on_done(indices: list[int]) -> None:
        examples = sum(units[u].examples[1] - units[u].examples[0] for u in indices)
        progress.computed(examples)
        progress.written(sum((units[u].tokens[1] - units[u].tokens[0]) * per_token for u in indices) + examples * per_example)
        writer.update_split_status(split, {**status, "examples_written": written.add(0, examples), "complete": False})

    return distributed.UnitPoller(lambda: writer.group[split]["units_done"][...], others, on_done)


def merge_errors(errors: dict[str, ErrorStats], more: dict[str, ErrorStats]) -> None:
    for name, stats in more.items():
        errors.setdefault(name, ErrorStats.empty(len(stats.err2))).merge(stats)


def error_status(errors: dict[str, ErrorStats]) -> dict[str, Any]:
    """The split status entry `reconstruction_error`: per array, per layer (see docs/storage.md)."""
    return {"reconstruction_error": {name: stats.to_dict() for name, stats in errors.items()}} if errors else {}
