"""The paper's hyperparameter search on one cache: seeds, a Bayesian learning-rate search, the best per architecture.

    read-cache sweep --cache caches/t5-base/cola --preset paper --out search/cola          # 32 rounds x 3 architectures x 3 seeds
    read-cache sweep --cache caches/t5-base/cola --rnn gru/256 --lr 3e-4 --seeds 3 --out s  # a grid, mean and std over 3 seeds
    read-cache train --cache caches/t5-base/cola --preset paper --seeds 3                    # Table 9's rate, 3 seeds

Appendix D.2 of the paper: per architecture and task, the learning rate is searched over [1e-6, 3e-3] on a
log scale "for up to 32 rounds" with Bayesian optimisation; the run with the best validation score is kept;
scores are means over 3 seeds. Here one optuna study (TPE) per architecture is driven by ask-and-tell: each
round asks every architecture for its next rate(s), and `read_cache.training.sweep` trains all of them together (one
fused pass per seed, so a configuration's numbers equal a lone `read-cache train` with that seed); each study
is told the mean validation score over the seeds.

    OUT/
      round-NN/seed-S/      one sweep folder per round and seed (sweep.json, runs/)
      search.json           every trial's scores per seed, mean and std; the best trial per architecture; `best`
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from read_cache.config import SearchConfig, SweepConfig, TrainConfig, Trial, check_seeds
from read_cache.errors import ReadCacheError
from read_cache.paper import resolve_lr
from read_cache.store import open_cache
from read_cache.training.runs import claim_folder
from read_cache.util.files import write_json

log = logging.getLogger(__name__)

REPORT = "search.json"
SEEDS_REPORT = "seeds.json"


# --------------------------------------------------------------------------------------------------
# Mean and standard deviation over seeds


def seed_list(first: int, seeds: int) -> list[int]:
    """The seeds a --seeds K run uses: the given seed and the K - 1 after it."""
    return [first + i for i in range(seeds)]


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value); NaN scores make the mean NaN, as they should."""
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 and all(math.isfinite(v) for v in values) else 0.0
    return {"mean": mean, "std": std, "values": values}


def train_seeds(cfg: TrainConfig, seeds: int) -> dict[str, Any]:
    """`read-cache train --seeds K`: the same run with K seeds, each in OUT/seed-S; writes OUT/seeds.json."""
    from read_cache.training.train import train

    check_seeds(seeds)
    out = Path(cfg.out) if cfg.out is not None else Path("runs") / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    summaries = [train(dataclasses.replace(cfg, seed=s, out=out / f"seed-{s}")) for s in seed_list(cfg.seed, seeds)]
    first = summaries[0]
    report = {
        "task": first["task"], "rnn": first["rnn"], "dim": first["dim"], "head": first["head"], "lr": first["lr"],
        "seeds": [s["seed"] for s in summaries], "metric": first["test"]["metric"],
        "validation": spread([s["validation"]["score"] for s in summaries]),
        "test": spread([s["test"]["score"] for s in summaries]),
        "runs": [s["run_dir"] for s in summaries],
    }
    write_json(out / SEEDS_REPORT, report)
    return report


def sweep_seeds(cfg: SweepConfig, seeds: int) -> dict[str, Any]:
    """`read-cache sweep --seeds K`: the sweep once per seed (OUT/seed-S), configurations ranked by mean validation."""
    reports = _sweep_per_seed(cfg, seed_list(cfg.shared.seed, seeds), Path(cfg.out))
    configs = []
    for key, entries in _by_configuration(reports).items():
        first = entries[0]
        configs.append({
            "name": first["name"], "rnn": first["rnn"], "dim": first["dim"], "lr": first["lr"], "head": first["head"],
            "trainable_parameters": first["trainable_parameters"], "metric": first["test"]["metric"],
            "validation": spread([e["validation"]["score"] for e in entries]),
            "test": spread([e["test"]["score"] for e in entries]),
            "runs": [e["run_dir"] for e in entries],
        })
    report = {"task": reports[0]["task"], "seeds": seed_list(cfg.shared.seed, seeds), "configs": configs, "best": best_by_mean(configs)}
    write_json(Path(cfg.out) / SEEDS_REPORT, report)
    return report


def best_by_mean(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry with the highest mean validation score (NaN is the worst; ties go to the first)."""
    return max(entries, key=lambda e: _finite(e["validation"]["mean"]))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _sweep_per_seed(cfg: SweepConfig, seeds: list[int], out: Path) -> list[dict[str, Any]]:
    from read_cache.training.sweep import sweep

    return [
        sweep(dataclasses.replace(cfg, out=out / f"seed-{s}", shared=dataclasses.replace(cfg.shared, seed=s)))
        for s in seeds
    ]


def _by_configuration(reports: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Each configuration's entries, one per seed, keyed by (rnn, dim, lr, head) (names repeat across seeds)."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for report in reports:
        for entry in report["configs"]:
            grouped.setdefault((entry["rnn"], entry["dim"], entry["lr"], entry["head"]), []).append(entry)
    return grouped


# --------------------------------------------------------------------------------------------------
# The Bayesian learning-rate search


def search(cfg: SearchConfig) -> dict[str, Any]:
    """Run the search on `cfg.shared.cache`; writes OUT/search.json and returns it."""
    import optuna

    cfg.validate()
    out = _claim(Path(cfg.out), cfg.overwrite)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    archs = cfg.arch_pairs()
    studies = {
        arch: optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.shared.seed + i))
        for i, arch in enumerate(archs)
    }
    cache = open_cache(cfg.shared.cache)
    first_lr = first_lr_for(cfg, cache.task, cache.geometry.d_model)
    if first_lr is not None:
        for study in studies.values():
            study.enqueue_trial({"lr": first_lr})
    trials: dict[tuple[str, int], list[dict[str, Any]]] = {arch: [] for arch in archs}
    seeds = seed_list(cfg.shared.seed, cfg.seeds)
    low, high = cfg.lr_range
    for round_ in range(cfg.rounds):
        asked = [(arch, studies[arch].ask()) for arch in archs for _ in range(cfg.per_round)]
        configs = [Trial(rnn, dim, t.suggest_float("lr", low, high, log=True), cfg.head) for (rnn, dim), t in asked]
        sweep_cfg = SweepConfig(out=out / f"round-{round_:02d}", configs=tuple(configs), overwrite=cfg.overwrite, shared=cfg.shared)
        grouped = _by_configuration(_sweep_per_seed(sweep_cfg, seeds, sweep_cfg.out))
        for ((rnn, dim), optuna_trial), config in zip(asked, configs):
            entries = grouped[_key(grouped, config)]
            record = _trial_record(round_, config, entries)
            trials[(rnn, dim)].append(record)
            value = record["validation"]["mean"]
            if math.isfinite(value):
                studies[(rnn, dim)].tell(optuna_trial, value)
            else:
                studies[(rnn, dim)].tell(optuna_trial, state=optuna.trial.TrialState.FAIL)
        log.info("search round %d/%d: %s", round_ + 1, cfg.rounds, "; ".join(
            f"{r}/{d} lr {t[-1]['lr']:.3g} -> {t[-1]['validation']['mean']:.4f}" for (r, d), t in trials.items()
        ))
    report = _search_report(cfg, cache.task, trials, seeds, first_lr, time.perf_counter() - started)
    write_json(out / REPORT, report)
    return report


def _key(grouped: dict[tuple, list], config: Trial) -> tuple:
    """The sweep's key of a configuration: its head is resolved (None -> the task's default), so match the rest."""
    for key in grouped:
        if key[:3] == (config.rnn, config.dim, config.lr) and (config.head is None or key[3] == config.head):
            return key
    raise ReadCacheError(f"the search lost configuration {config}; this is a bug, please report it")


def _trial_record(round_: int, config: Trial, entries: list[dict[str, Any]]) -> dict[str, Any]:
    first = entries[0]
    return {
        "round": round_, "rnn": config.rnn, "dim": config.dim, "lr": config.lr, "head": first["head"],
        "trainable_parameters": first["trainable_parameters"], "metric": first["test"]["metric"],
        "validation": spread([e["validation"]["score"] for e in entries]),
        "test": spread([e["test"]["score"] for e in entries]),
        "epochs_run": [e["epochs_run"] for e in entries],
        "runs": [e["run_dir"] for e in entries],
    }


def _search_report(
    cfg: SearchConfig, task: str, trials: dict[tuple[str, int], list[dict[str, Any]]], seeds: list[int], first_lr: float | None, wall: float
) -> dict[str, Any]:
    per_arch = {f"{rnn}/{dim}": {"trials": ts, "best": best_by_mean(ts)} for (rnn, dim), ts in trials.items()}
    best_arch = max(per_arch, key=lambda a: _finite(per_arch[a]["best"]["validation"]["mean"]))
    shared = cfg.shared
    return {
        "task": task, "cache": str(shared.cache), "rounds": cfg.rounds, "per_round": cfg.per_round, "lr_range": list(cfg.lr_range),
        "first_lr": first_lr, "seeds": seeds, "epochs": shared.epochs, "patience": shared.patience,
        "batch_size": shared.batch_size, "recurrence": shared.recurrence, "wall_seconds": wall,
        "architectures": per_arch, "best_architecture": best_arch, "best": per_arch[best_arch]["best"],
    }


def first_lr_for(cfg: SearchConfig, task: str, d_model: int) -> float | None:
    """Table 9's rate for this task under --preset paper (tried first), else what the config says."""
    if cfg.first_lr is not None or cfg.shared.preset != "paper":
        return cfg.first_lr
    try:
        return resolve_lr(None, "paper", task, d_model)
    except ReadCacheError:  # RTE/WNLI: not in Table 9, the optimiser starts from scratch
        return None


def _claim(out: Path, overwrite: bool) -> Path:
    """The search folder, held; a non-empty one is refused unless --overwrite (a search does not resume: its sweeps do)."""
    claim_folder(out, None, overwrite=overwrite, own_files=(REPORT, SEEDS_REPORT), first=None, last=REPORT, what="search")
    return out
