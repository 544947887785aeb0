"""What a cache holds, for `read-cache inspect` and `read-cache caches`, and for people: `describe(open_cache(path))`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from read_cache import paths
from read_cache.errors import ReadCacheError
from read_cache.store import BuildLock, Cache, is_cache, open_cache


def describe(cache: Cache) -> dict[str, Any]:
    """A JSON-friendly summary: model, task, types, and per split sizes, shapes and completeness."""
    info = cache.info
    splits = {}
    for name in cache.splits:
        split = cache[name]
        status = cache.split_status(name)
        raw, disk = cache.raw_bytes(name), cache.disk_bytes(name)
        splits[name] = {
            "examples": len(split),
            "tokens": split.n_tokens,
            "examples_written": status.get("examples_written", 0),
            "complete": bool(status.get("complete")),
            "truncated": status.get("truncated", 0),
            "source": status.get("source"),
            "shapes": {key: list(split.array(key).shape) for key in sorted(split.array_names())},
            "raw_bytes": raw,
            "disk_bytes": disk,
            # Only a finished split has all its chunks on disk to compare with the raw size.
            "compression_ratio": raw / disk if disk and status.get("complete") else None,
            # Per array, per layer, measured by the build on a sample (absent in version-1 caches).
            "reconstruction_error": {
                name: {k: e[k] for k in ("rel_rms", "worst_row_rel", "channel_rel_rms", "rows")}
                for name, e in status.get("reconstruction_error", {}).items()
            },
        }
    return {
        "path": str(cache.path),
        "format_version": info.format_version,
        "model": info.model,
        "backbone": info.backbone_kind,
        "fingerprint": info.fingerprint,
        "task": info.task,
        "float_dtype": info.float_dtype,
        "compute_dtype": info.compute_dtype,
        "codec": info.codec,
        "cross_attention": info.cross_attention,
        "max_length": info.max_length,
        "split_recipe": info.split_recipe,
        "protocol": info.protocol,
        "drop_last_layers": info.drop_last_layers,
        "splits": splits,
    }


def find_caches(root: Path) -> list[Path]:
    """Every cache folder under `root` (a cache's own subfolders are not searched)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder, subfolders, _ in os.walk(root):
        if is_cache(Path(folder)):
            found.append(Path(folder))
            subfolders.clear()
    return sorted(found)


def cache_listing(path: Path) -> dict[str, Any]:
    """One row of `read-cache caches`: what it is, how big, whether it is complete (or why it cannot be read)."""
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    try:
        cache = open_cache(path)
        splits = {name: bool(cache.split_status(name).get("complete")) for name in cache.splits}
        return {"path": str(path), "model": cache.model, "task": cache.task, "disk_bytes": size,
                "complete": bool(splits) and len(splits) == 3 and all(splits.values()), "problem": None}
    except ReadCacheError as e:
        return {"path": str(path), "model": None, "task": None, "disk_bytes": size, "complete": False, "problem": str(e)}


def remove_cache(path: Path) -> None:
    """Delete one cache folder; refuses anything that is not a cache, and a cache a build is writing."""
    if not is_cache(path):
        raise ReadCacheError(f"--rm {path} is not a read-cache cache (no zarr.json with a format_version); nothing was deleted")
    with BuildLock(path):
        shutil.rmtree(path)
    if paths.last_cache() == path.resolve():
        paths.forget_last_cache()
