"""`read-cache train`: stage two, a side network from a cache, or with --method a baseline on the live backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from read_cache.cli.common import (
    CacheArg,
    Device,
    DeviceMemoryBudget,
    Dtype,
    MemoryBudget,
    NoProgress,
    NoRecurrence,
    Preset,
    Reader,
    ReaderWorkers,
    ReportTo,
    Seeds,
    StorageOptions,
    Threads,
    WeightDecay,
    is_main_rank,
    out_console,
    print_command,
    user_errors,
)
from read_cache.config import TrainConfig, check_seeds, given, parse_list, with_preset
from read_cache.errors import ReadCacheError
from read_cache.paths import resolve_cache


@user_errors
def train(
    cache: CacheArg = None,
    rnn: Annotated[str, typer.Option(help="Side network RNN: gru, lstm, rnn (Elman), or none (a probe on the frozen states).")] = TrainConfig.rnn,
    dim: Annotated[int, typer.Option(help="RNN hidden size r (the paper: 128 or 256).")] = TrainConfig.dim,
    head: Annotated[Optional[str], typer.Option(help="lm (frozen LM head over the label words) or linear; default: lm for T5 and decoder-only classification, else linear.")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Encoder-only and decoder-only caches: mean, first or last token; default: the model family's way (decoder-only: last), as the cache records it.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate; default 1e-3, or Table 9's with --preset paper; with --method, the method's own.")] = None,
    weight_decay: WeightDecay = TrainConfig.weight_decay,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (default and the paper: 96).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs (default and the paper: 30).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better validation score (default 5; the paper: 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling (a CPU run repeats exactly).")] = TrainConfig.seed,
    out: Annotated[Optional[Path], typer.Option(help="Run folder; default: ./runs/<task>-<rnn><dim>-<head>-<time>.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the run files in an existing --out.")] = False,
    reader: Reader = TrainConfig.reader,
    memory_budget: MemoryBudget = TrainConfig.memory_budget_gb,
    device_memory_budget: DeviceMemoryBudget = TrainConfig.device_memory_budget_gb,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    no_recurrence: NoRecurrence = False,
    preset: Preset = None,
    seeds: Seeds = 1,
    reader_workers: ReaderWorkers = None,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
    report_to: ReportTo = ",".join(TrainConfig.report_to),
    method: Annotated[Optional[str], typer.Option(help="Train a baseline on the live backbone instead: full, lora, prompt, adapter, bitfit, lst (NAME-SIZE: lora-32, prompt-10...).")] = None,
    model: Annotated[Optional[str], typer.Option(help="With --method: hub id or local folder of the backbone.")] = None,
    task: Annotated[Optional[str], typer.Option(help="With --method: the GLUE task.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="With --method: local GLUE folder; default: the hub.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --method: at most this many examples per split, as build --limit.")] = None,
) -> None:
    """Stage two: train READ's side network and a head from a cache (the backbone is never loaded), or with
    --method a baseline (LoRA, prompt tuning, adapters, BitFit, LST, full) on the backbone itself."""
    reporters = parse_list("--report-to", report_to, str)
    if method is not None or model is not None or task is not None:
        return _train_method(method, model, task, cache, data_dir=data_dir, limit=limit, pooling=pooling, lr=lr, weight_decay=weight_decay,
                             seed=seed, out=out, overwrite=overwrite, device=device, threads=threads, progress=not no_progress, report_to=reporters,
                             **given(batch_size=batch_size, epochs=epochs, patience=patience))
    from read_cache.paths import parse_storage_options

    values = with_preset(preset, batch_size=batch_size, epochs=epochs, patience=patience)
    cfg = TrainConfig(
        cache=cache, rnn=rnn, dim=dim, head=head, pooling=pooling, lr=lr, weight_decay=weight_decay, seed=seed, out=out,
        overwrite=overwrite, reader=reader, memory_budget_gb=memory_budget, device_memory_budget_gb=device_memory_budget, device=device, dtype=dtype, threads=threads, reader_workers=reader_workers,
        progress=not no_progress, recurrence=not no_recurrence, preset=preset, report_to=reporters, **values,
        storage_options=parse_storage_options(storage_options),
    )
    cfg.validate()
    check_seeds(seeds)
    cfg.cache = resolve_cache(cache)
    if seeds > 1:
        return _train_seeds(cfg, seeds)
    from read_cache.training.train import train as train_side_network

    summary = train_side_network(cfg)
    if is_main_rank():
        _print_run(summary)


def _train_seeds(cfg: TrainConfig, seeds: int) -> None:
    """`train --seeds N`: the same run with N seeds, mean and std."""
    from read_cache.protocol.search import train_seeds

    report = train_seeds(cfg, seeds)
    out_console.print(
        f"{report['task']}: {report['rnn']}/{report['dim']} lr {report['lr']:.3g}, seeds {report['seeds']}: "
        f"validation {report['validation']['mean']:.4f} ± {report['validation']['std']:.4f}, "
        f"test {report['metric']} {report['test']['mean']:.4f} ± {report['test']['std']:.4f}; runs in {Path(report['runs'][0]).parent}",
        highlight=False,
    )


def _print_run(summary: dict[str, Any]) -> None:
    """The finished run's scores, speed and where it is."""
    table = Table(title=f"{summary['task']}: {summary['rnn']}/{summary['dim']} {summary['head']} head, {summary['trainable_parameters']:,} trainable parameters")
    for col in ("split", "metric", "score", "components"):
        table.add_column(col)
    for split in ("validation", "test"):
        s = summary[split]
        parts = ", ".join(f"{k} {v:.4f}" for k, v in s.items() if k not in ("metric", "score") and isinstance(v, float))
        table.add_row(split, s["metric"], f"{s['score']:.4f}", parts)
    base = summary["test_majority_baseline"]
    table.add_row("test baseline", base["metric"], f"{base['score']:.4f}", f"always {base.get('label', base.get('prediction'))}")
    out_console.print(table)
    out_console.print(
        f"{summary['epochs_run']} epochs (best {summary['best_epoch']}), {summary['examples_per_second']:,.0f} examples/s, "
        f"{summary['wall_seconds']:.1f} s; run saved to {summary['run_dir']}. Label new text with:",
        highlight=False,
    )
    print_command(f"read-cache predict --run {summary['run_dir']} \"TEXT\"")


def _train_method(method: str | None, model: str | None, task: str | None, cache: Path | None, **options: Any) -> None:
    """`train --method`: a baseline needs the backbone and the task, not a cache."""
    from read_cache.config import MethodConfig

    if method is None:
        raise ReadCacheError("--model and --task train a baseline: pass --method NAME too (full, lora, prompt, adapter, bitfit, lst); READ trains from a --cache")
    if cache is not None:
        raise ReadCacheError("--method trains on the live backbone and reads no cache; drop --cache and pass --model and --task")
    if model is None or task is None:
        raise ReadCacheError(f"--method {method} needs the backbone and the task: pass --model M --task T")
    cfg = MethodConfig(method=method, model=model, task=task, **options)
    cfg.validate()  # before torch and transformers load
    from read_cache.methods.train import train_method

    summary = train_method(cfg)
    table = Table(title=f"{summary['task']}: {summary['method']}, {summary['trainable_parameters']:,} trainable parameters ({summary['trainable_percent']:.3f}% of the backbone)")
    for col in ("split", "metric", "score"):
        table.add_column(col)
    for split in ("validation", "test"):
        table.add_row(split, summary[split]["metric"], f"{summary[split]['score']:.4f}")
    base = summary["test_majority_baseline"]
    table.add_row("test baseline", base["metric"], f"{base['score']:.4f}")
    out_console.print(table)
    out_console.print(
        f"{summary['epochs_run']} epochs (best {summary['best_epoch']}), {summary['wall_seconds']:.1f} s, "
        f"peak RSS {summary['meter']['peak_rss_bytes'] / 2**20:,.0f} MiB; run saved to {summary['run_dir']}. Label new text with:",
        highlight=False,
    )
    print_command(f"read-cache predict --run {summary['run_dir']} \"TEXT\"")
