"""The paper's protocol end to end: every task's cache, the search, the architecture chosen across tasks, Table 1.

    read-cache glue --model google-t5/t5-base --preset paper --out glue/t5-base              # the paper's READ row
    read-cache glue --model $MINILM --data-dir ../shared/glue --tasks cola,sst2,mrpc,stsb --limit 2000 --epochs 3 --out glue/minilm

`run_glue(GlueConfig(...))` is the library call behind that command:

1. builds each task's cache under OUT/caches/<task> (a complete one with the same options is skipped; an
   interrupted one resumes);
2. runs `read_cache.protocol.search` on each (every architecture, a Bayesian learning-rate search, K seeds);
3. selects the architecture as appendix D.2 does: each architecture scores the mean over tasks of its best
   mean validation score, the best architecture wins, and its best run per task gives the test scores;
4. writes the table laid out like Table 1, the paper's READ (or READ-large) row beside ours and the difference:

    OUT/
      caches/<task>/        the caches (Zarr)
      search/<task>/        search.json and the round/seed sweep folders
      glue.json             everything below, with every architecture's per-task scores (written last)
      glue.md               Table 1's layout: paper row, our row (mean +- std over seeds), difference
      glue.png              the same as a chart
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from read_cache.config import GlueConfig, SearchConfig
from read_cache.paper import PAPER_SCORES, TABLE1_TASKS, variant_of
from read_cache.tasks.specs import get_task
from read_cache.util.files import write_json
from read_cache.util.plots import pyplot, save

log = logging.getLogger(__name__)

REPORT = "glue.json"
TABLE = "glue.md"
CHART = "glue.png"
COLUMN = {"cola": "CoLA", "mnli": "MNLI", "qnli": "QNLI", "mrpc": "MRPC", "qqp": "QQP", "sst2": "SST-2", "stsb": "STS-B", "rte": "RTE", "wnli": "WNLI"}
METRIC = {"cola": "Matthews", "mnli": "acc", "qnli": "acc", "mrpc": "F1/acc", "qqp": "F1/acc", "sst2": "acc", "stsb": "Pearson/Spearman", "rte": "acc", "wnli": "acc"}


def run_glue(cfg: GlueConfig) -> dict[str, Any]:
    """Build, search, select, and write glue.json / glue.md / glue.png; returns the report."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [get_task(t).name for t in cfg.tasks]
    caches = {task: ensure_cache(cfg, task) for task in tasks}
    build_seconds = time.perf_counter() - started
    searches = {}
    for task in tasks:
        log.info("glue: searching %s (%d of %d)", task, len(searches) + 1, len(tasks))
        searches[task] = search_task(cfg, task, caches[task])
    report = make_report(cfg, searches, caches, build_seconds, time.perf_counter() - started)
    (out / TABLE).write_text(markdown(report))
    chart(report, out / CHART)
    write_json(out / REPORT, report)
    log.info("glue: selected %s; wrote %s, %s, %s", report["selected_architecture"], out / REPORT, out / TABLE, out / CHART)
    return report


# --------------------------------------------------------------------------------------------------
# Caches and searches


def ensure_cache(cfg: GlueConfig, task: str) -> Path:
    """The task's cache: skipped when complete and built with these options, else built (or resumed)."""
    from read_cache.build import build_cache, check_same_build
    from read_cache.store import read_root_attrs
    from read_cache.store.attributes import CacheAttributes

    build_cfg = cfg.build_config(task)
    path = Path(build_cfg.out)
    attrs = read_root_attrs(path) if path.is_dir() else None
    if attrs is not None:
        check_same_build(attrs, build_cfg, path, fingerprint=None)  # refuses a cache of other options
        if CacheAttributes.parse(attrs).complete():
            log.info("glue: %s cache at %s is complete; not rebuilding", task, path)
            return path
    log.info("glue: building the %s cache at %s", task, path)
    build_cache(build_cfg)
    return path


def search_task(cfg: GlueConfig, task: str, cache: Path) -> dict[str, Any]:
    """The search on one task's cache, in OUT/search/<task> (replacing an earlier search there)."""
    from read_cache.protocol.search import search

    base = cfg.search or SearchConfig(out=Path(cfg.out))
    shared = dataclasses.replace(base.shared, cache=cache, out=None)
    return search(dataclasses.replace(base, out=Path(cfg.out) / "search" / task, shared=shared, overwrite=True))


# --------------------------------------------------------------------------------------------------
# Selection and the table


def select_architecture(searches: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """Appendix D.2: each architecture's quality is the mean over tasks of its best mean validation score."""
    archs = list(next(iter(searches.values()))["architectures"])
    quality = {}
    for arch in archs:
        scores = [s["architectures"][arch]["best"]["validation"]["mean"] for s in searches.values()]
        quality[arch] = statistics.fmean(scores) if all(math.isfinite(x) for x in scores) else -math.inf
    return max(quality, key=lambda a: quality[a]), quality


def make_report(cfg: GlueConfig, searches: dict[str, dict[str, Any]], caches: dict[str, Path], build_seconds: float, wall: float) -> dict[str, Any]:
    from read_cache.store import open_cache

    selected, quality = select_architecture(searches)
    first = open_cache(next(iter(caches.values())))
    variant = variant_of(first.info.d_model or 768)
    paper = PAPER_SCORES[variant]
    rows = {}
    for task, s in searches.items():
        best = s["architectures"][selected]["best"]
        ours, std = 100 * best["test"]["mean"], 100 * best["test"]["std"]
        rows[task] = {
            "metric": best["metric"], "test_mean": ours, "test_std": std, "test_values": [100 * v for v in best["test"]["values"]],
            "validation_mean": 100 * best["validation"]["mean"], "lr": best["lr"], "paper": paper.get(task),
            "difference": ours - paper[task] if task in paper else None, "runs": best["runs"],
            "per_architecture": {
                arch: {"validation_mean": 100 * a["best"]["validation"]["mean"], "test_mean": 100 * a["best"]["test"]["mean"], "lr": a["best"]["lr"]}
                for arch, a in s["architectures"].items()
            },
        }
    search_cfg = cfg.search or SearchConfig(out=Path(cfg.out))
    shared = search_cfg.shared
    in_paper = [t for t in rows if t in paper]
    return {
        "model": cfg.model, "backbone_kind": first.info.backbone_kind, "d_model": first.info.d_model,
        "n_encoder_layers": first.geometry.n_encoder_layers, "drop_last_layers": cfg.drop_last_layers,
        "protocol": cfg.protocol, "preset": cfg.preset, "limit": cfg.limit, "data_dir": str(cfg.data_dir) if cfg.data_dir else None,
        "epochs": shared.epochs, "patience": shared.patience, "batch_size": shared.batch_size, "recurrence": shared.recurrence,
        "rounds": search_cfg.rounds, "per_round": search_cfg.per_round, "seeds": search_cfg.seeds,
        "lr_range": list(search_cfg.lr_range), "architectures": list(search_cfg.architectures),
        "paper_variant": variant, "architecture_quality": {a: 100 * q for a, q in quality.items()},
        "selected_architecture": selected, "tasks": rows,
        "average": {
            "ours": statistics.fmean(r["test_mean"] for r in rows.values()),
            "paper_same_tasks": statistics.fmean(paper[t] for t in in_paper) if in_paper else None,
            "ours_same_tasks": statistics.fmean(rows[t]["test_mean"] for t in in_paper) if in_paper else None,
            "paper_all_seven": statistics.fmean(paper.values()),
        },
        "build_seconds": build_seconds, "wall_seconds": wall,
        "searches": {t: str(Path(cfg.out) / "search" / t / "search.json") for t in searches},
    }


def model_name(model: str) -> str:
    """A short name for the table: the hub id, or a folder's name (its parent's where it is just 'model')."""
    path = Path(model)
    if not path.is_absolute() and not path.exists():
        return model
    return path.parent.name if path.name in ("model", "weights", "checkpoint") else path.name


def _cell(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def markdown(report: dict[str, Any]) -> str:
    """Table 1's layout: the paper's row, ours (mean ± std over seeds, x100), and the difference per task."""
    rows, avg = report["tasks"], report["average"]
    columns = [t for t in TABLE1_TASKS if t in rows] + [t for t in rows if t not in TABLE1_TASKS]
    paper_name = "READ-large (paper, T5-large)" if report["paper_variant"] == "read-large" else "READ (paper, T5-base)"
    ours_name = f"ours: {model_name(report['model'])}, {report['selected_architecture'].upper()}"
    header = "| method | " + " | ".join(f"{COLUMN[t]} ({METRIC[t]})" for t in columns) + " | Avg. |"
    lines = [
        f"# GLUE: {model_name(report['model'])} against the paper's Table 1",
        "",
        f"Test scores x 100, GLUE's metric per task; ours are the mean ± standard deviation over {report['seeds']} seed(s) "
        f"of the selected architecture's best run per task. Avg. is over the tasks shown.",
        "",
        header,
        "|" + "---|" * (len(columns) + 2),
        f"| {paper_name} | " + " | ".join(_cell(rows[t]["paper"]) for t in columns) + f" | {_cell(avg['paper_same_tasks'])} |",
        f"| {ours_name} | " + " | ".join(_cell(rows[t]["test_mean"], rows[t]["test_std"]) for t in columns) + f" | {_cell(avg['ours'])} |",
        "| difference | " + " | ".join(_cell(rows[t]["difference"], signed=True) for t in columns)
        + f" | {_cell(None if avg['ours_same_tasks'] is None else avg['ours_same_tasks'] - avg['paper_same_tasks'], signed=True)} |",
        "",
        "Architecture selection (mean over tasks of each architecture's best mean validation score, x 100):",
        "",
        "| architecture | quality | " + " | ".join(f"{COLUMN[t]} val / test (lr)" for t in columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for arch, quality in report["architecture_quality"].items():
        mark = " (selected)" if arch == report["selected_architecture"] else ""
        cells = [rows[t]["per_architecture"][arch] for t in columns]
        lines.append(
            f"| {arch}{mark} | {_cell(quality)} | "
            + " | ".join(f"{_cell(c['validation_mean'])} / {_cell(c['test_mean'])} ({c['lr']:.2g})" for c in cells) + " |"
        )
    lines += [
        "",
        f"Settings: protocol {report['protocol']}, preset {report['preset'] or 'none'}, limit {report['limit'] or 'none'} per split, "
        f"up to {report['epochs']} epochs (patience {report['patience']}), batch {report['batch_size']}, "
        f"{report['rounds']} round(s) x {report['per_round']} learning rate(s) per architecture over "
        f"{report['lr_range'][0]:g}-{report['lr_range'][1]:g}, {report['seeds']} seed(s); "
        f"build {report['build_seconds']:.0f} s, total {report['wall_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """glue.png: per task, the paper's score and ours (with the seeds' std) side by side, the difference above."""
    plt = pyplot()
    import numpy as np

    rows = report["tasks"]
    columns = [t for t in TABLE1_TASKS if t in rows] + [t for t in rows if t not in TABLE1_TASKS]
    x = np.arange(len(columns))
    paper = [rows[t]["paper"] if rows[t]["paper"] is not None else np.nan for t in columns]
    ours = [rows[t]["test_mean"] for t in columns]
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 4.5))
    ax.bar(x - 0.2, paper, 0.4, label="READ-large (paper)" if report["paper_variant"] == "read-large" else "READ (paper, T5-base)", color="#999999")
    ax.bar(x + 0.2, ours, 0.4, yerr=[rows[t]["test_std"] for t in columns], capsize=3, label=f"ours: {model_name(report['model'])}, {report['selected_architecture']}", color="#1f77b4")
    for i, t in enumerate(columns):
        if rows[t]["difference"] is not None:
            ax.annotate(f"{rows[t]['difference']:+.1f}", (x[i], max(paper[i], ours[i]) + 2), ha="center", fontsize=8)
    ax.set_xticks(x, [COLUMN[t] for t in columns])
    ax.set_ylabel("test score x 100")
    ax.set_title(f"GLUE test scores, {report['seeds']} seed(s): ours against the paper's Table 1")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.set_ylim(min(0, *[v - 5 for v in ours if math.isfinite(v)]), 108)
    save(fig, path)
