"""What a cache holds, for `read-cache inspect` and for people: `describe(open_cache(path))`."""

from __future__ import annotations

from typing import Any

from read_cache.store import Cache


def describe(cache: Cache) -> dict[str, Any]:
    """A JSON-friendly summary: model, task, types, and per split sizes, shapes and completeness."""
    attrs = cache.attrs
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
        }
    return {
        "path": str(cache.path),
        "format_version": attrs["format_version"],
        "model": cache.model,
        "backbone": cache.backbone_kind,
        "fingerprint": attrs["backbone"].get("fingerprint"),
        "task": cache.task,
        "float_dtype": attrs["float_dtype"],
        "compute_dtype": attrs["compute_dtype"],
        "codec": attrs["codec"],
        "cross_attention": attrs["cross_attention"],
        "max_length": attrs["build"]["max_length"],
        "split_recipe": attrs["data"]["split_recipe"],
        "splits": splits,
    }
