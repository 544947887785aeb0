"""`read-cache inspect` (what one cache holds) and `read-cache caches` (the caches under the cache root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from read_cache.cli.common import StorageOptions, out_console, user_errors
from read_cache.paths import resolve_cache


@user_errors
def inspect(
    cache: Annotated[Optional[str], typer.Argument(help="Cache folder or URL; default: the last one built.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Show what a cache holds: splits, sizes, shapes, types, completeness."""
    from read_cache.paths import parse_storage_options
    from read_cache.store import open_cache
    from read_cache.store.describe import describe

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


@user_errors
def caches(
    root: Annotated[Optional[Path], typer.Option(help="Where to look; default: $READ_CACHE_HOME/caches.")] = None,
    rm: Annotated[Optional[list[Path]], typer.Option("--rm", help="Delete this cache folder (repeatable); refuses anything that is not a cache.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the caches under the cache root (model, task, size, completeness), or delete one with --rm."""
    from read_cache import paths
    from read_cache.store.describe import cache_listing, find_caches, remove_cache

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
