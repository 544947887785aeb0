"""Train one baseline on the live backbone: READ's splits, label words and metric, a run folder `predict` takes.

    read-cache train --method lora-8 --model t5-small --task sst2 --data-dir ../shared/glue --limit 5000

`train_method(MethodConfig(...))` is the library call: load the backbone and the task's splits
(`load_glue` + the build's prompt and tokenizer step, so the examples are the ones a cache holds),
adapt the backbone, fit with AdamW and early stopping on the validation metric (the best trainable
state restored), score validation and test, and write

    RUN/
      config.json          method, backbone identity, task, tokenization, this MethodConfig (written first)
      metrics.jsonl        one JSON line per epoch
      method.safetensors   the trainable parameters only (the backbone is reloaded from --model)
      curves.png           training loss and validation score per epoch, the best epoch marked
      tensorboard/, wandb/ with --report-to tensorboard / wandb (`read_cache.training.report`)
      summary.json         scores, parameter counts, time, memory (written last: its presence means done)
      checkpoint.pt        while training: the state after the last epoch

The epochs run on READ's engine (`training.engine`: the same loop, early stopping and checkpoints), so an
interrupted run resumes with the same command and ends as an uninterrupted one would (`training.runs`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from read_cache.backbone.load import Backbone, load_backbone
from read_cache.config import MethodConfig
from read_cache.kinds import MethodSpec, parse_method
from read_cache.methods.model import (
    TaskModel,
    backbone_parameters,
    build_task_model,
    head_parameters,
)
from read_cache.tasks.data import load_glue
from read_cache.tasks.metrics import majority_baseline, score
from read_cache.tasks.specs import TaskSpec, get_task
from read_cache.training import checkpoint, engine
from read_cache.training.curves import write_curves
from read_cache.training.engine import (
    EarlyStopping,
    Evaluation,
    Member,
    Pass,
    torch_threads,
)
from read_cache.training.report import Reporter, open_reporter
from read_cache.training.runs import (
    CONFIG,
    METHOD_ARTIFACTS,
    METHOD_WEIGHTS,
    METRICS,
    SUMMARY,
    claim_folder,
    default_folder,
    finished,
)
from read_cache.util.energy import Meter
from read_cache.util.files import write_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The examples, tokenized the way the build tokenizes them


@dataclasses.dataclass
class Splits:
    """Token ids, segment ids (BERT pairs; else None) and labels of train, validation and test."""

    ids: dict[str, list[list[int]]]
    types: dict[str, list[list[int]] | None]
    labels: dict[str, np.ndarray]
    pad_id: int


def load_splits(backbone: Backbone, task: TaskSpec, data_dir: Path | None, limit: int | None, max_length: int = 256) -> Splits:
    from read_cache.backbone.inputs import model_inputs, tokenize

    data = load_glue(task, data_dir, limit)
    ids, types = {}, {}
    for split, d in data.items():
        tok = tokenize(backbone.tokenizer, *model_inputs(backbone.kind, task, d.texts), max_length)
        ids[split], types[split] = tok.ids, tok.type_ids if backbone.uses_token_types else None
    return Splits(ids, types, {s: np.asarray(d.labels) for s, d in data.items()}, backbone.pad_id)


def bucketed_order(ids: list[list[int]], batch_size: int, rng: np.random.Generator, window_batches: int = 50) -> np.ndarray:
    """A shuffled epoch whose batches hold examples of similar length: the backbone then computes on
    little padding (on SST-2, random batches are ~3.8x padding), as the build's length-grouped batches do.
    Windows of `window_batches` random batches are sorted by length, cut, and the batches shuffled."""
    order = rng.permutation(len(ids))
    lengths = np.array([len(x) for x in ids])
    window = batch_size * window_batches
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return np.concatenate([batches[b] for b in rng.permutation(len(batches))])


# --------------------------------------------------------------------------------------------------
# The loop every method on the live backbone shares (online READ in `bench` too)


class Trainer:
    """Shuffled, length-bucketed batches of token ids through `module(ids, mask, types) -> logits`, AdamW."""

    def __init__(self, module: torch.nn.Module, task: TaskSpec, splits: Splits, *, lr: float, batch_size: int = 96,
                 weight_decay: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"):
        self.module, self.task, self.splits, self.batch_size, self.seed = module, task, splits, batch_size, seed
        self.device = torch.device(device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.trainable = sum(p.numel() for p in self.params)

    def batches(self, split: str, order: np.ndarray) -> Any:
        """(rows, input_ids [B, L], mask [B, L], token_type_ids [B, L] or None) per batch of `order`, on the device."""
        from read_cache.backbone.inputs import pad

        ids, types = self.splits.ids[split], self.splits.types[split]
        for i in range(0, len(order), self.batch_size):
            rows = order[i : i + self.batch_size]
            input_ids, mask = pad([ids[r] for r in rows], self.splits.pad_id)
            type_ids = pad([types[r] for r in rows], 0)[0].to(self.device) if types is not None else None
            yield rows, input_ids.to(self.device), mask.to(self.device), type_ids

    def train_batches(self, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, ...], int, float]]:
        """The engine's batches of 0-based `epoch` (its order seeded by (seed, epoch)): ((ids, mask, types, labels), examples, weight 1)."""
        order = bucketed_order(self.splits.ids["train"], self.batch_size, np.random.default_rng([self.seed, epoch]))
        labels = torch.as_tensor(self.splits.labels["train"])
        for rows, input_ids, mask, types in self.batches("train", order):
            yield (input_ids, mask, types, labels[torch.from_numpy(rows)].to(self.device)), len(rows), 1.0

    def step(self, batch: tuple[torch.Tensor, ...], weight: float = 1.0) -> float:
        """One AdamW step on one batch; returns its mean loss."""
        input_ids, mask, types, labels = batch
        loss = self.loss(self.module(input_ids, mask, types), labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        self.optimizer.step()
        return loss.item()

    def member(self, patience: int = 1, metrics: Path | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Member:
        """The engine's member for this module: a `TaskModel`'s trainable state is what early stopping and checkpoints
        keep; any other module (bench's online READ) only steps, with nothing kept."""
        snapshot, restore = getattr(self.module, "trainable_state", dict), getattr(self.module, "load_trainable_state", lambda state: None)
        stopping = EarlyStopping(self.task, patience, snapshot=snapshot, restore=restore, metrics=metrics, on_epoch=on_epoch)
        return Member("", stopping, self.optimizer, self.step)

    def engine_pass(self, epochs: int, progress: bool = False, **options: Any) -> Pass:
        return Pass(
            epochs=epochs, batches=lambda epoch: self.train_batches(epoch - 1), validate=lambda members: [self.evaluate("validation")],
            train=lambda members: self.module.train(), progress=progress, bar_total=len(self.splits.ids["train"]), **options,
        )

    def epoch(self, epoch: int, progress: bool = False, epochs: int | None = None) -> tuple[float, int, float]:
        """One pass over train on the engine (0-based `epoch`); returns (mean loss, examples, seconds)."""
        return engine.train_epoch([self.member()], epoch + 1, self.engine_pass(epochs or epoch + 1, progress))[0]

    @torch.no_grad()
    def evaluate(self, split: str) -> Evaluation:
        self.module.eval()
        ids = self.splits.ids[split]
        order = np.argsort([len(x) for x in ids], kind="stable")  # by length: little padding
        outputs = [self.module(input_ids, mask, types).float().cpu() for _, input_ids, mask, types in self.batches(split, order)]
        logits = torch.empty_like(stacked := torch.cat(outputs))
        logits[torch.from_numpy(order)] = stacked  # back in split order, beside the labels
        predictions = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)
        return Evaluation(logits.squeeze(-1).numpy() if self.task.is_regression else logits.numpy(), predictions.numpy(), self.splits.labels[split])

    def validate(self, split: str = "validation") -> dict[str, Any]:
        """GLUE's metric on `split` (validation, or test once training is over)."""
        ev = self.evaluate(split)
        return score(self.task, ev.predictions, ev.labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.is_regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return torch.nn.functional.cross_entropy(logits, labels.long())


# --------------------------------------------------------------------------------------------------
# The verb


def train_method(cfg: MethodConfig) -> dict[str, Any]:
    """Adapt the backbone with `cfg.method`, fit, score, write the run folder; returns the summary."""
    cfg.validate()
    spec, task = parse_method(cfg.method), get_task(cfg.task)
    started = time.perf_counter()
    with torch_threads(cfg.threads):
        backbone = load_backbone(cfg.model, device=cfg.device, dtype="fp32")
        splits = load_splits(backbone, task, cfg.data_dir, cfg.limit, cfg.max_length)
        counts = {"backbone_parameters": backbone_parameters(backbone.model)}
        module = build_task_model(backbone, task, spec, pooling=cfg.pooling, seed=cfg.seed).to(backbone.device)
        counts |= parameter_counts(module, backbone, task, spec, counts["backbone_parameters"])
        record = run_config(cfg, spec, backbone, task, module)
        out = claim_run_dir(cfg, task, spec, record)
        report = open_reporter(cfg.report_to, out, record, out.name)
        lr = cfg.lr or spec.default_lr
        log.info("training %s on %s (%s): %s trainable parameters (%.3f%% of the backbone), lr %g",
                 spec.label, cfg.model, task.name, f"{counts['trainable_parameters']:,}", counts["trainable_percent"], lr)
        trainer = Trainer(module, task, splits, lr=lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=cfg.seed, device=backbone.device)
        try:
            with Meter() as meter:
                history, best_epoch = fit(trainer, cfg, out, report)
            validation, test = trainer.evaluate("validation"), trainer.evaluate("test")
        except BaseException:
            report.close()  # what was logged is kept; finish closes it otherwise
            raise
    summary = {
        "method": spec.label, "task": task.name, "model": backbone.info["model"], "run_dir": str(out), "lr": lr,
        "batch_size": cfg.batch_size, "seed": cfg.seed, **counts, "epochs_run": len(history), "best_epoch": best_epoch,
        "validation": score(task, validation.predictions, validation.labels),
        "test": score(task, test.predictions, test.labels),
        "test_majority_baseline": majority_baseline(task, splits.labels["train"], test.labels),
        "wall_seconds": time.perf_counter() - started, "device": str(backbone.device), "meter": meter.reading.to_dict(),
    }
    save_file(module.trainable_state(), str(out / METHOD_WEIGHTS))
    write_curves(out, best_epoch, f"{task.name}: {spec.label}, lr {lr:.3g}")
    write_json(out / SUMMARY, summary)
    finished(out)
    report.finish(summary)
    log.info("%s: best epoch %d, validation %s %.4f, test %.4f; run saved to %s", spec.label, best_epoch,
             summary["validation"]["metric"], summary["validation"]["score"], summary["test"]["score"], out)
    return summary


def parameter_counts(module: TaskModel, backbone: Backbone, task: TaskSpec, spec: MethodSpec, n_backbone: int) -> dict[str, Any]:
    """Trainable parameters, the method's formula for them, and their share of the backbone."""
    trainable = sum(p.numel() for p in module.trainable().values())
    expected = spec.module().expected_parameters(backbone.config, backbone.kind, spec.size, backbone.model) + head_parameters(backbone, task)
    if trainable != expected:
        log.warning("%s has %d trainable parameters, its formula says %d", spec.label, trainable, expected)
    return {"trainable_parameters": trainable, "expected_parameters": expected, "trainable_percent": 100 * trainable / n_backbone}


def fit(trainer: Trainer, cfg: MethodConfig, out: Path, report: Reporter | None = None) -> tuple[list[dict[str, Any]], int]:
    """Up to --epochs on the engine, stopping after --patience epochs without a better validation score; the best
    state restored. An interrupted run's checkpoint is resumed first; `report` sees every epoch (--report-to).
    Returns (metrics history, best epoch)."""
    member = trainer.member(cfg.patience, out / METRICS, on_epoch=report.epoch if report is not None else None)
    timeline: list[dict[str, Any]] = []
    first = checkpoint.resume_members(out, [member], timeline, cfg.epochs)

    def save(epoch: int, members: list[Member], timeline: list[dict[str, Any]]) -> None:
        checkpoint.save_members(out, "method", epoch, members, timeline)

    engine.fit([member], trainer.engine_pass(cfg.epochs, cfg.progress, save=save), first, timeline)
    fitted = member.stopping.finish()
    return member.stopping.history, fitted.best_epoch


def claim_run_dir(cfg: MethodConfig, task: TaskSpec, spec: MethodSpec, record: dict[str, Any]) -> Path:
    """The run folder, held, its config.json written: an interrupted run of this record resumes (the --out given, or
    the newest under ./runs); another non-empty --out is refused unless --overwrite (see `runs.claim_folder`)."""
    fresh = Path("runs") / f"{task.name}-{spec.label}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out) if cfg.out is not None else default_folder(fresh, record)
    claim_folder(out, record, overwrite=cfg.overwrite, own_files=METHOD_ARTIFACTS, first=CONFIG, last=SUMMARY)
    return out


def run_config(cfg: MethodConfig, spec: MethodSpec, backbone: Backbone, task: TaskSpec, module: TaskModel) -> dict[str, Any]:
    """What `predict` needs to rebuild the model: the method, the backbone's identity, the task and tokenization."""
    return {
        "method": {"name": spec.name, "size": spec.size, "label": spec.label},
        "backbone": {"model": backbone.info["model"], "fingerprint": backbone.info["fingerprint"], "kind": backbone.kind},
        "task": task.name,
        "label_words": list(task.label_words),
        "max_length": cfg.max_length,
        "pooling": module.pooling,
        "train": cfg.to_dict(),
    }
