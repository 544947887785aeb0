"""`read-cache sweep` (many side networks from one read of a cache) and `read-cache glue` (the paper's protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from read_cache.cli.common import (
    CacheArg,
    Device,
    DeviceMemoryBudget,
    DropLayers,
    Dtype,
    MemoryBudget,
    NoProgress,
    NoRecurrence,
    Preset,
    ProtocolOpt,
    Reader,
    ReaderWorkers,
    ReportTo,
    StorageOptions,
    Threads,
    WeightDecay,
    is_main_rank,
    out_console,
    print_command,
    user_errors,
)
from read_cache.config import (
    GlueConfig,
    SearchConfig,
    SweepConfig,
    TrainConfig,
    check_seeds,
    parse_list,
    parse_range,
    with_preset,
)
from read_cache.errors import ReadCacheError
from read_cache.paths import resolve_cache


@user_errors
def sweep(
    out: Annotated[Path, typer.Option(help="Sweep folder: sweep.json, sweep.png, and a run folder per configuration under runs/.")],
    cache: CacheArg = None,
    rnn: Annotated[Optional[str], typer.Option(help="Comma-separated RNNs (gru, lstm, rnn, none), crossed with --dim; 'gru/256' brings its own size; default gru (with --preset paper or --rounds: gru/256,gru/128,lstm/128).")] = None,
    dim: Annotated[Optional[str], typer.Option(help="Comma-separated RNN sizes crossed with the plain --rnn entries; default 256.")] = None,
    lr: Annotated[Optional[str], typer.Option(help="Comma-separated learning rates; default 1e-3 (leave out with --trials).")] = None,
    head: Annotated[Optional[str], typer.Option(help="Comma-separated heads (lm, linear); default: lm for T5 and decoder-only classification, else linear.")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Draw this many learning rates log-uniformly over --lr-range, architectures taken in turn.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Bayesian learning-rate search (optuna TPE) with this many rounds per architecture (--preset paper: 32).")] = None,
    per_round: Annotated[int, typer.Option(help="Learning rates each architecture tries per search round, trained together.")] = SearchConfig.per_round,
    lr_range: Annotated[str, typer.Option(help="LOW:HIGH for --trials and --rounds (the paper: 1e-6:3e-3).")] = "1e-6:3e-3",
    search: Annotated[str, typer.Option(help="grid (each to --epochs or its early stop) or halving (after epochs 1, eta, eta^2... keep the best 1/eta).")] = SweepConfig.search,
    eta: Annotated[int, typer.Option(help="Successive halving's reduction factor.")] = SweepConfig.eta,
    pooling: Annotated[Optional[str], typer.Option(help="Encoder-only and decoder-only caches: mean, first or last token; default: the model family's way (decoder-only: last), as the cache records it.")] = None,
    weight_decay: WeightDecay = TrainConfig.weight_decay,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (default and the paper: 96).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs per configuration (default and the paper: 30).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="A configuration stops after this many epochs without a better validation score (default 5; the paper: 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every configuration's initialisation, the shuffling and the --trials draws.")] = TrainConfig.seed,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Run every configuration with this many seeds (--seed, --seed+1, ...) and rank by the mean (--preset paper: 3).")] = None,
    preset: Preset = None,
    no_recurrence: NoRecurrence = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the sweep's files in an existing --out.")] = False,
    reader: Reader = TrainConfig.reader,
    memory_budget: MemoryBudget = TrainConfig.memory_budget_gb,
    device_memory_budget: DeviceMemoryBudget = TrainConfig.device_memory_budget_gb,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    reader_workers: ReaderWorkers = None,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
    report_to: ReportTo = ",".join(TrainConfig.report_to),
) -> None:
    """Train many side networks from one read of the cache; select by validation, report that run's test score."""
    from read_cache.paths import parse_storage_options

    shared = TrainConfig(
        cache=cache, pooling=pooling, weight_decay=weight_decay, seed=seed, reader=reader, memory_budget_gb=memory_budget, device_memory_budget_gb=device_memory_budget,
        device=device, dtype=dtype, threads=threads, reader_workers=reader_workers, progress=not no_progress, recurrence=not no_recurrence, preset=preset,
        storage_options=parse_storage_options(storage_options), report_to=parse_list("--report-to", report_to, str),
        **with_preset(preset, batch_size=batch_size, epochs=epochs, patience=patience),
    )
    shared.validate()
    n_seeds = seeds if seeds is not None else (3 if preset == "paper" else 1)
    if rounds is not None or (preset == "paper" and lr is None and trials is None):
        if lr is not None or trials is not None:
            raise ReadCacheError("--rounds searches the learning rate itself; drop --lr and --trials (or --rounds)")
        return _search(shared, out, rnn, dim, head, rounds, per_round, lr_range, n_seeds, overwrite, cache)
    cfg = SweepConfig(
        out=out, rnn=parse_list("--rnn", "gru" if rnn is None else rnn, str), dim=None if dim is None else parse_list("--dim", dim, int),
        lr=None if lr is None else parse_list("--lr", lr, float), head=(None,) if head is None else parse_list("--head", head, str),
        trials=trials, lr_range=parse_range("--lr-range", lr_range), search=search, eta=eta, overwrite=overwrite, shared=shared,
    )
    _run_sweep(cfg, n_seeds, cache)


def _run_sweep(cfg: SweepConfig, n_seeds: int, cache: str | None) -> None:
    """The grid (or --trials), once or per seed, and its table."""
    cfg.validate()
    check_seeds(n_seeds)
    cfg.shared.cache = resolve_cache(cache)
    if n_seeds > 1:
        from read_cache.protocol.search import sweep_seeds

        _print_seeds(sweep_seeds(cfg, n_seeds), cfg.out)
        return
    from read_cache.training.sweep import sweep as run_sweep

    report = run_sweep(cfg)
    if is_main_rank():
        _print_sweep(report, cfg.out)


def _search(shared: TrainConfig, out: Path, rnn: str | None, dim: str | None, head: str | None, rounds: int | None, per_round: int,
            lr_range: str, n_seeds: int, overwrite: bool, cache: str | None) -> None:
    """`sweep --rounds` (or --preset paper without --lr): the Bayesian learning-rate search per architecture."""
    from read_cache.paper import ARCHITECTURES, PAPER

    heads = (None,) if head is None else parse_list("--head", head, str)
    if len(heads) != 1:
        raise ReadCacheError("--rounds searches one head at a time; pass a single --head")
    architectures = ARCHITECTURES if rnn is None else SweepConfig(out=out, rnn=parse_list("--rnn", rnn, str), dim=None if dim is None else parse_list("--dim", dim, int)).architectures()
    search_cfg = SearchConfig(
        out=out, architectures=tuple(a if isinstance(a, str) else f"{a[0]}/{a[1]}" for a in architectures),
        rounds=rounds if rounds is not None else PAPER.rounds, per_round=per_round, lr_range=parse_range("--lr-range", lr_range), seeds=n_seeds,
        head=heads[0], overwrite=overwrite, shared=shared,
    )
    search_cfg.validate()
    shared.cache = resolve_cache(cache)
    from read_cache.protocol.search import search as run_search

    _print_search(run_search(search_cfg), out)


def _print_sweep(report: dict[str, Any], out: Path) -> None:
    from read_cache.training.sweep import ranked

    best = report["best"]
    table = Table(title=f"{report['task']}: {report['configurations']} configurations ({report['search']}), ranked by validation {best['validation']['metric']}")
    for col in ("#", "configuration", "parameters", "epochs", "ended", "validation", "test"):
        table.add_column(col, justify="left" if col in ("configuration", "ended") else "right", no_wrap=col == "configuration")
    for rank, entry in enumerate(ranked(report), 1):
        table.add_row(
            str(rank), entry["name"] + (" *" if entry["name"] == best["name"] else ""), f"{entry['trainable_parameters']:,}",
            str(entry["epochs_run"]), entry["ended"], f"{entry['validation']['score']:.4f}", f"{entry['test']['score']:.4f}",
        )
    out_console.print(table)
    out_console.print(
        f"selected {best['name']} by validation {best['validation']['score']:.4f}: test {best['test']['metric']} {best['test']['score']:.4f}; "
        f"{report['epochs_trained']} epochs in {report['wall_seconds']:.1f} s; wrote {out / 'sweep.json'}, {out / 'sweep.png'}. "
        "Label new text with:",
        highlight=False,
    )
    print_command(f"read-cache predict --run {best['run_dir']} \"TEXT\"")


@user_errors
def glue(
    model: Annotated[str, typer.Option(help="Hub id or local model folder (T5 family or encoder-only).")],
    out: Annotated[Path, typer.Option(help="Folder: caches/, search/, glue.json, glue.md, glue.png.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Local GLUE folder (TSV or parquet layout); default: the hub.")] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks; default Table 1's seven.")] = "cola,mnli,qnli,mrpc,qqp,sst2,stsb",
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per split (a scaled-down run).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs per configuration (default and the paper: 30).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Epochs without a better validation score before a configuration stops (default 5; the paper: 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per training step (default and the paper: 96).")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Seeds per configuration, averaged (default 1; --preset paper: 3).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Bayesian learning-rate search rounds per architecture and task (default 8; --preset paper: 32).")] = None,
    per_round: Annotated[int, typer.Option(help="Learning rates each architecture tries per round (trained together).")] = SearchConfig.per_round,
    rnn: Annotated[str, typer.Option(help="Architecture candidates, rnn/dim (the paper's Table 8).")] = "gru/256,gru/128,lstm/128",
    lr_range: Annotated[str, typer.Option(help="LOW:HIGH of the learning-rate search (the paper: 1e-6:3e-3).")] = "1e-6:3e-3",
    preset: Preset = None,
    protocol: ProtocolOpt = GlueConfig.protocol,
    drop_last_layers: DropLayers = GlueConfig.drop_last_layers,
    no_recurrence: NoRecurrence = False,
    seed: Annotated[int, typer.Option(help="First seed.")] = TrainConfig.seed,
    dtype: Annotated[Optional[str], typer.Option(help="Build compute dtype bf16|fp16|fp32; default: safe and fast on this device.")] = None,
    build_batch_size: Annotated[int, typer.Option(help="Examples per forward pass of the builds.")] = GlueConfig.build_batch_size,
    device: Device = None,
    threads: Threads = None,
    memory_budget: MemoryBudget = 2.0,
    no_progress: NoProgress = False,
) -> None:
    """The paper's protocol end to end: build every task's cache, search, select one architecture, write Table 1."""
    from read_cache.config import (
        GlueConfig,
        SearchConfig,
        TrainConfig,
        parse_list,
        parse_range,
        with_preset,
    )
    from read_cache.paper import PAPER

    shared = TrainConfig(
        seed=seed, device=device, threads=threads, memory_budget_gb=memory_budget, progress=not no_progress,
        recurrence=not no_recurrence, preset=preset, **with_preset(preset, batch_size=batch_size, epochs=epochs, patience=patience),
    )
    search_cfg = SearchConfig(
        out=out, architectures=parse_list("--rnn", rnn, str), rounds=rounds if rounds is not None else (PAPER.rounds if preset == "paper" else 8),
        per_round=per_round, lr_range=parse_range("--lr-range", lr_range),
        seeds=seeds if seeds is not None else (PAPER.seeds if preset == "paper" else 1), shared=shared,
    )
    cfg = GlueConfig(
        model=model, out=out, data_dir=data_dir, tasks=parse_list("--tasks", tasks, str), limit=limit, protocol=protocol,
        drop_last_layers=drop_last_layers, preset=preset, search=search_cfg, build_batch_size=build_batch_size, dtype=dtype,
        progress=not no_progress,
    )
    cfg.validate()
    from read_cache.protocol.glue import TABLE, run_glue

    run_glue(cfg)
    typer.echo((out / TABLE).read_text())


def _print_seeds(report: dict[str, Any], out: Path) -> None:
    table = Table(title=f"{report['task']}: {len(report['configs'])} configurations x seeds {report['seeds']}, ranked by mean validation")
    for col in ("configuration", "parameters", "validation", "test"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for entry in sorted(report["configs"], key=lambda e: -e["validation"]["mean"] if e["validation"]["mean"] == e["validation"]["mean"] else 1e9):
        mark = " *" if entry is report["best"] or entry["name"] == report["best"]["name"] else ""
        table.add_row(entry["name"] + mark, f"{entry['trainable_parameters']:,}", _mean_std(entry["validation"]), _mean_std(entry["test"]))
    out_console.print(table)
    out_console.print(f"selected {report['best']['name']}: test {report['best']['metric']} {_mean_std(report['best']['test'])}; wrote {out / 'seeds.json'}", highlight=False)


def _print_search(report: dict[str, Any], out: Path) -> None:
    table = Table(title=f"{report['task']}: {report['rounds']} round(s) x {report['per_round']} per architecture, seeds {report['seeds']}")
    for col in ("architecture", "best lr", "validation", "test", "trials"):
        table.add_column(col, justify="left" if col == "architecture" else "right")
    for arch, a in report["architectures"].items():
        mark = " *" if arch == report["best_architecture"] else ""
        table.add_row(arch + mark, f"{a['best']['lr']:.3g}", _mean_std(a["best"]["validation"]), _mean_std(a["best"]["test"]), str(len(a["trials"])))
    out_console.print(table)
    best = report["best"]
    out_console.print(f"selected {report['best_architecture']} lr {best['lr']:.3g}: test {best['metric']} {_mean_std(best['test'])}; wrote {out / 'search.json'}", highlight=False)


def _mean_std(spread: dict[str, Any]) -> str:
    return f"{spread['mean']:.4f} ± {spread['std']:.4f}"
