"""The six methods `read-cache bench` compares, each run in its own process by `read_cache.bench.run`.

forward       the bare backbone forward pass over every split (what the build cannot avoid)
build         `build_cache` over the same examples
cached_store  E epochs of READ from the store, streamed (nothing held in RAM)
cached_ram    E epochs of READ from the same data held in RAM
interleaved   store and RAM epochs alternated in one process (the robust store/RAM ratio)
online        E epochs of READ the paper's way: a backbone forward for every batch of every epoch
full          E epochs of full fine-tuning: backpropagation through the whole backbone, same head
reader        each store format's read rate (no training step), against memcpy and preadv of its own files
lora-8, ...   E epochs of a baseline of `read_cache.methods` (any `--method` spelling: lora-32, prompt-10, adapter-64, bitfit, lst-8)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from read_cache.bench.common import metered
from read_cache.config import BenchConfig


def _cache_dir(cfg: BenchConfig) -> Path:
    return cfg.out / "cache"


def _result(meter: dict[str, Any], baseline_rss: int, **extra: Any) -> dict[str, Any]:
    return {"meter": meter, "baseline_rss_bytes": baseline_rss, "total_seconds": meter["wall_seconds"], **extra}


def _rss() -> int:
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------------------------------
# Stage one and its baseline


def forward(cfg: BenchConfig) -> dict[str, Any]:
    baseline = _rss()

    def work() -> tuple[float, int]:
        backbone, tokenized = _backbone_and_tokens(cfg)
        started = time.perf_counter()
        bare_forward(backbone, tokenized)
        return time.perf_counter() - started, sum(len(t.ids) for t in tokenized.values())

    (compute, examples), meter = metered(work)
    return _result(meter, baseline, compute_seconds=compute, examples=examples)


def build(cfg: BenchConfig) -> dict[str, Any]:
    from read_cache.build import build_cache
    from read_cache.config import BuildConfig
    from read_cache.store import open_cache

    shutil.rmtree(_cache_dir(cfg), ignore_errors=True)
    baseline = _rss()
    build_cfg = BuildConfig(model=cfg.model, task=cfg.task, data_dir=cfg.data_dir, out=_cache_dir(cfg), limit=cfg.limit, device=cfg.device, progress=False, remember=False)
    report, meter = metered(build_cache, build_cfg)
    cache = open_cache(_cache_dir(cfg))
    raw = disk = values = 0
    for split in cache.splits:
        for name in ("encoder_hidden", "cross_attention", "decoder_hidden"):
            if name in cache[split].array_names():
                arr = cache[split].array(name)
                raw, values = raw + arr.nbytes, values + arr.size
                disk += sum(p.stat().st_size for p in (cache.path / split / name).rglob("*") if p.is_file())
    return _result(meter, baseline, compute_seconds=report.forward_seconds, raw_bytes=raw, disk_bytes=disk, cached_values=values)


def bare_forward(backbone: Any, tokenized: dict[str, Any]) -> None:
    """The bare forward pass over every tokenised split (`split_tokens`), its states dropped: what a build cannot avoid."""
    from read_cache.backbone.forward import forward_batches

    for tok in tokenized.values():
        for _ in forward_batches(backbone, tok.ids, 64, "mean", tok.type_ids):
            pass


def split_tokens(backbone: Any, task: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Every split of `data` (`load_glue`) tokenised for `backbone` as the bare forward reads it."""
    from read_cache.backbone.inputs import model_inputs, tokenize

    return {s: tokenize(backbone.tokenizer, *model_inputs(backbone.kind, task, d.texts), 256) for s, d in data.items()}


def _backbone_and_tokens(cfg: BenchConfig) -> tuple[Any, dict[str, Any]]:
    from read_cache.backbone.load import load_backbone
    from read_cache.tasks.data import load_glue
    from read_cache.tasks.specs import get_task

    task = get_task(cfg.task)
    data = load_glue(task, cfg.data_dir, cfg.limit)
    backbone = load_backbone(cfg.model, device=cfg.device)
    return backbone, split_tokens(backbone, task, data)


# --------------------------------------------------------------------------------------------------
# Cached READ


def cached_store(cfg: BenchConfig) -> dict[str, Any]:
    return _cached(cfg, "stream")


def cached_ram(cfg: BenchConfig) -> dict[str, Any]:
    return _cached(cfg, "ram")


def _cached(cfg: BenchConfig, reader: str) -> dict[str, Any]:
    from read_cache.training.train import TrainConfig, train

    out = cfg.out / "runs" / f"cached-{reader}"
    baseline = _rss()
    train_cfg = TrainConfig(
        cache=_cache_dir(cfg), rnn=cfg.rnn, dim=cfg.dim, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
        patience=cfg.epochs, out=out, overwrite=True, reader=reader, memory_budget_gb=64, device=cfg.device, progress=False,
    )
    (out / "checkpoint.pt").unlink(missing_ok=True)  # a bench times every epoch: never resume a killed bench's run
    summary, meter = metered(train, train_cfg)
    epochs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return _result(
        meter, baseline, epochs_run=len(epochs), epoch_seconds=statistics.median(epochs), epoch_seconds_all=epochs,
        trainable_parameters=summary["trainable_parameters"], validation=summary["validation"], test=summary["test"],
    )


# --------------------------------------------------------------------------------------------------
# Online READ and the baselines of Table 1: the backbone runs at every step


def online(cfg: BenchConfig) -> dict[str, Any]:
    return _slow_method(cfg, online_read_trainer)


def full(cfg: BenchConfig) -> dict[str, Any]:
    return baseline(cfg, "full")


def baseline(cfg: BenchConfig, method: str) -> dict[str, Any]:
    """One of `read_cache.methods` (LoRA, prompt tuning, adapters, BitFit, LST, full) with its default learning rate
    (full tuning: --full-lr), plus its parameter counts against its formula."""
    from read_cache.kinds import parse_method

    spec = parse_method(method)
    counts: dict[str, Any] = {}

    def make_trainer(cfg: BenchConfig) -> Any:
        from read_cache.methods.model import backbone_parameters, build_task_model
        from read_cache.methods.train import Trainer, parameter_counts

        backbone, task, splits = _backbone_and_splits(cfg)
        n_backbone = backbone_parameters(backbone.model)
        module = build_task_model(backbone, task, spec).to(backbone.device)
        counts.update(backbone_parameters=n_backbone, **parameter_counts(module, backbone, task, spec, n_backbone))
        lr = cfg.full_lr if spec.name == "full" else spec.default_lr
        counts["lr"] = lr
        return Trainer(module, task, splits, lr=lr, batch_size=cfg.batch_size, device=backbone.device)

    result = _slow_method(cfg, make_trainer)
    return {**result, **counts, "method": spec.label}


def _backbone_and_splits(cfg: BenchConfig) -> tuple[Any, Any, Any]:
    from read_cache.backbone.load import load_backbone
    from read_cache.methods.train import load_splits
    from read_cache.tasks.specs import get_task

    task = get_task(cfg.task)
    backbone = load_backbone(cfg.model, device=cfg.device)
    return backbone, task, load_splits(backbone, task, cfg.data_dir, cfg.limit)


def _slow_method(cfg: BenchConfig, make_trainer: Any) -> dict[str, Any]:
    """Run `--slow-epochs` epochs (default all), time each, and scale the total to `--epochs`."""
    baseline_rss = _rss()
    run_epochs = cfg.slow_epochs or cfg.epochs

    def work() -> dict[str, Any]:
        setup_started = time.perf_counter()
        trainer = make_trainer(cfg)
        setup = time.perf_counter() - setup_started
        epochs, scores = [], []
        for epoch in range(run_epochs):
            started = time.perf_counter()
            trainer.epoch(epoch)
            scores.append(trainer.validate())
            epochs.append(time.perf_counter() - started)
        return {
            "setup_seconds": setup, "epoch_seconds_all": epochs, "validation_scores": scores,
            "validation": scores[-1], "test": trainer.validate("test"),  # after the last epoch run
            "trainable_parameters": trainer.trainable,
        }

    out, meter = metered(work)
    per_epoch = statistics.median(out["epoch_seconds_all"])
    total = meter["wall_seconds"] + per_epoch * (cfg.epochs - run_epochs)
    return _result(
        meter, baseline_rss, epochs_run=run_epochs, epoch_seconds=per_epoch, total_seconds=total,
        scaled_from_epochs=run_epochs if run_epochs < cfg.epochs else None, **out,
    )


class OnlineRead(torch.nn.Module):
    """READ as the paper trains it: the frozen backbone's forward at every step, then the side network."""

    def __init__(self, backbone: Any, side_network: torch.nn.Module):
        super().__init__()
        self.backbone, self.side_network = backbone, side_network

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        states = self.backbone.forward(input_ids, mask, token_type_ids=types)
        lengths = mask.sum(1)
        clone = lambda t: None if t is None else t.clone().float()  # noqa: E731 - leave inference mode
        return self.side_network(
            enc=clone(states.encoder_hidden), token_example=torch.repeat_interleave(torch.arange(len(lengths), device=mask.device), lengths),
            n_examples=len(lengths), cross=clone(states.cross_attention), dec=clone(states.decoder_hidden),
        )


def online_read_trainer(cfg: BenchConfig) -> Any:
    from read_cache.backbone.inputs import input_template
    from read_cache.methods.model import scores_label_words
    from read_cache.methods.train import Trainer
    from read_cache.training.side_network import SideNetwork, SideNetworkConfig

    bb, task, splits = _backbone_and_splits(cfg)
    lm = bb.lm_head(task.label_words, input_template(bb.kind, task)) if scores_label_words(bb, task) else None
    net_cfg = SideNetworkConfig(
        rnn=cfg.rnn, dim=cfg.dim, d_model=bb.d_model, n_encoder_layers=bb.n_encoder_layers, n_decoder_layers=bb.n_decoder_layers,
        encoder_only=bb.kind != "t5", causal=bb.kind == "decoder", pooling=bb.info.get("pooling", "mean"), head="lm" if lm else "linear",
        num_labels=task.num_labels, output_scale=lm["output_scale"] if lm else 1.0,
        lm_bias=lm.get("bias") if lm else None, logit_softcap=lm.get("softcap") if lm else None,
    )
    torch.manual_seed(0)
    net = SideNetwork(net_cfg, torch.from_numpy(lm["rows"]) if lm else None)
    return Trainer(OnlineRead(bb, net).to(bb.device), task, splits, lr=cfg.lr, batch_size=cfg.batch_size, device=bb.device)


# --------------------------------------------------------------------------------------------------
# Store against RAM, interleaved


def interleaved(cfg: BenchConfig, epochs: int = 5) -> dict[str, Any]:
    """Epochs from the store and from RAM, alternated in one process so both see the same machine.

    Separate processes run minutes apart, and on a shared machine that alone can swing an epoch's time
    by 30%; alternating epochs cancels slow drifts. The RAM split is loaded, and the streaming reader's
    first window read, before timing starts.
    """
    from read_cache.training import engine
    from read_cache.training.train import TrainConfig, read_member, read_pass, setup

    runs = {}
    for mode in ("stream", "ram"):
        runs[mode] = setup(TrainConfig(
            cache=_cache_dir(cfg), rnn=cfg.rnn, dim=cfg.dim, lr=cfg.lr, batch_size=cfg.batch_size, epochs=epochs,
            out=cfg.out / "runs" / f"interleaved-{mode}", overwrite=True, reader=mode, memory_budget_gb=64, device=cfg.device, progress=False,
        ))
    # Each reader's one-time start is paid before timing: RAM loads the split, streaming reads its
    # first window (later epochs get theirs read ahead during the epoch before).
    runs["ram"].readers["train"].load()
    runs["stream"].readers["train"].read_first_window(1).result()
    members = {mode: read_member(run) for mode, run in runs.items()}  # each with its own AdamW, as `train` makes it
    reading: dict[str, list[float]] = {"stream": [], "ram": []}
    passes = {mode: read_pass(run) for mode, run in runs.items()}
    passes = {mode: dataclasses.replace(p, batches=_timed(p.batches, reading[mode])) for mode, p in passes.items()}
    seconds: dict[str, list[float]] = {"stream": [], "ram": []}
    baseline = _rss()

    def work() -> None:
        for epoch in range(1, epochs + 1):
            order = ("stream", "ram") if epoch % 2 else ("ram", "stream")
            for mode in order:
                seconds[mode].append(engine.train_epoch([members[mode]], epoch, passes[mode])[0][2])

    _, meter = metered(work)
    store, ram = statistics.median(seconds["stream"]), statistics.median(seconds["ram"])
    # Each epoch's store run beside its RAM run (back to back, in alternating order): the machine's drift over the
    # minutes the runs take cancels within a pair, where the ratio of the two medians still carries it.
    paired = statistics.median(s / r for s, r in zip(seconds["stream"], seconds["ram"]))
    return _result(
        meter, baseline, epoch_seconds_store=store, epoch_seconds_ram=ram, epoch_seconds_all=seconds, store_over_ram=store / ram,
        store_over_ram_paired=paired, epochs_each=epochs, reading_seconds_all=reading,
    )


def _timed(batches: Callable[[int], Iterable[Any]], spent: list[float]) -> Callable[[int], Iterator[Any]]:
    """`batches` that appends each epoch's seconds spent waiting for its batches (reading, decoding, the device copy) to
    `spent`: what the tier itself costs, apart from the steps (which vary by several % from epoch to epoch here)."""

    def timed(epoch: int) -> Iterator[Any]:
        batches_of_epoch, waited = iter(batches(epoch)), 0.0
        try:
            while True:
                started = time.perf_counter()
                try:
                    item = next(batches_of_epoch)
                except StopIteration:
                    return
                finally:
                    waited += time.perf_counter() - started
                yield item
        finally:
            spent.append(waited)

    return timed


# --------------------------------------------------------------------------------------------------
# The store formats' read rate (read_cache.bench.reader)


def reader(cfg: BenchConfig) -> dict[str, Any]:
    from read_cache.bench.reader import reader as measure

    return measure(cfg)


REGISTRY: dict[str, Any] = {
    "forward": forward,
    "build": build,
    "cached_store": cached_store,
    "cached_ram": cached_ram,
    "interleaved": interleaved,
    "online": online,
    "full": full,
    "reader": reader,
}
"""Bench's own methods by name, in report order (`kinds.BENCH_METHODS` names the same, torch-free); anything
else `--methods` takes is a baseline of `read_cache.methods`, run by `baseline`."""
