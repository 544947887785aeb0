"""`read-cache build`: stage one, the frozen backbone over every split into a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from read_cache.cli.common import (
    DropLayers,
    NoProgress,
    ProtocolOpt,
    StorageOptions,
    is_main_rank,
    out_console,
    print_command,
    user_errors,
)
from read_cache.config import BuildConfig


@user_errors
def build(
    model: Annotated[str, typer.Option(help="Hub id (t5-base) or local model folder.")],
    task: Annotated[str, typer.Option(help="GLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Local GLUE folder (original TSV layout or the hub's parquet); default: the hub.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Cache folder or URL (s3://bucket/prefix, gs://, az://...); default: $READ_CACHE_HOME/caches/<model>/<task>.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per split (after the split recipe).")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate inputs to this many tokens (truncations are counted).")] = BuildConfig.max_length,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype bf16|fp16|fp32; default: fast on this device.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu; default: CUDA when present.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass (grouped by length).")] = BuildConfig.batch_size,
    cross_attention: Annotated[str, typer.Option(help="mean (over heads, the paper's) or heads.")] = BuildConfig.cross_attention,
    store_dtype: Annotated[str, typer.Option(help="Stored states: int8 (8-bit codes + a scale per row and per-channel scales), fp8, int4, bfloat16 or float16 (docs/storage.md).")] = BuildConfig.float_dtype,
    codec: Annotated[str, typer.Option(help="auto (raw 8-/4-bit codes, zstd for 16-bit floats), none (a 16-bit cache streams ~23x faster, ~1.35x the bytes), zstd or lz4; crc32c always (docs/storage.md).")] = BuildConfig.codec,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of --model.")] = None,
    chunk_mb: Annotated[float, typer.Option(help="Target raw MiB per chunk of token rows.")] = BuildConfig.chunk_mb,
    force: Annotated[bool, typer.Option(help="Build even if the size estimate exceeds free disk.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete the cache already at --out and build it anew (default: resume it).")] = False,
    protocol: ProtocolOpt = BuildConfig.protocol,
    drop_last_layers: DropLayers = BuildConfig.drop_last_layers,
    tokens: Annotated[str, typer.Option(help="Decoder-only models: cache every token's states (all) or the readout token's alone (last: far smaller; enough for --head lm and the last-token linear head).")] = BuildConfig.tokens,
    prompt: Annotated[Optional[str], typer.Option(help="Decoder-only models: the input template, one {field} per text field, ending where the label word follows; default: the task's T5 text, then a line 'answer:'.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Tokenise only (no weights loaded), print examples, tokens and projected size per --store-dtype, exit.")] = False,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
) -> None:
    """Stage one: run the frozen backbone once over every split and cache its states."""
    from read_cache.paths import parse_storage_options

    cfg = BuildConfig(
        model=model, task=task, data_dir=data_dir, out=out, limit=limit, max_length=max_length, dtype=dtype,
        device=device, batch_size=batch_size, cross_attention=cross_attention, float_dtype=store_dtype, codec=codec,
        revision=revision, chunk_mb=chunk_mb, force=force, overwrite=overwrite, dry_run=dry_run, progress=not no_progress, protocol=protocol,
        drop_last_layers=drop_last_layers, tokens=tokens, prompt=prompt,
        storage_options=parse_storage_options(storage_options),
    )
    cfg.validate()  # before the heavy imports below: a bad flag is rejected in well under a second
    if dry_run:
        from read_cache.build.estimate import estimate_build, estimate_table

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
