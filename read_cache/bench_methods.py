"""The six methods `read-cache bench` compares, each run in its own process by `read_cache.bench`.

forward       the bare backbone forward pass over every split (what the build cannot avoid)
build         `build_cache` over the same examples
cached_store  E epochs of READ from the store, streamed (nothing held in RAM)
cached_ram    E epochs of READ from the same data held in RAM
interleaved   store and RAM epochs alternated in one process (the robust store/RAM ratio)
online        E epochs of READ the paper's way: a backbone forward for every batch of every epoch
full          E epochs of full fine-tuning: backpropagation through the whole backbone, same head
reader        each store format's read rate (no training step), against the raw read+decode limit
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from read_cache.bench import BenchConfig, metered


def _cache_dir(cfg: BenchConfig) -> Path:
    return cfg.out / "cache"


def _result(meter: dict[str, Any], baseline_rss: int, **extra: Any) -> dict[str, Any]:
    return {"meter": meter, "baseline_rss_bytes": baseline_rss, "total_seconds": meter["wall_seconds"], **extra}


def _rss() -> int:
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------------------------------
# Stage one and its baseline


def forward(cfg: BenchConfig) -> dict[str, Any]:
    from read_cache.build import forward_batches

    baseline = _rss()

    def work() -> tuple[float, int]:
        backbone, tokenized = _backbone_and_tokens(cfg)
        started = time.perf_counter()
        for tok in tokenized.values():
            for _ in forward_batches(backbone, tok.ids, 64, "mean", tok.type_ids):
                pass
        return time.perf_counter() - started, sum(len(t.ids) for t in tokenized.values())

    (compute, examples), meter = metered(work)
    return _result(meter, baseline, compute_seconds=compute, examples=examples)


def build(cfg: BenchConfig) -> dict[str, Any]:
    from read_cache.build import BuildConfig, build_cache
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


def _backbone_and_tokens(cfg: BenchConfig) -> tuple[Any, dict[str, Any]]:
    from read_cache.backbone import load_backbone
    from read_cache.build import model_inputs, tokenize
    from read_cache.data import load_glue
    from read_cache.tasks import get_task

    task = get_task(cfg.task)
    data = load_glue(task, cfg.data_dir, cfg.limit)
    backbone = load_backbone(cfg.model, device=cfg.device)
    return backbone, {s: tokenize(backbone.tokenizer, *model_inputs(backbone.kind, task, d.texts), 256) for s, d in data.items()}


# --------------------------------------------------------------------------------------------------
# Cached READ


def cached_store(cfg: BenchConfig) -> dict[str, Any]:
    return _cached(cfg, "stream")


def cached_ram(cfg: BenchConfig) -> dict[str, Any]:
    return _cached(cfg, "ram")


def _cached(cfg: BenchConfig, reader: str) -> dict[str, Any]:
    from read_cache.train import TrainConfig, train

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
# Online READ and full fine-tuning: the backbone runs at every step


def online(cfg: BenchConfig) -> dict[str, Any]:
    return _slow_method(cfg, OnlineReadTrainer)


def full(cfg: BenchConfig) -> dict[str, Any]:
    return _slow_method(cfg, FullFineTuneTrainer)


def _slow_method(cfg: BenchConfig, make_trainer: Any) -> dict[str, Any]:
    """Run `--slow-epochs` epochs (default all), time each, and scale the total to `--epochs`."""
    baseline = _rss()
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
            "test": trainer.validate("test"),  # after the last epoch run
            "trainable_parameters": trainer.trainable,
        }

    out, meter = metered(work)
    per_epoch = statistics.median(out["epoch_seconds_all"])
    total = meter["wall_seconds"] + per_epoch * (cfg.epochs - run_epochs)
    return _result(
        meter, baseline, epochs_run=run_epochs, epoch_seconds=per_epoch, total_seconds=total,
        scaled_from_epochs=run_epochs if run_epochs < cfg.epochs else None, **out,
    )


class _Trainer:
    """The loop online READ and full fine-tuning share: shuffled batches of token ids, AdamW."""

    def __init__(self, cfg: BenchConfig):
        from read_cache.tasks import get_task

        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.backbone, tokenized = _backbone_and_tokens(cfg)
        self.ids = {split: tok.ids for split, tok in tokenized.items()}
        # Segment ids for encoders that read them (BERT pairs); None elsewhere.
        self.types = {split: tok.type_ids if self.backbone.uses_token_types else None for split, tok in tokenized.items()}
        # Encoders pool the way their family does (the cached READ run defaults to the same).
        self.pooling = self.backbone.info.get("pooling", "mean")
        from read_cache.data import load_glue

        data = load_glue(self.task, cfg.data_dir, cfg.limit)
        self.labels = {split: np.asarray(d.labels) for split, d in data.items()}
        self.pad_id = self.backbone.tokenizer.pad_token_id or 0

    def batches(self, ids: list[list[int]], types: list[list[int]] | None, order: np.ndarray) -> Any:
        """(rows, input_ids [B, L], mask [B, L], token_type_ids [B, L] or None) per batch of `order`."""
        from read_cache.build import pad

        for i in range(0, len(order), self.cfg.batch_size):
            rows = order[i : i + self.cfg.batch_size]
            type_ids = pad([types[r] for r in rows], 0)[0] if types is not None else None
            yield rows, *pad([ids[r] for r in rows], self.pad_id), type_ids

    def epoch(self, epoch: int) -> None:
        order = bucketed_order(self.ids["train"], self.cfg.batch_size, np.random.default_rng([0, epoch]))
        labels = torch.as_tensor(self.labels["train"])
        self.module.train()
        for rows, input_ids, mask, types in self.batches(self.ids["train"], self.types["train"], order):
            loss = self.loss(self.logits(input_ids, mask, types), labels[torch.from_numpy(rows)])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def validate(self, split: str = "validation") -> dict[str, Any]:
        """GLUE's metric on `split` (validation, or test once training is over)."""
        from read_cache.metrics import score

        self.module.eval()
        order = np.argsort([len(x) for x in self.ids[split]], kind="stable")  # by length: little padding
        outputs = [self.logits(ids, mask, types) for _, ids, mask, types in self.batches(self.ids[split], self.types[split], order)]
        logits = torch.empty_like(stacked := torch.cat(outputs))
        logits[torch.from_numpy(order)] = stacked  # back in split order, beside the labels
        predictions = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)
        return score(self.task, predictions.numpy(), self.labels[split])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.is_regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return torch.nn.functional.cross_entropy(logits, labels.long())


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


class OnlineReadTrainer(_Trainer):
    """READ as the paper trains it: the frozen backbone's forward at every step, then the side network."""

    def __init__(self, cfg: BenchConfig):
        super().__init__(cfg)
        from read_cache.side_network import SideNetwork, SideNetworkConfig, count_trainable

        bb = self.backbone
        lm = bb.lm_head(self.task.label_words) if bb.kind == "t5" and self.task.label_words else None
        net_cfg = SideNetworkConfig(
            rnn=cfg.rnn, dim=cfg.dim, d_model=bb.d_model, n_encoder_layers=bb.n_encoder_layers, n_decoder_layers=bb.n_decoder_layers,
            encoder_only=bb.kind == "encoder", pooling=self.pooling, head="lm" if lm else "linear", num_labels=self.task.num_labels,
            output_scale=lm["output_scale"] if lm else 1.0,
        )
        torch.manual_seed(0)
        self.module = SideNetwork(net_cfg, torch.from_numpy(lm["rows"]) if lm else None)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=cfg.lr)
        self.trainable = count_trainable(self.module)

    def logits(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        states = self.backbone.forward(input_ids, mask, token_type_ids=types)
        lengths = mask.sum(1)
        clone = lambda t: None if t is None else t.clone().float()  # noqa: E731 - leave inference mode
        return self.module(
            enc=clone(states.encoder_hidden), token_example=torch.repeat_interleave(torch.arange(len(lengths)), lengths),
            n_examples=len(lengths), cross=clone(states.cross_attention), dec=clone(states.decoder_hidden),
        )


class FullFineTuneTrainer(_Trainer):
    """Full fine-tuning: every backbone weight trains, behind the same head (T5: its LM head on the label words;
    encoders: a linear head on the tokens pooled the way READ pools them)."""

    def __init__(self, cfg: BenchConfig):
        super().__init__(cfg)
        bb = self.backbone
        self.module = bb.model.train().requires_grad_(True)
        if bb.kind == "t5" and self.task.label_words:
            self.label_ids = torch.tensor([bb.first_token(w) for w in self.task.label_words])
            self.head = None
        else:
            self.head = torch.nn.Linear(bb.d_model, self.task.num_labels)
        params = list(self.module.parameters()) + (list(self.head.parameters()) if self.head else [])
        self.optimizer = torch.optim.AdamW(params, lr=cfg.full_lr)
        self.trainable = sum(p.numel() for p in params)

    def logits(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        bb = self.backbone
        if bb.kind == "encoder":
            extra = {"token_type_ids": types} if types is not None else {}
            hidden = self.module(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state  # [B, L, d]
            if self.pooling == "first":
                return self.head(hidden[:, 0])
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return self.head(pooled)
        start = torch.full((len(input_ids), 1), bb.config.decoder_start_token_id)
        out = self.module(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start, output_hidden_states=self.head is not None)
        if self.head is None:
            return out.logits[:, 0, self.label_ids]
        return self.head(out.decoder_hidden_states[-1][:, 0])


# --------------------------------------------------------------------------------------------------
# Store against RAM, interleaved


def interleaved(cfg: BenchConfig, epochs: int = 3) -> dict[str, Any]:
    """Epochs from the store and from RAM, alternated in one process so both see the same machine.

    Separate processes run minutes apart, and on a shared machine that alone can swing an epoch's time
    by 30%; alternating epochs cancels slow drifts. The RAM split is loaded before timing starts.
    """
    from read_cache.train import TrainConfig, setup, train_epoch

    runs = {}
    for mode in ("stream", "ram"):
        runs[mode] = setup(TrainConfig(
            cache=_cache_dir(cfg), rnn=cfg.rnn, dim=cfg.dim, lr=cfg.lr, batch_size=cfg.batch_size, epochs=epochs,
            out=cfg.out / "runs" / f"interleaved-{mode}", overwrite=True, reader=mode, memory_budget_gb=64, device=cfg.device, progress=False,
        ))
    runs["ram"].readers["train"].load()
    optimizers = {mode: torch.optim.AdamW(run.net.parameters(), lr=cfg.lr) for mode, run in runs.items()}
    seconds: dict[str, list[float]] = {"stream": [], "ram": []}
    baseline = _rss()

    def work() -> None:
        for epoch in range(1, epochs + 1):
            order = ("stream", "ram") if epoch % 2 else ("ram", "stream")
            for mode in order:
                seconds[mode].append(train_epoch(runs[mode], optimizers[mode], epoch, None)[2])

    _, meter = metered(work)
    store, ram = statistics.median(seconds["stream"]), statistics.median(seconds["ram"])
    return _result(meter, baseline, epoch_seconds_store=store, epoch_seconds_ram=ram, epoch_seconds_all=seconds, store_over_ram=store / ram, epochs_each=epochs)


# --------------------------------------------------------------------------------------------------
# The store formats' read rate (read_cache.bench_reader)


def reader(cfg: BenchConfig) -> dict[str, Any]:
    from read_cache.bench_reader import reader as measure

    return measure(cfg)
