"""The `read-cache` command: a thin layer that turns flags into the library's configs.

    read-cache build --model t5-small --task sst2 --data-dir ../shared/glue --limit 2000
    read-cache train --rnn gru --dim 256
    read-cache inspect
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from read_cache.config import METHODS
from read_cache.errors import ReadCacheError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="READ side networks trained from a cache of a frozen transformer: build once, train many.",
)
console = Console(stderr=True)
out_console = Console()



# Options shared by several commands.
CacheArg = Annotated[Optional[str], typer.Option("--cache", help="Cache folder or URL (s3://bucket/prefix, gs://, az://...); default: the last one built.")]
StorageOptions = Annotated[
    Optional[str],
    typer.Option("--storage-options", help="JSON options for a cache URL (obstore's from_url keys for s3/gs/az, fsspec's for others); credentials usually come from the environment."),
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars (logs stay).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Examples per step (the paper: 96).")]
Reader = Annotated[str, typer.Option("--reader", help="auto (RAM where it fits --memory-budget), ram, or stream.")]
MemoryBudget = Annotated[float, typer.Option("--memory-budget", help="GB of RAM the decoded splits may take.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N; default: CUDA when present.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="bf16 or fp32 autocast; default: bf16 where it pays.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch; default: all cores but one (one feeds the reader).")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="t5 (T5's label words) or lst (Ladder Side-Tuning's splits and label digits, as the paper ran it).")]
DropLayers = Annotated[int, typer.Option("--drop-last-layers", help="Drop the model's last K encoder and decoder layers before caching (READ-large: 4).")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="paper: batch 96, up to 30 epochs, stop at the first epoch without a better validation score, Table 9's learning rates.")]
Seeds = Annotated[int, typer.Option("--seeds", help="Run each configuration with this many seeds (--seed, --seed+1, ...): mean and std.")]
NoRecurrence = Annotated[bool, typer.Option("--no-recurrence", help="A separate RNN cell per layer instead of one shared cell (the paper's Table 2 ablation).")]


# What the same command resumes from after Ctrl-C (or kill -9); other commands keep nothing to resume.
RESUMES = {
    "build": "from its last durable unit",
    "train": "from its last finished epoch (each epoch end is checkpointed)",
    "sweep": "from its last finished epoch (each epoch end is checkpointed)",
}

ReaderWorkers = Annotated[Optional[int], typer.Option("--reader-workers", help="Threads decoding chunks in parallel; default: from the core count.")]


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a ReadCacheError as one line and exit 2; Ctrl-C exits 130 with how to resume."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ReadCacheError as e:
            if not _quiet_rank(e):
                console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            how = RESUMES.get(command.__name__)
            console.print(f"[yellow]interrupted[/]: rerun the same command to resume {how}" if how else "[yellow]interrupted[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def _quiet_rank(error: ReadCacheError) -> bool:
    """Under torchrun, an error every rank agreed on is printed by rank 0 alone."""
    from read_cache.distributed import detect

    group = sys.modules.get("read_cache.distributed.group")  # loaded by then wherever ranks can agree
    return group is not None and isinstance(error, group.RankError) and not detect().is_main


def is_main_rank() -> bool:
    """False on every torchrun rank but 0: they log only warnings and print no tables."""
    from read_cache.distributed import detect

    return detect().is_main


def setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    level = logging.DEBUG if verbose else logging.INFO if is_main_rank() else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"read-cache {version('read-cache')}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    setup_logging(verbose)
    # transformers and huggingface_hub read these when (and only if) a command imports them: importing
    # transformers here to set them would cost every command, even a rejected flag, seconds.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.command()
@user_errors
def build(
    model: Annotated[str, typer.Option(help="Hub id (t5-base) or local model folder.")],
    task: Annotated[str, typer.Option(help="GLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Local GLUE folder (original TSV layout or the hub's parquet); default: the hub.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Cache folder or URL (s3://bucket/prefix, gs://, az://...); default: $READ_CACHE_HOME/caches/<model>/<task>.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per split (after the split recipe).")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate inputs to this many tokens (truncations are counted).")] = 256,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype bf16|fp16|fp32; default: fast on this device.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu; default: CUDA when present.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass (grouped by length).")] = 64,
    cross_attention: Annotated[str, typer.Option(help="mean (over heads, the paper's) or heads.")] = "mean",
    store_dtype: Annotated[str, typer.Option(help="Stored states: fp8 (8-bit floats + a scale per row), int8, int4, bfloat16 or float16 (docs/storage.md).")] = "fp8",
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of --model.")] = None,
    chunk_mb: Annotated[float, typer.Option(help="Target raw MiB per chunk of token rows.")] = 4.0,
    force: Annotated[bool, typer.Option(help="Build even if the size estimate exceeds free disk.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete the cache already at --out and build it anew (default: resume it).")] = False,
    protocol: ProtocolOpt = "t5",
    drop_last_layers: DropLayers = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Tokenise only (no weights loaded), print examples, tokens and projected size per --store-dtype, exit.")] = False,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
) -> None:
    """Stage one: run the frozen backbone once over every split and cache its states."""
    from read_cache.config import BuildConfig
    from read_cache.store.location import parse_storage_options

    cfg = BuildConfig(
        model=model, task=task, data_dir=data_dir, out=out, limit=limit, max_length=max_length, dtype=dtype,
        device=device, batch_size=batch_size, cross_attention=cross_attention, float_dtype=store_dtype,
        revision=revision, chunk_mb=chunk_mb, force=force, overwrite=overwrite, dry_run=dry_run, progress=not no_progress, protocol=protocol,
        drop_last_layers=drop_last_layers,
        storage_options=parse_storage_options(storage_options),
    )
    cfg.validate()  # before the heavy imports below: a bad flag is rejected in well under a second
    if dry_run:
        from read_cache.estimate import estimate_build, estimate_table

        out_console.print(estimate_table(estimate_build(cfg)), markup=False, highlight=False, soft_wrap=True)
        return
    from read_cache.build import build_cache

    report = build_cache(cfg)
    if not is_main_rank():
        return
    # Short headers: the table must fit 80 columns without truncating a number.
    table = Table(title=f"cache {report.path}", title_justify="left")
    for col in ("split", "examples", "tokens", "cut", "units", "s", "ex/s", "MB"):
        table.add_column(col, justify="right" if col != "split" else "left", no_wrap=True)
    for s in report.splits:
        rate = (s.examples if s.units_written else 0) / s.seconds if s.seconds else 0
        table.add_row(s.split, f"{s.examples:,}", f"{s.tokens:,}", f"{s.truncated:,}", str(s.units_written), f"{s.seconds:.1f}", f"{rate:,.0f}", f"{s.bytes_written / 1e6:,.1f}")
    out_console.print(table)
    ranks = f" summed over {report.world_size} ranks" if report.world_size > 1 else ""
    out_console.print(f"wall {report.wall_seconds:.1f} s (backbone {report.forward_seconds:.1f} s{ranks}; cut = truncated inputs). Train from it with:", highlight=False)
    print_command(f"read-cache train --cache {report.path}")


@app.command()
@user_errors
def train(
    cache: CacheArg = None,
    rnn: Annotated[str, typer.Option(help="Side network RNN: gru, lstm, rnn (Elman), or none (a probe on the frozen states).")] = "gru",
    dim: Annotated[int, typer.Option(help="RNN hidden size r (the paper: 128 or 256).")] = 256,
    head: Annotated[Optional[str], typer.Option(help="lm (frozen LM head over the label words) or linear; default: lm for T5 classification, else linear.")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Encoder-only caches: mean or first token; default: the model family's way, as the cache records it.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate; default 1e-3, or Table 9's with --preset paper; with --method, the method's own.")] = None,
    weight_decay: WeightDecay = 0.0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (default and the paper: 96).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs (default and the paper: 30).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better validation score (default 5; the paper: 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling (a CPU run repeats exactly).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Run folder; default: ./runs/<task>-<rnn><dim>-<head>-<time>.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the run files in an existing --out.")] = False,
    reader: Reader = "auto",
    memory_budget: MemoryBudget = 2.0,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    no_recurrence: NoRecurrence = False,
    preset: Preset = None,
    seeds: Seeds = 1,
    reader_workers: ReaderWorkers = None,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
    method: Annotated[Optional[str], typer.Option(help="Train a baseline on the live backbone instead: full, lora, prompt, adapter, bitfit, lst (NAME-SIZE: lora-32, prompt-10...).")] = None,
    model: Annotated[Optional[str], typer.Option(help="With --method: hub id or local folder of the backbone.")] = None,
    task: Annotated[Optional[str], typer.Option(help="With --method: the GLUE task.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="With --method: local GLUE folder; default: the hub.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --method: at most this many examples per split, as build --limit.")] = None,
) -> None:
    """Stage two: train READ's side network and a head from a cache (the backbone is never loaded), or with
    --method a baseline (LoRA, prompt tuning, adapters, BitFit, LST, full) on the backbone itself."""
    if method is not None or model is not None or task is not None:
        return _train_method(method, model, task, cache, data_dir=data_dir, limit=limit, pooling=pooling, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size or 96, epochs=epochs or 30, patience=patience or 5, seed=seed, out=out, overwrite=overwrite,
                             device=device, threads=threads, progress=not no_progress)
    from read_cache.config import TrainConfig, with_preset
    from read_cache.store.location import parse_storage_options

    values = with_preset(preset, batch_size=batch_size, epochs=epochs, patience=patience)
    cfg = TrainConfig(
        cache=cache, rnn=rnn, dim=dim, head=head, pooling=pooling, lr=lr, weight_decay=weight_decay, seed=seed, out=out,
        overwrite=overwrite, reader=reader, memory_budget_gb=memory_budget, device=device, dtype=dtype, threads=threads, reader_workers=reader_workers,
        progress=not no_progress, recurrence=not no_recurrence, preset=preset, **values,
        storage_options=parse_storage_options(storage_options),
    )
    cfg.validate()
    if seeds <= 0:
        raise ReadCacheError(f"--seeds {seeds} must be at least 1 (the paper averages 3)")
    cfg.cache = resolve_cache(cache)
    if seeds > 1:
        from read_cache.search import train_seeds

        report = train_seeds(cfg, seeds)
        out_console.print(
            f"{report['task']}: {report['rnn']}/{report['dim']} lr {report['lr']:.3g}, seeds {report['seeds']}: "
            f"validation {report['validation']['mean']:.4f} ± {report['validation']['std']:.4f}, "
            f"test {report['metric']} {report['test']['mean']:.4f} ± {report['test']['std']:.4f}; runs in {Path(report['runs'][0]).parent}",
            highlight=False,
        )
        return
    from read_cache.train import train as train_side_network

    summary = train_side_network(cfg)
    if not is_main_rank():
        return
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


@app.command()
@user_errors
def predict(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to label; a sentence pair as 'first ||| second'.")] = None,
    run: Annotated[Path, typer.Option(help="A run folder written by `read-cache train`.")] = ...,
    model: Annotated[Optional[str], typer.Option(help="The backbone; default: the one the run's cache was built from.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="A UTF-8 text file with one text (or 'first ||| second' pair) per line.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda; default: CUDA when present.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per text, with every label's probability.")] = False,
) -> None:
    """Run the backbone and a trained side network together on new text; print each label and its probability."""
    lines = list(texts or [])
    empty = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if empty:
        raise ReadCacheError(f"text argument {empty[0]} is empty; pass the text to label (or drop the empty argument)")
    if file is not None:
        lines += [line for line in read_text_file(file).splitlines() if line.strip()]
    if not lines:
        raise ReadCacheError("nothing to predict; pass texts as arguments or --file F")
    examples = [tuple(part.strip() for part in line.split("|||")) if "|||" in line else line for line in lines]
    from read_cache.predict import predict as predict_texts

    result = predict_texts(run, examples, model, device=device)
    for line, row in zip(lines, result.rows()):
        if as_json:
            typer.echo(json.dumps({"text": line, **row}))
        elif "score" in row:
            typer.echo(f"{row['score']:.3f}\t{line}")
        else:  # plain tab-separated lines, for pipes: label, its probability, the text
            typer.echo(f"{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{line}")


def read_text_file(file: Path) -> str:
    if not file.is_file():
        raise ReadCacheError(f"--file {file} does not exist; pass a text file with one example per line")
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReadCacheError(f"--file {file} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); save it as UTF-8 and retry") from None


@app.command()
@user_errors
def inspect(
    cache: Annotated[Optional[str], typer.Argument(help="Cache folder or URL; default: the last one built.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Show what a cache holds: splits, sizes, shapes, types, completeness."""
    from read_cache.describe import describe
    from read_cache.store import open_cache
    from read_cache.store.location import parse_storage_options

    info = describe(open_cache(resolve_cache(cache), parse_storage_options(storage_options)))
    if as_json:
        out_console.print_json(json.dumps(info))
        return
    out_console.print(
        f"[bold]{info['path']}[/]\nmodel {info['model']} ({info['backbone']}), task {info['task']}, "
        f"{info['float_dtype']} ({info['compute_dtype']} compute), cross-attention {info['cross_attention']}, "
        f"codec {info['codec']['compressor']}-{info['codec']['cname']}-{info['codec']['clevel']}+{info['codec']['checksum']}, "
        f"max length {info['max_length']}\n{info['split_recipe']}"
    )
    table = Table()
    for col in ("split", "examples", "tokens", "complete", "truncated", "raw MB", "disk MB", "ratio"):
        table.add_column(col, justify="left" if col in ("split", "complete") else "right")
    for name, s in info["splits"].items():
        done = "yes" if s["complete"] else f"no ({s['examples_written']:,} written)"
        ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "-"
        table.add_row(name, f"{s['examples']:,}", f"{s['tokens']:,}", done, f"{s['truncated']:,}", f"{s['raw_bytes'] / 1e6:,.1f}", f"{s['disk_bytes'] / 1e6:,.1f}", ratio)
    out_console.print(table)
    for name, s in info["splits"].items():
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in s["shapes"].items() if k != "units_done")
        out_console.print(f"{name}: {shapes}", highlight=False)
    for name, s in info["splits"].items():
        for array, e in s.get("reconstruction_error", {}).items():
            per_layer = " ".join(f"{x:.2%}" for x in e["rel_rms"])
            out_console.print(
                f"{name} {array} error ({e['rows']:,} sampled rows): relative RMS per layer {per_layer}; "
                f"worst row {max(e['worst_row_rel']):.2%}; channel-weighted up to {max(e['channel_rel_rms']):.2%}",
                highlight=False,
            )


@app.command()
@user_errors
def caches(
    root: Annotated[Optional[Path], typer.Option(help="Where to look; default: $READ_CACHE_HOME/caches.")] = None,
    rm: Annotated[Optional[list[Path]], typer.Option("--rm", help="Delete this cache folder (repeatable); refuses anything that is not a cache.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the caches under the cache root (model, task, size, completeness), or delete one with --rm."""
    from read_cache import paths
    from read_cache.describe import cache_listing, find_caches, remove_cache

    for path in rm or []:
        remove_cache(path.expanduser())
        out_console.print(f"deleted {path}", highlight=False)
    if rm:
        return
    folder = (root or paths.cache_home() / "caches").expanduser()
    rows = [cache_listing(path) for path in find_caches(folder)]
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    if not rows:
        out_console.print(f"no caches under {folder}; build one with `read-cache build`", highlight=False)
        return
    last = paths.last_cache()
    table = Table(title=f"caches under {folder}", title_justify="left")
    for col in ("model", "task", "MB", "complete", "path"):
        table.add_column(col, justify="right" if col == "MB" else "left", overflow="fold")
    for row in rows:
        done = "yes" if row["complete"] else ("damaged" if row["problem"] else "no")
        marker = " (last built)" if last is not None and Path(row["path"]).resolve() == last else ""
        table.add_row(row["model"] or "?", row["task"] or "?", f"{row['disk_bytes'] / 1e6:,.1f}", done, row["path"] + marker)
    out_console.print(table)


@app.command()
@user_errors
def bench(
    model: Annotated[str, typer.Option(help="Hub id or local model folder.")],
    task: Annotated[str, typer.Option(help="GLUE task.")],
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md, bench.png, the cache and runs.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Local GLUE folder; default: the hub.")] = None,
    limit: Annotated[int, typer.Option(help="Examples per split.")] = 2000,
    epochs: Annotated[int, typer.Option(help="E: epochs of every training method.")] = 10,
    slow_epochs: Annotated[Optional[int], typer.Option(help="Epochs actually run for online READ and full fine-tuning, scaled to E.")] = None,
    rnn: Annotated[str, typer.Option(help="Side network RNN.")] = "gru",
    dim: Annotated[int, typer.Option(help="Side network size r.")] = 256,
    lr: Annotated[float, typer.Option(help="Side network learning rate.")] = 1e-3,
    full_lr: Annotated[float, typer.Option(help="Full fine-tuning learning rate.")] = 1e-4,
    batch_size: BatchSize = 96,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: CUDA when present.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated subset of the methods (default all), and baselines: lora-8, lora-32, prompt-20, adapter-64, bitfit, lst-8...; others are kept from an earlier run in --out.")] = ",".join(METHODS),
) -> None:
    """Cached READ against online READ, full fine-tuning and the baselines of the paper's Table 1: score, time, energy, memory."""
    from read_cache.config import BenchConfig

    cfg = BenchConfig(
        model=model, task=task, out=out, data_dir=data_dir, limit=limit, epochs=epochs, slow_epochs=slow_epochs,
        rnn=rnn, dim=dim, lr=lr, full_lr=full_lr, batch_size=batch_size, device=device, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
    )
    cfg.validate()
    from read_cache.bench import run_bench

    run_bench(cfg)
    out_console.print((out / "bench.md").read_text(), markup=False, highlight=False)
    out_console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench-scores.png'}")


@app.command()
@user_errors
def sweep(
    out: Annotated[Path, typer.Option(help="Sweep folder: sweep.json, sweep.png, and a run folder per configuration under runs/.")],
    cache: CacheArg = None,
    rnn: Annotated[Optional[str], typer.Option(help="Comma-separated RNNs (gru, lstm, rnn, none), crossed with --dim; 'gru/256' brings its own size; default gru (with --preset paper or --rounds: gru/256,gru/128,lstm/128).")] = None,
    dim: Annotated[Optional[str], typer.Option(help="Comma-separated RNN sizes crossed with the plain --rnn entries; default 256.")] = None,
    lr: Annotated[Optional[str], typer.Option(help="Comma-separated learning rates; default 1e-3 (leave out with --trials).")] = None,
    head: Annotated[Optional[str], typer.Option(help="Comma-separated heads (lm, linear); default: lm for T5 classification, else linear.")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Draw this many learning rates log-uniformly over --lr-range, architectures taken in turn.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Bayesian learning-rate search (optuna TPE) with this many rounds per architecture (--preset paper: 32).")] = None,
    per_round: Annotated[int, typer.Option(help="Learning rates each architecture tries per search round, trained together.")] = 1,
    lr_range: Annotated[str, typer.Option(help="LOW:HIGH for --trials and --rounds (the paper: 1e-6:3e-3).")] = "1e-6:3e-3",
    search: Annotated[str, typer.Option(help="grid (each to --epochs or its early stop) or halving (after epochs 1, eta, eta^2... keep the best 1/eta).")] = "grid",
    eta: Annotated[int, typer.Option(help="Successive halving's reduction factor.")] = 3,
    pooling: Annotated[Optional[str], typer.Option(help="Encoder-only caches: mean or first token; default: the model family's way, as the cache records it.")] = None,
    weight_decay: WeightDecay = 0.0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (default and the paper: 96).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs per configuration (default and the paper: 30).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="A configuration stops after this many epochs without a better validation score (default 5; the paper: 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every configuration's initialisation, the shuffling and the --trials draws.")] = 0,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Run every configuration with this many seeds (--seed, --seed+1, ...) and rank by the mean (--preset paper: 3).")] = None,
    preset: Preset = None,
    no_recurrence: NoRecurrence = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the sweep's files in an existing --out.")] = False,
    reader: Reader = "auto",
    memory_budget: MemoryBudget = 2.0,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    reader_workers: ReaderWorkers = None,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
) -> None:
    """Train many side networks from one read of the cache; select by validation, report that run's test score."""
    from read_cache.config import SearchConfig, SweepConfig, TrainConfig, parse_list, parse_range, with_preset
    from read_cache.store.location import parse_storage_options

    shared = TrainConfig(
        cache=cache, pooling=pooling, weight_decay=weight_decay, seed=seed, reader=reader, memory_budget_gb=memory_budget,
        device=device, dtype=dtype, threads=threads, reader_workers=reader_workers, progress=not no_progress, recurrence=not no_recurrence, preset=preset,
        storage_options=parse_storage_options(storage_options),
        **with_preset(preset, batch_size=batch_size, epochs=epochs, patience=patience),
    )
    shared.validate()
    n_seeds = seeds if seeds is not None else (3 if preset == "paper" else 1)
    if rounds is not None or (preset == "paper" and lr is None and trials is None):
        if lr is not None or trials is not None:
            raise ReadCacheError("--rounds searches the learning rate itself; drop --lr and --trials (or --rounds)")
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
        from read_cache.search import search as run_search

        _print_search(run_search(search_cfg), out)
        return
    cfg = SweepConfig(
        out=out, rnn=parse_list("--rnn", "gru" if rnn is None else rnn, str), dim=None if dim is None else parse_list("--dim", dim, int),
        lr=None if lr is None else parse_list("--lr", lr, float), head=(None,) if head is None else parse_list("--head", head, str),
        trials=trials, lr_range=parse_range("--lr-range", lr_range), search=search, eta=eta, overwrite=overwrite, shared=shared,
    )
    cfg.validate()
    if n_seeds <= 0:
        raise ReadCacheError(f"--seeds {n_seeds} must be at least 1 (the paper averages 3)")
    shared.cache = resolve_cache(cache)
    if n_seeds > 1:
        from read_cache.search import sweep_seeds

        _print_seeds(sweep_seeds(cfg, n_seeds), out)
        return
    from read_cache.sweep import ranked
    from read_cache.sweep import sweep as run_sweep

    report = run_sweep(cfg)
    if not is_main_rank():
        return
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


def print_command(command: str) -> None:
    """A command to copy, on its own line and never wrapped, whatever the terminal's width."""
    typer.echo(f"  {command}")


@app.command()
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
    per_round: Annotated[int, typer.Option(help="Learning rates each architecture tries per round (trained together).")] = 1,
    rnn: Annotated[str, typer.Option(help="Architecture candidates, rnn/dim (the paper's Table 8).")] = "gru/256,gru/128,lstm/128",
    lr_range: Annotated[str, typer.Option(help="LOW:HIGH of the learning-rate search (the paper: 1e-6:3e-3).")] = "1e-6:3e-3",
    preset: Preset = None,
    protocol: ProtocolOpt = "t5",
    drop_last_layers: DropLayers = 0,
    no_recurrence: NoRecurrence = False,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="Build compute dtype bf16|fp16|fp32; default: safe and fast on this device.")] = None,
    build_batch_size: Annotated[int, typer.Option(help="Examples per forward pass of the builds.")] = 64,
    device: Device = None,
    threads: Threads = None,
    memory_budget: MemoryBudget = 2.0,
    no_progress: NoProgress = False,
) -> None:
    """The paper's protocol end to end: build every task's cache, search, select one architecture, write Table 1."""
    from read_cache.config import GlueConfig, SearchConfig, TrainConfig, parse_list, parse_range, with_preset
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
    from read_cache.glue import TABLE, run_glue

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


def resolve_cache(cache: Path | str | None) -> Path | str:
    """The cache the user named, or the last one built (and say which)."""
    from read_cache import paths

    if cache is not None:
        return cache
    last = paths.last_cache()
    if last is None:
        raise ReadCacheError("no cache given and none built yet; pass --cache PATH or run `read-cache build` first")
    logging.getLogger(__name__).info("using the last cache built: %s", last)
    return last


def main() -> None:
    app(prog_name="read-cache")


if __name__ == "__main__":
    sys.exit(main())
