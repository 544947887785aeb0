"""--report-to: each epoch's training loss, validation score and examples/s, and once the run's config, to
TensorBoard and/or Weights & Biases, besides metrics.jsonl (always written).

    reporter = open_reporter(("tensorboard",), run_dir, record, name="sst2-gru256")
    EarlyStopping(..., on_epoch=reporter.epoch)     # every epoch's record
    reporter.finish(summary)                         # the test score at the best epoch; closes

TensorBoard writes RUN/tensorboard/ through torch.utils.tensorboard (`tensorboard --logdir runs` shows every
run; a sweep's configurations are one run each under SWEEP/runs/). W&B starts one run per run folder with
dir=RUN (set WANDB_MODE=offline to keep it on disk). The config logged is the run's config.json record
(`config.record`: storage_options masked), so no secret reaches a dashboard. Only the process that writes a
run folder reports it (rank 0 under torchrun). Which reporters exist, and their packages, is
`kinds.REPORTERS`; `config.TrainingOptions.validate` refuses an unknown one or a missing package before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from read_cache.training.runs import TENSORBOARD


class Sink(Protocol):
    def epoch(self, record: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """One epoch's numbers under the names every reporter uses."""
    validation = record["validation"]
    return {
        "train/loss": record["loss"],
        f"validation/{validation['metric']}": validation["score"],
        "train/examples_per_second": record["examples_per_second"],
    }


def final_scalars(summary: dict[str, Any]) -> dict[str, float]:
    return {f"test/{summary['test']['metric']}": summary["test"]["score"], f"best/validation_{summary['validation']['metric']}": summary["validation"]["score"]}


class TensorBoardSink:
    def __init__(self, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD))
        # Markdown: an indented block keeps the JSON readable in TensorBoard's text tab.
        self.writer.add_text("config", "    " + json.dumps(config, indent=2, default=str).replace("\n", "\n    "), 0)

    def epoch(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # a dashboard open during training sees each epoch as it ends

    def finish(self, summary: dict[str, Any]) -> None:
        for tag, value in final_scalars(summary).items():
            self.writer.add_scalar(tag, value, summary["best_epoch"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, config: dict[str, Any], name: str):
        import wandb

        # WANDB_MODE (online, offline, disabled) is read from the environment by wandb itself. "create_new": a sweep
        # keeps one W&B run per configuration open at once (wandb >= 0.19.10, the `wandb` extra's floor).
        self.run = wandb.init(dir=str(out), config=config, name=name, reinit="create_new")

    def epoch(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["epoch"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({**final_scalars(summary), "best_epoch": summary["best_epoch"]})

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """A run's reporters together; `epoch` is `EarlyStopping`'s on_epoch hook. Closing twice is harmless."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def epoch(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.epoch(record)

    def finish(self, summary: dict[str, Any]) -> None:
        """The finished run's scores, then close."""
        for sink in self.sinks:
            sink.finish(summary)
        self.close()

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def nowhere() -> Reporter:
    """The reporter of --report-to none, and of every rank that does not write the run folder."""
    return Reporter([])


def open_reporter(names: tuple[str, ...] | list[str], out: Path, config: dict[str, Any], name: str) -> Reporter:
    """The reporters `names` asks for (already validated), logging `config` (a masked record) once."""
    sinks: list[Sink] = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(out, config))
    if "wandb" in names:
        sinks.append(WandbSink(out, config, name))
    return Reporter(sinks)
