"""The one training loop: epochs over shared batches, each stepping every network still training, early stopping.

    members = [Member("", step=..., stopping=EarlyStopping(task, patience, snapshot=..., restore=...), optimizer=opt)]
    timeline = fit(members, Pass(epochs=30, batches=..., validate=...))
    fitted = members[0].stopping.finish()      # the best epoch's state restored

Every way of training runs through `fit`: `read-cache train` is a pass of one member, `read-cache sweep` a pass
of many that read each batch once, and a baseline of `train --method` a pass of one over token batches. Each
member keeps its own optimizer and `EarlyStopping` (the paper's rule: stop after `patience` epochs without a
better validation score, keep the best state), whose `state_dict()` is what a checkpoint saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from read_cache import distributed
from read_cache.tasks.metrics import score
from read_cache.tasks.specs import TaskSpec
from read_cache.util.device import training_threads
from read_cache.util.files import write_text

log = logging.getLogger(__name__)


class Evaluation(NamedTuple):
    """A network's outputs on one split, in split order."""

    logits: np.ndarray
    """[n, C] logits, or [n] scores for regression."""
    predictions: np.ndarray
    """[n] class ids, or scores."""
    labels: np.ndarray
    """[n] the labels."""


class Fitted(NamedTuple):
    epochs_run: int
    best_epoch: int
    examples_per_second: float
    validation: Evaluation | None
    """The best epoch's validation outputs, which the restored state reproduces; None when nothing trained."""


class EarlyStopping:
    """One network's epoch bookkeeping: a metrics.jsonl line per epoch, the best state, and when to stop.

    `snapshot()` returns a copy of the weights that matter (the side network, or a baseline's trainable
    parameters) and `restore(state)` loads one; `metrics` is the run's metrics.jsonl (None: another rank writes
    it). `on_epoch(record)` sees every epoch's record (the run's --report-to).
    """

    def __init__(
        self, task: TaskSpec, patience: int, *, snapshot: Callable[[], dict[str, Any]], restore: Callable[[dict[str, Any]], None],
        metrics: Path | None = None, name: str = "", on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.task, self.patience, self.snapshot, self.restore = task, patience, snapshot, restore
        self.metrics, self.prefix, self.on_epoch = metrics, f"{name}: " if name else "", on_epoch
        self.best_score, self.best_epoch, self.best_state = -math.inf, 0, snapshot()
        self.best_validation: Evaluation | None = None
        self.epoch, self.seen, self.seconds, self.last = 0, 0, 0.0, None
        self.history: list[dict[str, Any]] = []
        if self.metrics is not None:
            self.metrics.write_text("")

    @property
    def writes(self) -> bool:
        return self.metrics is not None

    def update(self, epoch: int, loss: float, n: int, secs: float, validation: Evaluation) -> bool:
        """Record one epoch; True when `patience` epochs have passed without a better validation score."""
        self.epoch, self.seen, self.seconds = epoch, self.seen + n, self.seconds + secs
        self.last = score(self.task, validation.predictions, validation.labels)
        rate = n / max(secs, 1e-9)
        log.info("%sepoch %d: loss %.3f, validation %s %.3f, %s ex/s", self.prefix, epoch, loss, self.last["metric"], self.last["score"], f"{rate:,.0f}")
        record = {"epoch": epoch, "loss": loss, "validation": self.last, "examples_per_second": rate, "seconds": secs}
        self.history.append(record)
        if self.metrics is not None:
            with self.metrics.open("a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(record)
        current = self.last["score"] if math.isfinite(self.last["score"]) else -math.inf
        if current > self.best_score or self.best_epoch == 0:
            self.best_score, self.best_epoch = current, epoch
            self.best_state, self.best_validation = self.snapshot(), validation
        elif epoch - self.best_epoch >= self.patience:
            log.info("%sno better validation score for %d epochs: stopping early", self.prefix, self.patience)
            return True
        return False

    def finish(self) -> Fitted:
        """Restore the best state; what a fit returns."""
        self.restore(self.best_state)
        return Fitted(self.epoch, self.best_epoch, self.seen / max(self.seconds, 1e-9), self.best_validation)

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to go on as if uninterrupted (tensors and plain values only)."""
        validation = self.best_validation
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "best_validation": None if validation is None else [torch.from_numpy(np.ascontiguousarray(a)) for a in validation],
            "epoch": self.epoch,
            "seen": self.seen,
            "seconds": self.seconds,
            "last": self.last,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put a `state_dict()` back, and metrics.jsonl with it (one line per checkpointed epoch)."""
        self.best_score, self.best_epoch, self.best_state = state["best_score"], state["best_epoch"], state["best_state"]
        validation = state["best_validation"]
        self.best_validation = None if validation is None else Evaluation(*(t.numpy() for t in validation))
        self.epoch, self.seen, self.seconds, self.last = state["epoch"], state["seen"], state["seconds"], state["last"]
        self.history = list(state["history"])
        if self.metrics is not None:
            write_text(self.metrics, "".join(json.dumps(record) + "\n" for record in self.history))


@dataclasses.dataclass
class Member:
    """One network in a pass: how it steps on a batch, its optimizer and its early stopping."""

    name: str
    stopping: EarlyStopping
    optimizer: torch.optim.Optimizer | None
    """None when nothing trains (the member is scored as it is)."""
    step: Callable[[Any, float], float]
    """(batch on the device, loss weight) -> the batch's mean loss, after one optimizer step."""
    ended: str | None = None
    """Why it left the pass: 'early stop', 'halved', 'last epoch' or 'nothing to train'; None while training."""
    index: int = 0
    """Its place in the grid (under torchrun a sweep's rank holds only some configurations)."""
    run: Any = None
    """The caller's record for it (a `training.train.Run` for READ)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps; a member that left the pass needs only its early-stopping record."""
        active = self.ended is None
        return {
            "net": self.stopping.snapshot() if active else None,
            "optimizer": self.optimizer.state_dict() if active and self.optimizer is not None else None,
            "stopping": self.stopping.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["net"] is not None:
            self.stopping.restore(state["net"])
        if state["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.stopping.load_state_dict(state["stopping"])


@dataclasses.dataclass
class Pass:
    """What `fit` needs besides its members."""

    epochs: int
    batches: Callable[[int], Iterable[tuple[Any, int, float]]]
    """epoch (1-based) -> (batch on the device, its examples, loss weight) for every step of the epoch."""
    validate: Callable[[list[Member]], list[Evaluation]]
    """The members' validation outputs, each batch read once for all of them."""
    train: Callable[[list[Member]], None] = lambda members: None
    """Put the members' modules in training mode before an epoch."""
    save: Callable[[int, list[Member], list[dict[str, Any]]], None] | None = None
    """Checkpoint after an epoch: (epoch, members, timeline)."""
    launch: distributed.Launch = distributed.SINGLE
    """The launch a sweep's configurations are spread over (halving and stopping agree across it)."""
    data_parallel: distributed.Launch = distributed.SINGLE
    """The launch one data-parallel run's batches are spread over: epoch totals are summed over it."""
    rungs: frozenset[int] = frozenset()
    """Epochs after which successive halving keeps the best 1/eta."""
    eta: int = 3
    progress: bool = False
    bar_total: int = 0
    rank_examples: list[list[int]] = dataclasses.field(default_factory=list)
    """Filled per epoch under data parallelism: the train examples each rank read."""


def fit(members: list[Member], p: Pass, first: int = 1, timeline: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Epochs `first`..p.epochs of the shared pass: train every active member, validate them together, retire the stopped.

    Returns where each epoch's time went: the pass over train (and within it the members' own steps) and validation.
    """
    timeline = [] if timeline is None else timeline
    for member in members:
        if member.optimizer is None and member.ended is None:
            member.ended = "nothing to train"
    for epoch in range(first, p.epochs + 1):
        active = [m for m in members if m.ended is None]
        if not distributed.any_rank(p.launch, bool(active)):
            break
        if not active:  # this rank's configurations have all stopped; others still train (and may halve)
            if epoch in p.rungs:
                halve(members, epoch, p.eta, p.launch)
            continue
        started = time.perf_counter()
        results = train_epoch(active, epoch, p)
        trained = time.perf_counter()
        validations = p.validate(active)
        timeline.append({
            "epoch": epoch, "configurations": len(active), "train_seconds": trained - started,
            "step_seconds": sum(secs for _, _, secs in results), "validation_seconds": time.perf_counter() - trained,
        })
        for member, (loss, n, secs), validation in zip(active, results, validations):
            if member.stopping.update(epoch, loss, n, secs, validation):
                member.ended = "early stop"
            elif epoch == p.epochs:
                member.ended = "last epoch"
        if epoch in p.rungs:
            halve(members, epoch, p.eta, p.launch)
        if p.save is not None:
            p.save(epoch, members, timeline)
        if len(members) > 1:
            log.info(
                "epoch %d: trained %d in %.1f s (their steps %.1f s), validated them in %.1f s; %d go on",
                epoch, len(active), timeline[-1]["train_seconds"], timeline[-1]["step_seconds"], timeline[-1]["validation_seconds"],
                sum(m.ended is None for m in members),
            )
    return timeline


def train_epoch(active: list[Member], epoch: int, p: Pass) -> list[tuple[float, int, float]]:
    """One pass over train, each batch read and decoded once and stepped through every active member.

    Returns, per member, (mean loss, examples, seconds of its own steps); under data parallelism the
    loss and examples are every rank's together.
    """
    p.train(active)
    losses, seconds, n = [0.0] * len(active), [0.0] * len(active), 0
    started = time.perf_counter()
    best = max((m.stopping.last for m in active if m.stopping.last), key=lambda s: s["score"], default=None)
    with EpochBar(p.progress and p.data_parallel.is_main, epoch, p.epochs, p.bar_total, best) as advance:
        for batch, b, weight in p.batches(epoch):
            for i, member in enumerate(active):
                step_started = time.perf_counter()
                losses[i] += member.step(batch, weight) * b
                seconds[i] += time.perf_counter() - step_started
            if b:
                n += b
                advance(b, sum(losses) / len(active) / n, n / (time.perf_counter() - started))
    if p.data_parallel.distributed:  # the epoch's numbers over every rank
        every = distributed.gather(p.data_parallel, (losses, n))
        p.rank_examples.append([k for _, k in every])
        losses, n = [sum(ls[i] for ls, _ in every) for i in range(len(active))], sum(k for _, k in every)
    if len(active) == 1:  # a lone run's rate counts its whole epoch, reading included
        seconds = [time.perf_counter() - started]
    return [(loss / max(n, 1), n, secs) for loss, secs in zip(losses, seconds)]


def halving_rungs(epochs: int, eta: int) -> frozenset[int]:
    """Epochs after which successive halving culls: 1, eta, eta^2, ... before the last epoch."""
    rungs, epoch = set(), 1
    while epoch < epochs:
        rungs.add(epoch)
        epoch *= eta
    return frozenset(rungs)


def halve(members: list[Member], epoch: int, eta: int, launch: distributed.Launch = distributed.SINGLE) -> None:
    """Of the configurations still training (on every rank), only the best 1/eta by validation so far go on."""
    alive = [(m.index, m.stopping.best_score, m.name) for m in members if m.ended is None]
    everyone = sorted(a for part in distributed.gather(launch, alive) for a in part)  # the grid's order
    keep = math.ceil(len(everyone) / eta)
    ranked = sorted(everyone, key=lambda a: -a[1])  # stable: ties keep the grid's order
    kept = {index for index, _, _ in ranked[:keep]}
    for member in members:
        if member.ended is None and member.index not in kept:
            member.ended = "halved"
    if everyone:
        log.info("epoch %d: successive halving keeps %d of %d: %s", epoch, keep, len(everyone), ", ".join(name for _, _, name in ranked[:keep]))


@contextlib.contextmanager
def torch_threads(threads: int | None, local_world_size: int = 1) -> Iterator[None]:
    """Use `threads` CPU threads inside the block (None: `training_threads`), and give the caller its own setting back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or training_threads(local_world_size))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EpochBar:
    """A rich progress bar for one epoch with loss, last validation score and examples/s (or nothing)."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, last: dict | None):
        self.enabled, self.epoch, self.epochs, self.total = enabled, epoch, epochs, total
        self.metric = f"{last['metric']} {last['score']:.3f}" if last else "-"

    def __enter__(self) -> Callable[[int, float, float], None]:
        if not self.enabled:
            return lambda n, loss, rate: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn(f"[bold]epoch {self.epoch}/{self.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}, validation {task.fields[metric]}, {task.fields[rate]} ex/s"),
            TimeElapsedColumn(),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task("train", total=self.total, loss="-", metric=self.metric, rate="-")

        def advance(n: int, loss: float, rate: float) -> None:
            self._bar.update(task, advance=n, loss=f"{loss:.3f}", rate=f"{rate:,.0f}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
