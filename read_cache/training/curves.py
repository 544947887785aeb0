"""curves.png: a run's training loss and validation score per epoch, the best epoch marked (as sweep.png is a sweep's).

Drawn from the run's metrics.jsonl, the record of every epoch (a resumed run's too), once the run is done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from read_cache.training.runs import CURVES, METRICS
from read_cache.util.plots import pyplot, save


def write_curves(run_dir: Path, best_epoch: int, title: str) -> Path:
    """RUN/curves.png from RUN/metrics.jsonl. A run with nothing to train (--rnn none --head lm) gets one too, saying
    so: every finished run folder holds the same files."""
    history = read_history(run_dir / METRICS)
    plt = pyplot()
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    metric = history[-1]["validation"]["metric"] if history else "score"
    _panel(loss_ax, epochs, [r["loss"] for r in history], best_epoch, "training loss")
    _panel(score_ax, epochs, [r["validation"]["score"] for r in history], best_epoch, f"validation {metric}")
    fig.suptitle(f"{title}: best epoch {best_epoch}" if history else f"{title}: nothing to train, scored as it is")
    save(fig, run_dir / CURVES)
    return run_dir / CURVES


def read_history(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _panel(ax: Any, epochs: list[int], values: list[float], best_epoch: int, label: str) -> None:
    ax.plot(epochs, values, marker="o", markersize=3)
    if best_epoch in epochs:
        best = values[epochs.index(best_epoch)]
        ax.axvline(best_epoch, color="#999999", linestyle="--", linewidth=1)
        ax.plot([best_epoch], [best], marker="*", markersize=14, color="#d62728", linestyle="none", label=f"best epoch {best_epoch}: {best:.4g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.xaxis.get_major_locator().set_params(integer=True)
