"""Stage two: train READ's side network from the cache alone (never the backbone, never transformers).

    read-cache train --cache caches/t5-base/sst2 --rnn gru --dim 256

`train(TrainConfig(...))` is the library call behind that command: setup -> fit (AdamW, early stopping
on the validation metric, best state restored) -> score validation and test with GLUE's metric ->
write the run folder:

    RUN/
      config.json               side network + cache identity + this TrainConfig (written first)
      metrics.jsonl             one JSON line per epoch
      side_network.safetensors  the trained weights (with the head and its frozen LM rows)
      curves.png                training loss and validation score per epoch, the best epoch marked
      tensorboard/, wandb/      with --report-to tensorboard / wandb (`read_cache.training.report`)
      summary.json              scores, sizes, speed, energy (written last: its presence means done)
      checkpoint.pt             while training: the state after the last epoch (see `read_cache.training.checkpoint`)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from read_cache import distributed, paths
from read_cache.config import TrainConfig
from read_cache.errors import ReadCacheError
from read_cache.kinds import HeadKind, Pooling, RNNKind
from read_cache.paper import resolve_lr
from read_cache.store import SCALED_ARRAYS, Cache, Split, open_cache
from read_cache.tasks.metrics import majority_baseline, score
from read_cache.tasks.specs import TaskSpec, get_task
from read_cache.training import checkpoint, engine
from read_cache.training.curves import write_curves
from read_cache.training.engine import (
    EarlyStopping,
    Evaluation,
    Fitted,
    Member,
    Pass,
    torch_threads,
)
from read_cache.training.reader import Batch, SplitReader, batch_to, choose_modes
from read_cache.training.report import Reporter, nowhere, open_reporter
from read_cache.training.runs import (
    ARTIFACTS,
    CONFIG,
    METRICS,
    SUMMARY,
    WEIGHTS,
    claim_folder,
    default_folder,
    finished,
)
from read_cache.training.side_network import (
    SideNetwork,
    SideNetworkConfig,
    count_trainable,
    forward_batch,
    parameter_breakdown,
)
from read_cache.util.device import autocast_dtype, pick_device, training_threads
from read_cache.util.energy import Meter
from read_cache.util.files import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARE_BLOCKS = 8
"""Under torchrun, a split of fewer than this many blocks per rank is read in chunk-sized blocks instead."""


@dataclasses.dataclass
class Run:
    """What setup hands to fit and evaluate."""

    cfg: TrainConfig
    cache: Cache
    task: TaskSpec
    net: SideNetwork
    readers: dict[str, SplitReader]
    device: torch.device
    amp: torch.dtype | None
    out: Path
    launch: distributed.Launch = distributed.SINGLE
    """This process's rank under torchrun; rank 0 alone writes the run folder."""
    ddp: torch.nn.Module | None = None
    """`net` wrapped in DistributedDataParallel under torchrun (steps go through it), else None."""
    rank_examples: list[list[int]] = dataclasses.field(default_factory=list)
    """Per epoch, the train examples each rank read (one entry per rank)."""
    report: Reporter = dataclasses.field(default_factory=nowhere)
    """--report-to's reporters of this run (nowhere on ranks that do not write the run folder)."""


# --------------------------------------------------------------------------------------------------
# The verb


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a side network from a cache, score it, write the run folder; returns the summary."""
    started = time.perf_counter()
    with distributed.session(cfg.device) as launch, torch_threads(cfg.threads, launch.local_world_size):
        run = setup(cfg, launch)
        try:
            with Meter() as meter, distributed.peers_alive(launch):
                fitted = fit(run)
            validation = fitted.validation if fitted.validation is not None else evaluate(run, "validation")
            test = evaluate(run, "test")
        except BaseException:
            run.report.close()  # what was logged is kept; save_run closes it otherwise
            raise
    summary = summarize(run, fitted, validation, test, wall_seconds=time.perf_counter() - started, meter=meter.reading.to_dict())
    save_run(run, summary)
    return summary


def summarize(run: Run, fitted: Fitted, validation: Evaluation, test: Evaluation, *, wall_seconds: float, meter: dict[str, Any]) -> dict[str, Any]:
    """summary.json of a finished run: scores with GLUE's metric, sizes, speed, where it ran."""
    cfg = run.cfg
    return {
        "task": run.task.name,
        "cache": str(run.cache.path.resolve()),
        "run_dir": str(run.out),
        "model": run.cache.model,
        "rnn": cfg.rnn,
        "dim": cfg.dim,
        "head": run.net.config.head,
        "pooling": run.net.config.pooling if run.net.config.encoder_only else None,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "trainable_parameters": count_trainable(run.net),
        "parameter_breakdown": parameter_breakdown(run.net),
        "epochs_run": fitted.epochs_run,
        "best_epoch": fitted.best_epoch,
        "validation": score(run.task, validation.predictions, validation.labels),
        "test": score(run.task, test.predictions, test.labels),
        "test_majority_baseline": majority_baseline(run.task, run.cache["train"].labels, test.labels),
        "examples_per_second": fitted.examples_per_second,
        "wall_seconds": wall_seconds,
        "reader": {s: r.mode for s, r in run.readers.items()},
        "device": str(run.device),
        "threads": cfg.threads or training_threads(run.launch.local_world_size),
        "autocast": str(run.amp).removeprefix("torch.") if run.amp else "fp32",
        "meter": meter,
        "world_size": run.launch.world_size,
        "train_examples_per_rank": run.rank_examples,
    }


def save_run(run: Run, summary: dict[str, Any]) -> None:
    """Write the weights and curves.png, then summary.json (last: its presence means the run is done), and give
    the reporters the scores; rank 0 only."""
    if not run.launch.is_main:
        return
    save_file({k: v.detach().cpu().contiguous() for k, v in run.net.state_dict().items()}, str(run.out / WEIGHTS))
    write_curves(run.out, summary["best_epoch"], f"{summary['task']}: {summary['rnn']}/{summary['dim']}, {summary['head']} head, lr {summary['lr']:.3g}")
    write_json(run.out / SUMMARY, summary)
    finished(run.out)
    run.report.finish(summary)
    log.info(
        "best epoch %d: validation %s %.4f, test %s %.4f; run saved to %s",
        summary["best_epoch"], summary["validation"]["metric"], summary["validation"]["score"],
        summary["test"]["metric"], summary["test"]["score"], run.out,
    )


# --------------------------------------------------------------------------------------------------
# setup


def setup(cfg: TrainConfig, launch: distributed.Launch = distributed.SINGLE) -> Run:
    """Validate everything, then open the cache, build the network and readers, and claim --out.

    Under torchrun every rank opens the cache and builds the same network (same seed); rank 0 alone
    claims --out and writes the run folder; each rank reads its share of every split.
    """
    cfg.validate()
    distributed.check_same_arguments(launch, cfg)
    cache, task = distributed.agree(launch, lambda: open_task_cache(cfg))
    cfg = dataclasses.replace(cfg, lr=resolve_lr(cfg.lr, cfg.preset, task.name, cache.geometry.d_model))
    device = pick_device(launch.device or cfg.device)
    amp = autocast_dtype(device, cfg.dtype)
    net_cfg = side_network_config(cfg, cache, task)
    net = build_network(cfg, net_cfg, cache, device)
    readers = make_readers(cfg, cache, launch)
    if launch.world_size > len(readers["train"].bounds):
        raise distributed.RankError(
            f"the train split of {cache.path} is {len(readers['train'].bounds)} blocks, fewer than the {launch.world_size} ranks; "
            "the split is too small to share: launch fewer processes"
        )
    record = run_config(cfg, net_cfg, cache)
    out = distributed.on_main(launch, lambda: claim_run_dir(cfg, task.name, net_cfg, record))
    report = open_reporter(cfg.report_to, out, record, out.name) if launch.is_main else nowhere()  # one writer per run
    log.info(
        "training %s/%d with a %s head on %s (%s): %s trainable parameters; readers %s; %s",
        cfg.rnn, cfg.dim, net_cfg.head, cache.path, task.name, f"{count_trainable(net):,}",
        ", ".join(f"{s} {r.mode}" for s, r in readers.items()), f"{device} {'bf16' if amp else 'fp32'}",
    )
    return Run(cfg, cache, task, net, readers, device, amp, out, launch, data_parallel(net, launch, device), report=report)


def data_parallel(net: SideNetwork, launch: distributed.Launch, device: torch.device) -> torch.nn.Module | None:
    """DistributedDataParallel around `net` under torchrun (it averages gradients over the ranks)."""
    if not launch.distributed or not trainable(net):
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def open_task_cache(cfg: TrainConfig) -> tuple[Cache, TaskSpec]:
    """The --cache (or the last one built), refused unless every split is complete, and its task."""
    cache = open_cache(paths.resolve_cache(cfg.cache), cfg.storage_options)
    cache.require_complete()
    return cache, get_task(cache.task)


def build_network(cfg: TrainConfig, net_cfg: SideNetworkConfig, cache: Cache, device: torch.device) -> SideNetwork:
    """The side network, seeded right before it is built: every network built from one seed starts alike."""
    torch.manual_seed(cfg.seed)
    lm_rows = torch.from_numpy(cache.lm_head_rows()) if net_cfg.head == HeadKind.LM else None
    return SideNetwork(net_cfg, lm_rows).to(device)


def make_readers(cfg: TrainConfig, cache: Cache, launch: distributed.Launch = distributed.SINGLE) -> dict[str, SplitReader]:
    """Train (shuffled by --seed), validation and test readers, in RAM where --memory-budget allows.

    Under torchrun each reads only this rank's share of its split (see `reader.epoch_windows`).
    """
    device = pick_device(launch.device or cfg.device)
    device_budget = None if cfg.device_memory_budget_gb is None else int(cfg.device_memory_budget_gb * 1e9)
    modes = choose_modes(cache, ("train", "validation", "test"), cfg.reader, int(cfg.memory_budget_gb * 1e9), device, device_budget)
    readers = {}
    for split, mode in modes.items():
        readers[split] = shard_reader(
            cache[split], (launch.rank, launch.world_size), block_tokens=cfg.block_tokens, batch_size=cfg.batch_size,
            shuffle=split == "train", seed=cfg.seed, mode=mode, shuffle_blocks=cfg.shuffle_blocks, workers=cfg.reader_workers, device=device,
        )
    return readers


def shard_reader(split: Split, shard: tuple[int, int], *, block_tokens: int | None = None, **options: Any) -> SplitReader:
    """The reader of rank `shard[0]` of `shard[1]`'s share of `split` (`options` as SplitReader takes them).

    Under torchrun a split of too few default (~32 MB) blocks to deal out evenly is read one chunk per block
    (still chunk-aligned); `CacheDataset` shards the same way, so its ranks read what train's would.
    """
    reader = SplitReader(split, block_tokens=block_tokens, shard=shard, **options)
    world_size = shard[1]
    if world_size > 1 and block_tokens is None and len(reader.bounds) < SHARE_BLOCKS * world_size:
        reader = SplitReader(split, block_tokens=split.token_chunk, shard=shard, **options)
    return reader


def side_network_config(cfg: TrainConfig, cache: Cache, task: TaskSpec) -> SideNetworkConfig:
    """The side network this cache and these flags call for; refuses a head the task cannot use."""
    g, info = cache.geometry, cache.info
    encoder_only = g.cross_attention is None
    causal = info.backbone_kind == "decoder"
    has_lm = info.lm_output_scale is not None and cache.lm_head_rows() is not None
    head = cfg.head or (HeadKind.LM.value if has_lm and not task.is_regression and (causal or not encoder_only) else HeadKind.LINEAR.value)
    if head == HeadKind.LM and not task.is_regression and (causal or not encoder_only) and not has_lm:
        raise ReadCacheError(f"--head lm needs the LM-head rows in the cache, and {cache.path} has none; use --head linear or rebuild the cache")
    pooling = cfg.pooling or info.pooling or "mean"
    if info.tokens == "last" and pooling != Pooling.LAST:
        raise ReadCacheError(
            f"--pooling {pooling} needs every token's states, and {cache.path} holds only each example's readout (last) token "
            "(built with --tokens last); leave --pooling out, or rebuild without --tokens last"
        )
    return SideNetworkConfig(
        rnn=cfg.rnn,
        dim=cfg.dim,
        d_model=g.d_model,
        n_encoder_layers=g.n_encoder_layers,
        n_decoder_layers=g.n_decoder_layers,
        encoder_only=encoder_only,
        causal=causal,
        pooling=pooling,
        head=head,
        num_labels=task.num_labels,
        output_scale=info.lm_output_scale if has_lm else 1.0,
        lm_bias=list(info.lm_bias) if has_lm and info.lm_bias is not None else None,
        logit_softcap=info.lm_softcap if has_lm else None,
        recurrence=cfg.recurrence,
    )


def claim_run_dir(cfg: TrainConfig, task: str, net_cfg: SideNetworkConfig, record: dict[str, Any]) -> Path:
    """The run folder, held, with its config.json written: an interrupted run of this record to resume (the --out
    given, or the newest under ./runs), else a new one (see `runs.claim_folder` for what is refused)."""
    dim = 0 if cfg.rnn == RNNKind.NONE else cfg.dim
    out = Path(cfg.out) if cfg.out is not None else default_folder(paths.default_run_dir(task, cfg.rnn, dim, net_cfg.head), record)
    claim_folder(out, record, overwrite=cfg.overwrite, own_files=ARTIFACTS, first=CONFIG, last=SUMMARY)
    return out


def run_config(cfg: TrainConfig, net_cfg: SideNetworkConfig, cache: Cache) -> dict[str, Any]:
    return {"side_network": net_cfg.to_dict(), "cache": cache_record(cache), "train": cfg.to_dict()}


def cache_record(cache: Cache) -> dict[str, Any]:
    """What a run must know about its cache to be used online without it (see `read_cache.inference.predict`)."""
    info = cache.info
    return {
        "path": str(cache.path.resolve()),
        "model": info.model,
        "fingerprint": info.fingerprint,
        "backbone_kind": info.backbone_kind,
        "task": info.task,
        "format_version": info.format_version,
        "max_length": info.max_length,
        "build_batch_size": info.build_batch_size,
        "cross_attention": cache.geometry.cross_attention,
        "float_dtype": cache.geometry.float_dtype,
        "compute_dtype": info.compute_dtype,
        "tokenizer": info.tokenizer,
        "label_words": list(info.label_words) if info.label_words else None,
        "protocol": info.protocol,
        "drop_last_layers": info.drop_last_layers,
        "template": info.template,
        "tokens": info.tokens,
        **channel_record(cache),
    }


def channel_record(cache: Cache) -> dict[str, Any]:
    """The cache's per-channel scales (powers of two: exact in JSON), which predicting online must apply too."""
    scales = {name: cache.channel_scale(name) for name in SCALED_ARRAYS}
    scales = {name: s.tolist() for name, s in scales.items() if s is not None}
    return {"channel_scales": scales} if scales else {}


# --------------------------------------------------------------------------------------------------
# fit


def fit(run: Run) -> Fitted:
    """Train up to --epochs, stop after --patience epochs without a better validation score, restore the best:
    the engine's pass of one member (under torchrun, data-parallel over every rank's share of the blocks)."""
    member = read_member(run)
    if member.optimizer is None:
        log.info("nothing to train (--rnn none --head lm is T5's own zero-shot verbalizer); scoring only")
        return member.stopping.finish()
    timeline: list[dict[str, Any]] = []
    first = checkpoint.resume_members(run.out, [member], timeline, run.cfg.epochs)  # 1, unless an interrupted run goes on

    def save(epoch: int, members: list[Member], timeline: list[dict[str, Any]]) -> None:
        if run.launch.is_main:  # rank 0 alone writes the run folder
            checkpoint.save_members(run.out, "train", epoch, members, timeline)

    bar_total = math.ceil(run.readers["train"].n_examples / run.launch.world_size)
    engine.fit([member], read_pass(run, save=save, data_parallel=run.launch, bar_total=bar_total, rank_examples=run.rank_examples), first, timeline)
    return member.stopping.finish()


def read_member(run: Run, name: str = "", index: int = 0) -> Member:
    """The engine's member for one READ run: its side network, AdamW (None when nothing trains) and early stopping."""
    net = run.net
    optimizer = make_optimizer(run) if trainable(net) else None
    stopping = EarlyStopping(
        run.task, run.cfg.patience, snapshot=lambda: copy.deepcopy(net.state_dict()), restore=net.load_state_dict,
        metrics=run.out / METRICS if run.launch.is_main else None, name=name, on_epoch=run.report.epoch,
    )
    return Member(name, stopping, optimizer, lambda batch, weight: train_step(run, optimizer, batch, weight), index=index, run=run)


def read_pass(run: Run, **options: Any) -> Pass:
    """The engine's pass over a READ cache: `run`'s train batches, validation of every member at once."""
    return Pass(
        epochs=run.cfg.epochs, batches=lambda epoch: train_batches(run, epoch), validate=validate,
        train=lambda members: [m.run.net.train() for m in members], progress=run.cfg.progress,
        bar_total=options.pop("bar_total", run.readers["train"].n_examples), **options,
    )


def train_batches(run: Run, epoch: int) -> Iterator[tuple[Batch, int, float]]:
    """(batch on the device, examples, loss weight) for each step of `epoch` (1-based).

    Under torchrun every rank must step as often as the others (each step all-reduces gradients): a rank
    whose share ran out repeats its last batch with weight 0, adding nothing.
    """
    reader = run.readers["train"]
    steps = max(distributed.gather(run.launch, reader.batches_in(epoch - 1)))
    own = reader.epoch(epoch - 1, next_epoch=epoch if epoch < run.cfg.epochs else None)
    try:
        for batch, fresh in even_steps(own, steps):
            yield batch_to(batch, run.device), len(batch["rows"]) if fresh else 0, 1.0 if fresh else 0.0
    finally:
        own.close()


def even_steps(own: Iterator[T], steps: int) -> Iterator[tuple[T, bool]]:
    """(item, fresh) for `steps` steps of `own`: once it runs out, its last item again with fresh False.

    The one rule for ranks whose shares differ (train's steps and `CacheDataset`'s batches): every rank
    steps as often as the longest share, the repeats adding nothing (their loss weight is 0).
    """
    last: T | None = None
    for _ in range(steps):
        fresh = next(own, None)
        last = fresh if fresh is not None else last
        if last is None:
            raise ValueError("a rank with an empty share has nothing to repeat")
        yield last, fresh is not None


def validate(members: list[Member]) -> list[Evaluation]:
    """Every member's validation outputs, each batch read once for all (one data-parallel run: its ranks' shares)."""
    first = members[0].run
    if first.launch.distributed:
        return [evaluate(first, "validation")]
    return evaluate_many([m.run.net for m in members], first.readers["validation"], device=first.device, amp=first.amp)


def trainable(net: SideNetwork) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def make_optimizer(run: Run) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(run.net), lr=run.cfg.lr, weight_decay=run.cfg.weight_decay)


def train_step(run: Run, optimizer: torch.optim.Optimizer, batch: Batch, weight: float = 1.0) -> float:
    """One optimizer step on one batch already on the device; returns the batch's mean loss.

    `weight` scales the loss before backward: 0 makes a step that only keeps a torchrun rank in time.
    """
    net = run.net
    with torch.autocast(device_type=run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        logits = forward_batch(run.ddp or net, batch)
    loss = net.loss(logits.float(), batch["label"])
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------------------------------
# evaluate


def evaluate(run: Run, split: str) -> Evaluation:
    """The network's outputs on a split; under torchrun each rank scores its share and all get the whole."""
    reader = run.readers[split]
    if not run.launch.distributed:
        return evaluate_split(run.net, reader, device=run.device, amp=run.amp)
    rows = reader.share(0)
    mine = evaluate_split(run.net, reader, device=run.device, amp=run.amp) if len(rows) else None
    every = distributed.gather(run.launch, (rows, mine))
    order = np.argsort(np.concatenate([r for r, _ in every]), kind="stable")
    parts = [e for _, e in every if e is not None]
    logits = np.concatenate([e.logits for e in parts])[order]
    return Evaluation(logits, np.concatenate([e.predictions for e in parts])[order], np.concatenate([e.labels for e in parts])[order])


def evaluate_split(net: SideNetwork, reader: SplitReader, *, device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> Evaluation:
    """The network's outputs on a whole split, read in order without shuffling."""
    return evaluate_many([net], reader, device=device, amp=amp)[0]


@torch.no_grad()
def evaluate_many(nets: list[SideNetwork], reader: SplitReader, *, device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> list[Evaluation]:
    """Every network's outputs on a whole split, each batch read and decoded once for all of them."""
    device = torch.device(device)
    for net in nets:
        net.eval()
    logits: list[list[torch.Tensor]] = [[] for _ in nets]
    labels = []
    for batch in reader.epoch(0):
        batch = batch_to(batch, device)
        for net, out in zip(nets, logits):
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out.append(forward_batch(net, batch).float().cpu())
        labels.append(batch["label"].cpu())
    label_array = torch.cat(labels).numpy()
    evaluations = []
    for net, out in zip(nets, logits):
        joined = torch.cat(out)
        evaluations.append(Evaluation(joined.numpy(), net.predictions(joined).numpy(), label_array))
    return evaluations


# --------------------------------------------------------------------------------------------------
# runs on disk


def load_run(run_dir: str | Path) -> tuple[SideNetwork, dict[str, Any]]:
    """A trained run's side network (eval mode, on the CPU) and its config.json."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file() and not (run_dir / WEIGHTS).is_file():
        raise ReadCacheError(checkpoint.unfinished_message(run_dir))
    if not (run_dir / CONFIG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise ReadCacheError(f"{run_dir} holds no finished run ({CONFIG} and {WEIGHTS} missing); pass a folder `read-cache train` wrote")
    config = json.loads((run_dir / CONFIG).read_text())
    net = SideNetwork(SideNetworkConfig.from_dict(config["side_network"]))
    net.load_state_dict(load_file(str(run_dir / WEIGHTS)))
    return net.eval(), config
