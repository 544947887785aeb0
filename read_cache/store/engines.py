"""The engines a local cache's chunks can be read with, for `bench --methods reader` to race (docs/benchmarks.md).

    readers = engine_readers(split)          # {"zarr": read(a, b), "zarrs": ..., "tensorstore": ..., "direct": ...}

zarr-python's default pipeline, the `zarrs` Rust pipeline for zarr-python, tensorstore's zarr3 driver and
store.direct, each landing rows [a, b) of one array: `direct` reads the chunk files by `preadv` into a
reused page-aligned buffer and checks their CRC32C there. The streaming reader reads raw local arrays
directly and goes through zarr where an array is compressed or remote: the bench's table is why. An engine
that is not installed is left out. (A fifth, mapping the chunk files and checking them on the mapping, won
this race alone but lost inside the reader, whose threads map and unmap concurrently: docs/benchmarks.md.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zarr

from read_cache.store.cache import Split
from read_cache.store.direct import direct_arrays
from read_cache.util.aligned import page_aligned

ENGINES = ("zarr", "zarrs", "tensorstore", "direct")
ZARRS_PIPELINE = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}


def engine_readers(split: Split, name: str = "encoder_hidden") -> dict[str, Callable[[int, int], Any]]:
    """Readers of rows [a, b) of one array through each engine that can read it."""
    folder = split.cache.location.path / split.name / name
    readers: dict[str, Callable[[int, int], Any]] = {"zarr": lambda a, b: split.array(name)[a:b]}
    try:
        with zarr.config.set(ZARRS_PIPELINE):
            rust = zarr.open_array(folder, mode="r")
            rust[:1]  # the pipeline is chosen at opening; a first read proves it works here
        readers["zarrs"] = lambda a, b: _with_zarrs(lambda: rust[a:b])
    except Exception:  # noqa: BLE001 - not installed or not supported: the engine is left out
        pass
    try:
        import tensorstore as ts

        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}, read=True).result()
        readers["tensorstore"] = lambda a, b: store[a:b].read().result()
    except Exception:  # noqa: BLE001
        pass
    direct = direct_arrays(split, (name,)).get(name)
    if direct is not None:
        rows = direct.span(0, 32 * direct.chunk_rows)
        out = page_aligned(rows * direct.chunk_bytes // direct.chunk_rows).view(direct.dtype).reshape(rows, *direct.row_shape)
        readers["direct"] = lambda a, b: direct.read_into(a, b, out)
    return readers


def _with_zarrs(read: Callable[[], Any]) -> Any:
    with zarr.config.set(ZARRS_PIPELINE):
        return read()


