"""The configs behind every command, kept free of torch and transformers so that flags are checked at once.

    from read_cache.config import TrainConfig
    TrainConfig(dim=0).validate()   # ReadCacheError: --dim 0 must be a positive RNN hidden size ...

The CLI builds one of these from its flags and calls `validate()` before it imports the heavy stages
(`read_cache.build`, `read_cache.training.train`, ...), so a typo costs well under a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from read_cache.errors import ReadCacheError
from read_cache.kinds import (
    BENCH_METHODS,
    CACHED_TOKENS,
    CODECS,
    COMPUTE_DTYPES,
    CROSS_ATTENTION,
    HEADS,
    METHOD_NAMES,
    POOLINGS,
    PROTOCOLS,
    READER_MODES,
    RNN_KINDS,
    STORE_DTYPES,
    TRAIN_DTYPES,
    check_choice,
    check_installed,
    check_reporters,
    is_method,
    parse_method,
    positive_int,
    task_name,
)
from read_cache.paper import DEFAULT_LR, PAPER, check_preset
from read_cache.paths import check_location, redact_options

T = TypeVar("T")

EXAMPLES = {"--tasks": "cola,sst2,mrpc,stsb", "--rnn": "gru,lstm", "--dim": "128,256", "--lr": "1e-4,3e-4,1e-3", "--head": "lm,linear", "--report-to": "tensorboard,wandb"}

@dataclasses.dataclass
class BuildConfig:
    """Everything `read-cache build` takes; the identity fields must match to resume a cache."""

    model: str
    """Hub id or local folder of a T5-family, encoder-only (BERT family) or decoder-only (causal LM) checkpoint."""
    task: str
    """GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)."""
    data_dir: Path | None = None
    """Local GLUE folder (TSV or parquet layout); None reads the hub."""
    out: Path | str | None = None
    """Cache folder or object-store URL (s3://bucket/prefix, gs://, az://, memory://...); None means
    `$READ_CACHE_HOME/caches/<model>/<task>`."""
    limit: int | None = None
    """Cap on the examples of each split (after the split recipe)."""
    max_length: int = 256
    """Longer inputs are truncated to this many tokens (and counted)."""
    dtype: str | None = None
    """Compute dtype: bf16, fp16 or fp32; None picks what is fast on the device."""
    device: str | None = None
    """'cuda', 'cpu', ...; None picks CUDA when present."""
    batch_size: int = 64
    """Examples per forward pass (batches are grouped by length)."""
    cross_attention: str = "mean"
    """'mean' over heads (the paper's single head) or 'heads' to keep every head."""
    float_dtype: str = "int8"
    """`--store-dtype`: 'bfloat16' (T5's range), 'float16', or 8-/4-bit codes with scales 'fp8', 'int8', 'int4'.
    The default was chosen by measurement (docs/storage.md: size, error and READ scores)."""
    codec: str = "auto"
    """`--codec`: 'auto' (raw 8-/4-bit codes, which read fastest; zstd for 16-bit floats, the compressed store
    older caches hold), 'none' (a 16-bit cache to stream: ~23x faster for ~1.35x the bytes), 'zstd' (12-19% smaller
    8-/4-bit caches, decoded 14-60x slower) or 'lz4'. Measurements: docs/storage.md."""
    revision: str | None = None
    """Hub revision of the model."""
    chunk_mb: float = 4.0
    """Target raw size of a token chunk in MiB (DESIGN: 1-8 MB); the store's default (`store.layout.CHUNK_BYTES`)."""
    force: bool = False
    """Build even when the disk estimate says it will not fit."""
    overwrite: bool = False
    """Delete the cache already at the output folder (whatever it holds) and build anew."""
    remember: bool = True
    """Record the cache as the "last cache built" that `read-cache train` uses by default (bench's own caches do not)."""
    dry_run: bool = False
    """Tokenise every split (tokenizer and config only, no weights), print the projected size per format, stop."""
    progress: bool = True
    protocol: str = "t5"
    """'t5' (this package's splits, T5's label words) or 'lst' (Ladder Side-Tuning's splits, label digits)."""
    drop_last_layers: int = 0
    """Drop the model's last K encoder and decoder layers before the forward pass (READ-large: 4 of T5-large's 24)."""
    tokens: str = "all"
    """`--tokens`: cache every token's states ('all'), or, for decoder-only models, the readout token's alone ('last')."""
    prompt: str | None = None
    """`--prompt`: decoder-only models' input template, one `{field}` per text field of the task, ending where the label
    word would follow; None: the task's own (`TaskSpec.lm_template`: its T5 text, then a line 'answer:')."""
    storage_options: dict[str, Any] | None = None
    """Options for the object store at a URL --out (`--storage-options JSON`): obstore's `from_url` keys for
    s3://, gs://, az://, fsspec's for other URLs; None: the service's environment variables alone."""

    def validate(self) -> None:
        check_choice("--protocol", self.protocol, PROTOCOLS, " (t5: T5's label words; lst: Ladder Side-Tuning's splits and label digits)")
        if self.drop_last_layers < 0:
            raise ReadCacheError(f"--drop-last-layers {self.drop_last_layers} must be 0 or more (READ-large drops 4)")
        if self.limit is not None and self.limit <= 0:
            raise ReadCacheError(f"--limit {self.limit} must be a positive number of examples per split (or left out)")
        if self.max_length < 2:
            raise ReadCacheError(f"--max-length {self.max_length} must be at least 2 tokens")
        if self.batch_size <= 0:
            raise ReadCacheError(f"--batch-size {self.batch_size} must be positive")
        check_choice("--cross-attention", self.cross_attention, CROSS_ATTENTION)
        if not 0 < self.chunk_mb <= 256:
            raise ReadCacheError(f"--chunk-mb {self.chunk_mb} must be in (0, 256]")
        if self.dtype is not None:
            check_choice("--dtype", self.dtype, COMPUTE_DTYPES, " (or leave it out to pick what is fast here)")
        task_name(self.task)
        check_choice("--store-dtype", self.float_dtype, STORE_DTYPES, " (see docs/storage.md)")
        check_choice("--codec", self.codec, CODECS, " (see docs/storage.md)")
        check_choice("--tokens", self.tokens, CACHED_TOKENS, " (last: the readout token alone, decoder-only models)")
        if self.prompt is not None and not self.prompt.strip():
            raise ReadCacheError("--prompt is empty; pass a template with one {field} per text field, e.g. 'Review: {sentence}\\nSentiment:'")
        check_location("--out", self.out, self.storage_options)



@dataclasses.dataclass(kw_only=True)
class TrainingOptions:
    """What both ways of training take: READ from a cache (`TrainConfig`) and a baseline on the live backbone (`MethodConfig`).

    Keyword-only, so each subclass keeps its own fields' positions first."""

    pooling: str | None = None
    """Encoder-only and decoder-only backbones: pool tokens by 'mean' or take the 'first' or 'last' token; None: the way
    the backbone's family pools (mean for sentence-transformers models, first for BERT classifiers, last for causal
    LMs), for READ as the build recorded it."""
    lr: float | None = None
    """AdamW learning rate; None: READ's 1e-3, or with --preset paper Table 9's rate for the cache's task;
    a baseline's own default (`read_cache.kinds.METHOD_LR`)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 96
    """Examples per step (the paper's 96)."""
    epochs: int = 30
    """Most epochs to run (the paper's 30)."""
    patience: int = 5
    """Stop after this many epochs without a better validation score."""
    seed: int = 0
    """Seeds the initialisation and the shuffling: the same seed repeats a CPU run exactly."""
    out: Path | None = None
    """Run folder; None means ./runs/<task>-<rnn><dim>-<head>-<time> (READ) or ./runs/<task>-<method>-<time> (a baseline)."""
    overwrite: bool = False
    """Replace the run files in an existing --out."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1'...; None picks CUDA when present."""
    threads: int | None = None
    """CPU threads for torch; None: every core but one (the reader thread's), see `device.training_threads`."""
    progress: bool = True
    """Show a progress bar per epoch."""
    report_to: tuple[str, ...] = ("none",)
    """Where each epoch's loss, validation score and examples/s (and once the config) go besides metrics.jsonl:
    'tensorboard' (RUN/tensorboard/), 'wandb' (a W&B run in RUN; WANDB_MODE=offline is honoured), or 'none'.
    Not part of a run's identity (`runs.VOLATILE`): a resumed run may report elsewhere."""

    def check_training_options(self, lr_hint: str) -> None:
        """Both configs' checks of the fields above; `lr_hint` ends the --lr error (an example, or what leaving it out means)."""
        if self.lr is not None and (not self.lr > 0 or not math.isfinite(self.lr)):
            raise ReadCacheError(f"--lr {self.lr} must be a positive learning rate ({lr_hint})")
        for flag, value in (("--epochs", self.epochs), ("--patience", self.patience), ("--batch-size", self.batch_size)):
            if value <= 0:
                raise ReadCacheError(f"{flag} {value} must be at least 1")
        if self.threads is not None and self.threads <= 0:
            raise ReadCacheError(f"--threads {self.threads} must be at least 1 (or left out)")
        if self.pooling is not None:
            check_choice("--pooling", self.pooling, POOLINGS, " (or leave it out for the model family's way)")
        check_reporters(tuple(self.report_to))


@dataclasses.dataclass
class TrainConfig(TrainingOptions):
    """Everything `read-cache train` takes."""

    cache: Path | str | None = None
    """Cache folder or URL (s3://bucket/prefix, ...); None means the last cache `read-cache build` finished."""
    rnn: str = "gru"
    """'gru', 'lstm', 'rnn' (Elman), or 'none' (no side network: a probe on the frozen states)."""
    dim: int = 256
    """Hidden size r of the side network's RNNs."""
    head: str | None = None
    """'lm' (frozen LM head over the label words) or 'linear'; None: lm for T5 and decoder-only classification, else linear."""
    memory_budget_gb: float = 2.0
    """RAM the decoded splits may take; splits beyond it are streamed from disk."""
    device_memory_budget_gb: float | None = None
    """GPU memory the device tier may fill with splits' codes; None: 0.8 of the free memory (reader.DEVICE_SHARE)."""
    reader: str = "auto"
    """'auto' (the GPU, then RAM, where the splits fit the budgets, else stream), 'device', 'ram', or 'stream'."""
    block_tokens: int | None = None
    """Tokens per streamed read; None: whole chunks, ~32 MB (reader.BLOCK_BYTES)."""
    reader_workers: int | None = None
    """Threads that read, decompress and decode chunks in parallel; None: from the core count (see reader.default_workers)."""
    shuffle_blocks: int | None = None
    """Blocks whose examples are shuffled together; None: as many as fill ~128 MB (reader.SHUFFLE_BYTES)."""
    dtype: str | None = None
    """'bf16' or 'fp32' autocast; None: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32."""
    recurrence: bool = True
    """False (`--no-recurrence`): a separate RNN cell per layer instead of one shared cell (the paper's Table 2)."""
    preset: str | None = None
    """'paper': Table 9's learning rate for the cache's task where --lr is left out (see `read_cache.paper`)."""
    storage_options: dict[str, Any] | None = None
    """Options for the object store at a URL --cache (see BuildConfig.storage_options)."""

    def validate(self) -> None:
        check_preset(self.preset)
        check_choice("--rnn", self.rnn, RNN_KINDS)
        if self.head is not None:
            check_choice("--head", self.head, HEADS, " (or leave it out for the task's default)")
        if self.dtype is not None:
            check_choice("--dtype", self.dtype, TRAIN_DTYPES, " (or leave it out to pick what is fast here)")
        check_choice("--reader", self.reader, READER_MODES)
        if self.dim <= 0:
            raise ReadCacheError(f"--dim {self.dim} must be a positive RNN hidden size (the paper uses 128 or 256)")
        self.check_training_options(lr_hint="e.g. --lr 1e-3")
        if self.reader_workers is not None and not 1 <= self.reader_workers <= 64:
            raise ReadCacheError(f"--reader-workers {self.reader_workers} must be between 1 and 64 (or left out to follow the core count)")
        if self.weight_decay < 0:
            raise ReadCacheError(f"--weight-decay {self.weight_decay} must not be negative")
        if not self.memory_budget_gb > 0:
            raise ReadCacheError(f"--memory-budget {self.memory_budget_gb} must be a positive number of GB")
        if self.device_memory_budget_gb is not None and not self.device_memory_budget_gb > 0:
            raise ReadCacheError(f"--device-memory-budget {self.device_memory_budget_gb} must be a positive number of GB (or left out)")
        for flag, value in (("--block-tokens", self.block_tokens), ("--shuffle-blocks", self.shuffle_blocks)):
            if value is not None and value <= 0:
                raise ReadCacheError(f"{flag} {value} must be positive (or left out)")
        check_location("--cache", self.cache, self.storage_options)

    def to_dict(self) -> dict[str, Any]:
        """The masked record (see `record`): this goes into the run's config.json."""
        return record(self)



@dataclasses.dataclass
class MethodConfig(TrainingOptions):
    """What `read-cache train --method NAME` takes: a baseline trained on the live backbone (read_cache.methods)."""

    method: str
    """lora, prompt, adapter, bitfit, lst or full, optionally with its size: lora-32, prompt-10, adapter-32, lst-8."""
    model: str
    """Hub id or local folder of the backbone (these methods need it at every step, so no cache)."""
    task: str
    """GLUE task."""
    data_dir: Path | None = None
    """Local GLUE folder; None reads the hub."""
    limit: int | None = None
    """Cap on the examples of each split (after the split recipe), as `build --limit`."""
    max_length: int = 256
    """Longer inputs are truncated to this many tokens, as the build does."""

    def validate(self) -> None:
        check_installed(parse_method(self.method))
        task_name(self.task)
        if self.limit is not None and self.limit <= 0:
            raise ReadCacheError(f"--limit {self.limit} must be a positive number of examples per split (or left out)")
        if self.max_length < 2:
            raise ReadCacheError(f"--max-length {self.max_length} must be at least 2 tokens")
        self.check_training_options(lr_hint="or left out for the method's default")

    def to_dict(self) -> dict[str, Any]:
        return record(self)


@dataclasses.dataclass
class BenchConfig:
    """What `read-cache bench` takes."""

    model: str
    """Hub id or local folder of the backbone."""
    task: str
    """GLUE task."""
    out: Path
    """Folder for bench.json, bench.md, bench.png, the cache and the runs."""
    data_dir: Path | None = None
    """Local GLUE folder; None reads the hub."""
    limit: int = 2000
    """Examples per split."""
    epochs: int = 10
    """E: epochs of every training method."""
    slow_epochs: int | None = None
    """Epochs actually run for online READ and full fine-tuning (scaled to E); None runs all E."""
    rnn: str = "gru"
    dim: int = 256
    lr: float = 1e-3
    """Side network learning rate (full fine-tuning uses `full_lr`)."""
    full_lr: float = 1e-4
    batch_size: int = 96
    device: str | None = None
    methods: tuple[str, ...] = BENCH_METHODS

    def validate(self) -> None:
        if self.epochs <= 0 or (self.slow_epochs is not None and not 0 < self.slow_epochs <= self.epochs):
            raise ReadCacheError(f"--epochs {self.epochs} must be positive and --slow-epochs between 1 and --epochs")
        if self.limit <= 0:
            raise ReadCacheError(f"--limit {self.limit} must be a positive number of examples")
        if self.batch_size <= 0:
            raise ReadCacheError(f"--batch-size {self.batch_size} must be positive")
        unknown = {m for m in self.methods if m not in BENCH_METHODS and not is_method(m)}
        if unknown:
            raise ReadCacheError(
                f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCH_METHODS)} or the baselines {', '.join(METHOD_NAMES)} (NAME-SIZE: lora-32, prompt-10)"
            )
        for m in self.methods:
            if m not in BENCH_METHODS:
                check_installed(parse_method(m))  # a bad size is a one-line error now, not in the method's subprocess



class Search(str, Enum):
    GRID = "grid"
    """Every configuration trains to --epochs or to its own early stop."""
    HALVING = "halving"
    """Successive halving: after epochs 1, eta, eta^2, ... only the best 1/eta of those still training go on."""


class Trial(NamedTuple):
    """One configuration of the sweep."""

    rnn: str
    dim: int
    lr: float
    head: str | None
    """None: the task's default head (lm for T5 and decoder-only classification, else linear)."""


@dataclasses.dataclass
class SweepConfig:
    """Everything `read-cache sweep` takes."""

    out: Path
    """Sweep folder: sweep.json, sweep.png, and a run folder per configuration under runs/."""
    rnn: tuple[str, ...] = ("gru",)
    """RNN kinds: gru, lstm, rnn, none; an entry 'gru/256' brings its own size instead of crossing --dim."""
    dim: tuple[int, ...] | None = None
    """Sizes crossed with the plain --rnn entries; None: 256."""
    lr: tuple[float, ...] | None = None
    """Learning rates crossed with every architecture; None: 1e-3, or the --trials draws."""
    head: tuple[str | None, ...] = (None,)
    """Heads: lm, linear; None: the task's default."""
    trials: int | None = None
    """Draw this many learning rates log-uniformly over lr_range, one per trial, architectures taken in turn."""
    lr_range: tuple[float, float] = (1e-6, 3e-3)
    """(low, high) of the --trials draws; the paper's range by default."""
    search: str = Search.GRID.value
    """'grid' or 'halving' (see `Search`)."""
    eta: int = 3
    """Successive halving's reduction factor."""
    overwrite: bool = False
    """Replace the sweep's files in an existing --out (each run folder's own files only)."""
    configs: tuple[Trial, ...] | None = None
    """Exactly these configurations instead of the grid (a search round of `read_cache.protocol.search`)."""
    shared: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """What every configuration shares: cache, epochs, patience, batch size, seed, reader, device, threads...
    Its rnn, dim, lr, head, out and overwrite are set per configuration."""

    def validate(self) -> None:
        for flag, values in (("--rnn", self.rnn), ("--dim", self.dim), ("--lr", self.lr), ("--head", self.head)):
            if values is not None and len(values) == 0:
                raise ReadCacheError(f"{flag} is empty, so the grid has no configuration; pass a comma-separated list, e.g. {flag} {EXAMPLES[flag]}")
        if self.trials is not None:
            if self.lr is not None:
                raise ReadCacheError("pass either --lr (learning rates to try) or --trials (draws over --lr-range), not both")
            if self.trials <= 0:
                raise ReadCacheError(f"--trials {self.trials} must be at least 1")
        low, high = self.lr_range
        if not (0 < low < high and math.isfinite(high)):
            raise ReadCacheError(f"--lr-range {low:g}:{high:g} must be LOW:HIGH with 0 < LOW < HIGH (the paper's is 1e-6:3e-3)")
        if self.search not in [s.value for s in Search]:
            raise ReadCacheError(f"--search {self.search!r} is not one of {', '.join(s.value for s in Search)}")
        if self.eta < 2:
            raise ReadCacheError(f"--eta {self.eta} must be at least 2 (successive halving keeps the best 1/eta)")
        if self.dim is not None and all("/" in entry for entry in self.rnn):
            raise ReadCacheError("--dim crosses the plain --rnn entries, and every entry here brings its own size (e.g. gru/256); drop --dim or the /size")

    def architectures(self) -> list[tuple[str, int]]:
        """(rnn, dim) pairs, in the order given: 'gru/256' as it is, plain entries crossed with --dim."""
        dims = self.dim or (self.shared.dim,)
        pairs: list[tuple[str, int]] = []
        for entry in self.rnn:
            kind, paired, size = (part.strip() for part in entry.partition("/"))
            if paired:
                pairs.append((kind, _size(entry, size)))
            elif kind == "none":
                pairs.append((kind, dims[0]))  # no RNN: its size means nothing, so one configuration
            else:
                pairs.extend((kind, d) for d in dims)
        return list(dict.fromkeys(pairs))

    def configurations(self) -> list[Trial]:
        """The grid (architectures x heads x learning rates), or --trials draws with architectures taken in turn."""
        if self.configs is not None:
            return list(self.configs)
        combos = [(rnn, dim, head) for rnn, dim in self.architectures() for head in self.head]
        if self.trials is None:
            return [Trial(rnn, dim, lr, head) for rnn, dim, head in combos for lr in self.lr or (DEFAULT_LR,)]
        trials = []
        for i, lr in enumerate(self.draw_learning_rates()):
            rnn, dim, head = combos[i % len(combos)]
            trials.append(Trial(rnn, dim, lr, head))
        return trials

    def draw_learning_rates(self) -> list[float]:
        """--trials learning rates, log-uniform over --lr-range, seeded by --seed (more trials extend the same draws)."""
        low, high = self.lr_range
        rng = np.random.default_rng(self.shared.seed)
        return [float(x) for x in np.exp(rng.uniform(math.log(low), math.log(high), self.trials or 0))]

    def train_config(self, trial: Trial) -> TrainConfig:
        """The TrainConfig that, given to `read-cache train` alone, trains the same network."""
        return dataclasses.replace(self.shared, rnn=trial.rnn, dim=trial.dim, lr=trial.lr, head=trial.head, out=None, overwrite=self.overwrite)


def preset_values(preset: str | None) -> dict[str, Any]:
    """The TrainConfig values a preset sets where the user gave no flag: batch 96, 30 epochs, stop at the first
    epoch without a better validation score (the paper's wording); its learning rates come per task later."""
    check_preset(preset)
    if preset is None:
        return {}
    return {"batch_size": PAPER.batch_size, "epochs": PAPER.epochs, "patience": PAPER.patience}


def with_preset(preset: str | None, **flags: Any) -> dict[str, Any]:
    """TrainConfig values: the flags given (not None) over the preset's, over TrainConfig's own defaults."""
    return {**preset_values(preset), **given(**flags)}


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave (not None): what a config takes over its own defaults."""
    return {k: v for k, v in flags.items() if v is not None}


def check_seeds(seeds: int) -> None:
    """`--seeds`: how many seeds each configuration runs with."""
    if seeds <= 0:
        raise ReadCacheError(f"--seeds {seeds} must be at least 1 (the paper averages 3)")


@dataclasses.dataclass
class SearchConfig:
    """The paper's search for one task (`read-cache sweep --preset paper`, and each task of `read-cache glue`).

    Per architecture, a Bayesian optimisation (optuna's TPE, ask-and-tell) of the learning rate over `lr_range`
    on a log scale; each round asks every architecture for `per_round` rates and trains all of them together in
    one fused sweep per seed; the objective is the mean validation score over the seeds.
    """

    out: Path
    """Folder: search.json, and round-NN/seed-S/ sweep folders."""
    architectures: tuple[str, ...] = ("gru/256", "gru/128", "lstm/128")
    """'rnn/dim' entries (the paper's Table 8 candidates by default)."""
    rounds: int = PAPER.rounds
    """Rounds of the Bayesian optimisation (the paper: up to 32)."""
    per_round: int = 1
    """Learning rates each architecture tries per round (all trained in the round's one fused sweep)."""
    lr_range: tuple[float, float] = PAPER.lr_range
    """(low, high), searched on a log scale."""
    seeds: int = 1
    """Seeds per configuration: shared.seed, shared.seed + 1, ...; scores are their mean (and std)."""
    first_lr: float | None = None
    """Tried first by every architecture (Table 9's rate under --preset paper), then the optimiser takes over."""
    head: str | None = None
    """None: the task's default head."""
    overwrite: bool = False
    """Replace the search's files in an existing --out."""
    shared: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """What every configuration shares (cache, epochs, patience, batch size, first seed, reader, device...)."""

    def validate(self) -> None:
        if self.rounds <= 0:
            raise ReadCacheError(f"--rounds {self.rounds} must be at least 1 (the paper: up to 32)")
        if self.per_round <= 0:
            raise ReadCacheError(f"--per-round {self.per_round} must be at least 1")
        check_seeds(self.seeds)
        low, high = self.lr_range
        if not (0 < low < high and math.isfinite(high)):
            raise ReadCacheError(f"--lr-range {low:g}:{high:g} must be LOW:HIGH with 0 < LOW < HIGH (the paper's is 1e-6:3e-3)")
        if not self.architectures:
            raise ReadCacheError("--rnn is empty; pass architectures such as --rnn gru/256,gru/128,lstm/128")
        for entry in self.architectures:
            kind, slash, size = entry.partition("/")
            if kind not in RNN_KINDS or (kind != "none" and not slash):
                raise ReadCacheError(f"--rnn entry {entry!r} must be RNN/SIZE with RNN one of {', '.join(RNN_KINDS)}, e.g. gru/256")
            if slash:
                _size(entry, size)
        self.shared.validate()

    def arch_pairs(self) -> list[tuple[str, int]]:
        """(rnn, dim) per architecture entry."""
        return [(e.partition("/")[0], int(e.partition("/")[2] or self.shared.dim)) for e in self.architectures]


@dataclasses.dataclass
class GlueConfig:
    """Everything `read-cache glue` takes: build every task's cache, search, select, lay the table out."""

    model: str
    """Hub id or local folder of the backbone."""
    out: Path
    """Folder: caches/<task>, search/<task>, glue.json, glue.md, glue.png."""
    data_dir: Path | None = None
    """Local GLUE folder; None reads the hub."""
    tasks: tuple[str, ...] = ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")
    """Tasks to run (Table 1's seven by default)."""
    limit: int | None = None
    """At most this many examples per split (scaled-down runs)."""
    protocol: str = "t5"
    """Split and target protocol of the builds: 't5' or 'lst'."""
    drop_last_layers: int = 0
    """Drop the model's last K layers before caching (READ-large: 4)."""
    preset: str | None = None
    """'paper': 30 epochs, patience 1, batch 96, 32 rounds, 3 seeds, Table 9's rate tried first; flags given win."""
    search: SearchConfig | None = None
    """The per-task search (its `out` and `shared.cache` are set per task)."""
    build_batch_size: int = 64
    """Examples per forward pass of the builds."""
    max_length: int = 256
    dtype: str | None = None
    """Build compute dtype; None: what is safe and fast here."""
    progress: bool = True

    def validate(self) -> None:
        if not self.tasks:
            raise ReadCacheError("--tasks is empty; pass e.g. --tasks cola,sst2,mrpc,stsb")
        for task in self.tasks:
            task_name(task)
        if len(set(self.tasks)) != len(self.tasks):
            raise ReadCacheError(f"--tasks {','.join(self.tasks)} names a task twice; name each once")
        check_preset(self.preset)
        self.build_config(self.tasks[0]).validate()
        if self.search is not None:
            self.search.validate()

    def build_config(self, task: str) -> BuildConfig:
        name = task_name(task)
        return BuildConfig(
            model=self.model, task=name, data_dir=self.data_dir, out=Path(self.out) / "caches" / name, limit=self.limit,
            max_length=self.max_length, dtype=self.dtype, batch_size=self.build_batch_size, progress=self.progress,
            protocol=self.protocol, drop_last_layers=self.drop_last_layers,
        )


def _size(entry: str, size: str) -> int:
    value = positive_int(size)
    if value is None:
        raise ReadCacheError(f"--rnn entry {entry!r} needs a positive size after the '/', e.g. gru/256")
    return value


# --------------------------------------------------------------------------------------------------
# Flags -> values (the CLI's parsing, kept here so its errors name the flag)


def parse_list(flag: str, text: str, kind: Callable[[str], T]) -> tuple[T, ...]:
    """'128,256' -> (128, 256); an empty or malformed list is a one-line error naming the flag."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        return ()
    if not all(items):
        raise ReadCacheError(f"{flag} {text!r} has an empty entry; pass a comma-separated list, e.g. {flag} {EXAMPLES[flag]}")
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        what = {"int": "whole numbers", "float": "numbers"}.get(getattr(kind, "__name__", ""), "values")
        raise ReadCacheError(f"{flag} {text!r} is not a comma-separated list of {what}, e.g. {flag} {EXAMPLES[flag]}") from None


def parse_range(flag: str, text: str) -> tuple[float, float]:
    """'1e-6:3e-3' -> (1e-6, 3e-3); anything else is a one-line error naming the flag."""
    low, colon, high = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return float(low), float(high)
    except ValueError:
        raise ReadCacheError(f"{flag} {text!r} is not LOW:HIGH, e.g. {flag} 1e-6:3e-3") from None


# --------------------------------------------------------------------------------------------------
# The one record of a config: what every command writes and prints


def record(cfg: Any, *, masked: bool = True) -> dict[str, Any]:
    """A config (any dataclass here, nested ones included) as JSON-friendly data, every `storage_options` masked.

    This is the only way a config reaches a file (config.json, sweep-config.json, the bench's spec.json, the
    reporters) or a message (torchrun's argument check), so no secret leaves the process. `masked=False` is
    for comparing configs in memory only.
    """
    return _plain(dataclasses.asdict(cfg), masked)


def _plain(value: Any, masked: bool) -> Any:
    if isinstance(value, dict):
        return {k: redact_options(v) if masked and k == "storage_options" else _plain(v, masked) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # NamedTuples (a sweep's Trials) too: JSON has lists only
        return [_plain(v, masked) for v in value]
    return str(value) if isinstance(value, Path) else value
