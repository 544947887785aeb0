"""Rewrite a finished cache in another store format without running the backbone again.

    python -m read_cache.store.transcode CACHE_BF16 CACHE_INT8 int8

The states are decoded from the source format and quantised again, so a compact cache made from a
bfloat16 one carries bfloat16's rounding (at most 2^-9 relative per value) under its own; a build
quantises the float32 states directly. Used by `read-cache bench --methods reader` (one cache per
format from one build) and by examples/storage_accuracy.sh (the same states in every format).
The reconstruction error is recorded against the decoded source, as the build records it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from read_cache.errors import ReadCacheError
from read_cache.store import (
    SCALED_ARRAYS,
    SPLITS,
    Cache,
    CacheWriter,
    Geometry,
    codec_description,
    open_cache,
    plan_units,
    prepare_cache_dir,
    resolve_codec,
)
from read_cache.store.formats import (
    CHANNEL_SAMPLE_EXAMPLES,
    ErrorStats,
    dequantise,
    fit_channel_scale,
    get_format,
    quantise,
)

log = logging.getLogger(__name__)


def transcode(source: Path, dest: Path, store_dtype: str, codec: str = "auto") -> Path:
    """Write `source` (complete) to `dest` (new) in `store_dtype` with `codec` (see `store.resolve_codec`); returns dest."""
    fmt = get_format(store_dtype)
    src = open_cache(source)
    src.require_complete()
    if (dest / "zarr.json").exists():
        raise ReadCacheError(f"{dest} already holds a cache; choose a new folder to transcode into")
    prepare_cache_dir(dest)
    geometry = dataclasses.replace(src.geometry, float_dtype=fmt.name, codec=resolve_codec(fmt.name, codec))
    attrs = {k: v for k, v in src.attrs.items() if k not in ("format_version", "geometry", "splits")}
    attrs.update(
        float_dtype=fmt.name,
        codec=codec_description(fmt.name, codec),
        build={**src.attrs["build"], "float_dtype": fmt.name, "codec": geometry.codec},
        transcoded_from={"path": str(source), "float_dtype": src.geometry.float_dtype},
    )
    channels = _channel_scales(src) if fmt.compact else {}
    writer = CacheWriter.create(dest, geometry, attrs, src.root_arrays(), channels)
    for split in SPLITS:
        _transcode_split(src[split], writer, geometry, split, channels)
    return dest


def _channel_scales(src: Cache) -> dict[str, np.ndarray]:
    """The source's per-channel scales, or ones fitted as the build fits them (its first train examples, decoded)."""
    found = {name: scale for name in SCALED_ARRAYS if (scale := src.channel_scale(name)) is not None}
    if found:
        return found
    train = src["train"]
    sample = train.read_block(0, min(CHANNEL_SAMPLE_EXAMPLES, len(train)))
    arrays = {"encoder_hidden": (sample.encoder_hidden, sample.encoder_scale), "decoder_hidden": (sample.decoder_hidden, sample.decoder_scale)}
    fmt = src.geometry.format
    return {
        name: fit_channel_scale(dequantise(codes, scale, fmt, channel=src.channel_scale(name)))
        for name, (codes, scale) in arrays.items() if codes is not None
    }


def _transcode_split(split, writer: CacheWriter, geometry: Geometry, name: str, channels: dict[str, np.ndarray]) -> None:
    fmt = geometry.format
    skeleton = {key: split.array(key)[...] for key in ("offsets", "input_ids", "label", "index")}
    status = split.cache.split_status(name)
    writer.create_split(
        name, offsets=skeleton["offsets"], input_ids=skeleton["input_ids"], labels=skeleton["label"], index=skeleton["index"],
        info={"source": status.get("source"), "truncated": status.get("truncated", 0)},
    )
    units = plan_units(skeleton["offsets"], writer.group[name].attrs["unit_examples"], geometry.token_chunk)
    src_fmt = split.cache.geometry.format
    errors: dict[str, ErrorStats] = {}
    has_decoder = geometry.cross_attention is not None
    for unit in units:
        t0, t1 = unit.tokens
        e0, e1 = unit.examples
        tokens, examples = {}, {}
        sources = [("encoder_hidden", slice(t0, t1), tokens)]
        if has_decoder:
            sources.append(("decoder_hidden", slice(e0, e1), examples))
            tokens["cross_attention"] = split.array("cross_attention")[t0:t1]
        for array, rows, out in sources:
            scale = split.array(f"{array}_scale")[rows] if src_fmt.compact else None
            values = dequantise(split.array(array)[rows], scale, src_fmt, channel=split.cache.channel_scale(array))
            codes, new_scale = quantise(values, fmt, channels.get(array))
            out[array] = codes
            if new_scale is not None:
                out[f"{array}_scale"] = new_scale
            if len(values):
                stats = errors.setdefault(array, ErrorStats.empty(values.shape[1]))
                channel = channels.get(array)  # the error on the scaled states, as the build measures it
                stats.add(values[::8] if channel is None else values[::8] / channel, dequantise(codes[::8], None if new_scale is None else new_scale[::8], fmt))
        writer.write_unit(name, unit, tokens, examples)
    for array, stats in errors.items():
        stats.check(fmt, array)
    n, total = len(skeleton["offsets"]) - 1, int(skeleton["offsets"][-1])
    writer.update_split_status(
        name,
        {
            "n_examples": n, "n_tokens": total, "examples_written": n, "complete": True, "truncated": status.get("truncated", 0),
            "source": status.get("source"), "reconstruction_error": {k: v.to_dict() for k, v in errors.items()},
        },
    )
    log.info("transcoded %s: %d examples to %s", name, n, fmt.name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transcode(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
