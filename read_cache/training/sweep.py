"""Many side networks per pass: a grid of (RNN, size, learning rate, head) trained from one read of the cache.

    read-cache sweep --cache caches/t5-small/sst2 --rnn gru/256,gru/128,lstm/128 --lr 3e-4,1e-3 --epochs 5 --out sweeps/sst2
    read-cache sweep --rnn gru/256,gru/128,lstm/128 --trials 32 --lr-range 1e-6:3e-3 --search halving --out sweeps/search

The paper chose READ's RNN, size and learning rate by a search, each trial paying for the backbone again.
From a cache, trials share everything but the side network. `sweep(SweepConfig(...))` builds every
configuration's network exactly as `read-cache train` does (seeded right before it is built), then reads
and decodes each training batch once per epoch and steps every network still training on it, and reads
validation once per epoch (and test once) for all of them: the engine's pass of many members (a lone
`read-cache train` is the pass of one). Each network keeps its own AdamW, early stopping and best state
(`engine.EarlyStopping`), so its scores equal those of a lone `read-cache train` with the same flags and
seed; networks that stop leave the pass. The selection is the paper's: the best
validation score wins, and its test score is the one to report.

    DIR/
      runs/NN-<rnn><dim>-<head>-lr<lr>/   one run folder per configuration, as `read-cache train` writes it (curves.png,
                                          and with --report-to one TensorBoard / W&B run each)
      sweep.png                           validation curves
      sweep-config.json                   this SweepConfig and the cache's identity (written first)
      checkpoint.pt                       while training: every configuration's state after the last epoch
      sweep.json                          every configuration's scores, sizes and epochs, and `best` (written last)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from read_cache import distributed
from read_cache.config import Search, SweepConfig, record
from read_cache.kinds import RNNKind
from read_cache.training import checkpoint, engine
from read_cache.training.engine import Evaluation, Fitted, Member, torch_threads
from read_cache.training.report import open_reporter
from read_cache.training.runs import (
    CHECKPOINT,
    RUNS,
    SWEEP_ARTIFACTS,
    SWEEP_CHART,
    SWEEP_CONFIG,
    SWEEP_REPORT,
    claim_folder,
    finished,
)
from read_cache.training.train import (
    Run,
    build_network,
    cache_record,
    claim_run_dir,
    evaluate_many,
    make_readers,
    open_task_cache,
    read_member,
    read_pass,
    run_config,
    save_run,
    side_network_config,
    summarize,
)
from read_cache.util.device import autocast_dtype, pick_device, training_threads
from read_cache.util.energy import Meter
from read_cache.util.files import write_json
from read_cache.util.plots import pyplot, save

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The verb


def sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Train every configuration from one read of the cache, write each run folder and sweep.json; returns the report."""
    started = time.perf_counter()
    with distributed.session(cfg.shared.device) as launch:
        return _sweep(cfg, launch, started)


def _sweep(cfg: SweepConfig, launch: distributed.Launch, started: float) -> dict[str, Any]:
    distributed.check_same_arguments(launch, cfg)
    if not launch.is_main:  # one progress bar per launch: rank 0's
        cfg = dataclasses.replace(cfg, shared=dataclasses.replace(cfg.shared, progress=False))
    with torch_threads(cfg.shared.threads, launch.local_world_size):
        members = setup(cfg, launch)
        try:
            with Meter() as meter:
                timeline = fit_all(members, cfg, launch)
            fitted = [member.stopping.finish() for member in members]  # each network back at its best epoch
            scoring = time.perf_counter()
            validations, tests = score_all(members, fitted)
        except BaseException:
            for member in members:  # what was logged is kept; save_run closes them otherwise
                member.run.report.close()
            raise
        timeline.append({"epoch": None, "configurations": len(members), "test_seconds": time.perf_counter() - scoring})
    wall, reading = time.perf_counter() - started, meter.reading.to_dict()
    entries = []
    for member, result, validation, test in zip(members, fitted, validations, tests):
        summary = summarize(member.run, result, validation, test, wall_seconds=wall, meter=reading)
        save_run(member.run, summary)
        entries.append(_entry(member, summary))
    if launch.distributed:  # every rank's configurations, in the grid's order
        entries = sorted((e for part in distributed.gather(launch, entries) for e in part), key=lambda e: e["index"])
    report = _report(cfg, members, entries, wall, reading, timeline)
    report["world_size"] = launch.world_size
    out = Path(cfg.out)
    if not launch.is_main:
        return report
    chart(report, out / SWEEP_CHART)
    write_json(out / SWEEP_REPORT, report)
    finished(out)
    best = report["best"]
    log.info(
        "selected %s: validation %s %.4f, test %.4f; %d configurations, %d epochs in %.1f s; wrote %s",
        best["name"], best["validation"]["metric"], best["validation"]["score"], best["test"]["score"],
        len(entries), report["epochs_trained"], wall, out / SWEEP_REPORT,
    )
    return report


def setup(cfg: SweepConfig, launch: distributed.Launch = distributed.SINGLE) -> list[Member]:
    """Validate every configuration first, then open the cache once, claim --out, and build every network.

    Under torchrun each rank builds only its share of the configurations (round robin over the grid)
    and reads the cache itself; rank 0 claims --out.
    """
    cfg.validate()
    configs = [cfg.train_config(trial) for trial in cfg.configurations()]
    for config in configs:
        config.validate()
    cache, task = distributed.agree(launch, lambda: open_task_cache(cfg.shared))
    device = pick_device(launch.device or cfg.shared.device)
    amp = autocast_dtype(device, cfg.shared.dtype)
    unique = {}
    for config in configs:  # refuses a head the task cannot use, before anything is written
        net_cfg = side_network_config(config, cache, task)
        unique.setdefault((config.rnn, config.dim, config.lr, net_cfg.head), (config, net_cfg))
    if launch.world_size > len(unique):
        raise distributed.RankError(f"{len(unique)} configurations cannot keep {launch.world_size} ranks busy; launch at most {len(unique)} processes")
    readers = make_readers(cfg.shared, cache)
    sweep_record = {"sweep": record(cfg), "cache": cache_record(cache)}
    out = distributed.on_main(launch, lambda: claim_sweep_dir(cfg, sweep_record))
    resuming = distributed.broadcast(launch, (out / CHECKPOINT).is_file())  # its members may be finished already: they are redone
    width = len(str(len(unique) - 1))
    members = []
    for i, (config, net_cfg) in enumerate(unique.values()):
        if i % launch.world_size != launch.rank:  # round robin: another rank trains this one
            continue
        size = "" if config.rnn == RNNKind.NONE else str(config.dim)
        name = f"{i:0{width}d}-{config.rnn}{size}-{net_cfg.head}-lr{config.lr:.3g}"
        config = dataclasses.replace(config, out=out / RUNS / name, overwrite=cfg.overwrite or resuming)
        run_record = run_config(config, net_cfg, cache)
        run_dir = claim_run_dir(config, task.name, net_cfg, run_record)
        # One reported run per configuration, by the rank that trains it and writes its folder.
        report = open_reporter(config.report_to, run_dir, run_record, f"{Path(cfg.out).name}/{name}")
        run = Run(config, cache, task, build_network(config, net_cfg, cache, device), readers, device, amp, run_dir, report=report)
        members.append(read_member(run, name, index=i))
    log.info(
        "sweep of %d configurations (%s) on %s (%s): readers %s; %s",
        len(members), cfg.search, cache.path, task.name, ", ".join(f"{s} {r.mode}" for s, r in readers.items()),
        f"{device} {'bf16' if amp else 'fp32'}",
    )
    return members


def claim_sweep_dir(cfg: SweepConfig, sweep_record: dict[str, Any]) -> Path:
    """The sweep folder, held, its sweep-config.json written: an interrupted sweep of this config resumes; another
    non-empty --out is refused unless --overwrite (which replaces only the sweep's own files)."""
    out = Path(cfg.out)
    claim_folder(out, sweep_record, overwrite=cfg.overwrite, own_files=SWEEP_ARTIFACTS, first=SWEEP_CONFIG, last=SWEEP_REPORT, what="sweep")
    return out


# --------------------------------------------------------------------------------------------------
# The pass


def fit_all(members: list[Member], cfg: SweepConfig, launch: distributed.Launch = distributed.SINGLE) -> list[dict[str, Any]]:
    """Epochs of the shared pass (`engine.fit`); returns where each epoch's time went.

    Under torchrun a rerun starts the sweep over (each rank holds only its members), so only one process checkpoints.
    """
    out, timeline = Path(cfg.out), []
    first = 1 if launch.distributed else checkpoint.resume_members(out, members, timeline, cfg.shared.epochs)  # 1, unless an interrupted sweep goes on

    def save(epoch: int, members: list[Member], timeline: list[dict[str, Any]]) -> None:
        if not launch.distributed:
            checkpoint.save_members(out, "sweep", epoch, members, timeline)

    rungs = engine.halving_rungs(cfg.shared.epochs, cfg.eta) if cfg.search == Search.HALVING else frozenset()
    return engine.fit(members, read_pass(members[0].run, save=save, launch=launch, rungs=rungs, eta=cfg.eta), first, timeline)


def score_all(members: list[Member], fitted: list[Fitted]) -> tuple[list[Evaluation], list[Evaluation]]:
    """Validation outputs (kept from each best epoch) and test outputs of the restored networks, test read once."""
    first = members[0].run
    validations: list[Evaluation | None] = [f.validation for f in fitted]
    missing = [i for i, v in enumerate(validations) if v is None]  # nothing trained: scored as it is
    if missing:
        extra = evaluate_many([members[i].run.net for i in missing], first.readers["validation"], device=first.device, amp=first.amp)
        for i, evaluation in zip(missing, extra):
            validations[i] = evaluation
    tests = evaluate_many([m.run.net for m in members], first.readers["test"], device=first.device, amp=first.amp)
    return validations, tests  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The report


def _entry(member: Member, summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("rnn", "dim", "lr", "head", "validation", "test", "trainable_parameters", "epochs_run", "best_epoch", "run_dir")
    curve = [record["validation"]["score"] for record in member.stopping.history]
    return {"name": member.name, "index": member.index, **{k: summary[k] for k in keys}, "ended": member.ended, "validation_curve": curve}


def select(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's selection: the highest validation score (NaN counts as the worst; ties go to the first)."""
    return max(entries, key=lambda e: e["validation"]["score"] if math.isfinite(e["validation"]["score"]) else -math.inf)


def ranked(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The configurations, best validation score first."""
    return sorted(report["configs"], key=lambda e: -e["validation"]["score"] if math.isfinite(e["validation"]["score"]) else math.inf)


def _report(
    cfg: SweepConfig, members: list[Member], entries: list[dict[str, Any]], wall: float, meter: dict[str, Any], timeline: list[dict[str, Any]]
) -> dict[str, Any]:
    run, shared = members[0].run, cfg.shared
    return {
        "task": run.task.name,
        "cache": str(run.cache.path.resolve()),
        "model": run.cache.model,
        "search": cfg.search,
        "eta": cfg.eta if cfg.search == Search.HALVING else None,
        "trials": cfg.trials,
        "lr_range": list(cfg.lr_range) if cfg.trials else None,
        "epochs": shared.epochs,
        "patience": shared.patience,
        "batch_size": shared.batch_size,
        "seed": shared.seed,
        "configurations": len(entries),
        "epochs_trained": sum(e["epochs_run"] for e in entries),
        "wall_seconds": wall,
        "device": str(run.device),
        "threads": shared.threads or training_threads(distributed.detect().local_world_size),
        "reader": {s: r.mode for s, r in run.readers.items()},
        "meter": meter,
        "timeline": timeline,
        "configs": entries,
        "best": select(entries),
    }


def chart(report: dict[str, Any], path: Path) -> None:
    """sweep.png: every configuration's validation score per epoch, the selected one drawn thick."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5))
    best = report["best"]["name"]
    for entry in report["configs"]:
        curve = entry["validation_curve"]
        if not curve:
            continue
        chosen = entry["name"] == best
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, linewidth=2.5 if chosen else 1, alpha=1 if chosen else 0.7, label=entry["name"] + (" (selected)" if chosen else ""))
    metric = report["best"]["validation"]["metric"]
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{report['task']}: {report['configurations']} configurations ({report['search']}), selected {best}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small" if len(report["configs"]) <= 12 else "x-small", ncol=1 + len(report["configs"]) // 16, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)
