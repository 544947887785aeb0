"""The on-disk cache: the only package that knows (and imports) zarr.

    cache = read_cache.open_cache("caches/t5-small/sst2")
    cache["train"][0].encoder_hidden          # [m, N_E, d] float32

`store.layout` draws the tree and says why it looks like that (docs/cache-format.md repeats it with plain-zarr
recipes); `store.writer` writes it (stage one), `store.cache` reads it. `store.formats` holds the compact
8-/4-bit formats, `store.location` the folder or bucket a cache lives in, `store.lease` the build's lock in a
bucket, `store.readahead` the reads kept in flight. Callers import from here: the names below stay put
whichever module holds them.
"""

from __future__ import annotations

from read_cache.store.cache import (
    Block,
    Cache,
    Example,
    Split,
    free_bytes,
    has_node,
    open_cache,
    open_node,
)
from read_cache.store.layout import (
    CHUNK_BYTES,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    ROOT_ARRAYS,
    SCALED_ARRAYS,
    SPLITS,
    UNIT_TOKEN_CHUNKS,
    Geometry,
    Unit,
    channel_scale_array,
    check_format_version,
    choose_unit_examples,
    codec_description,
    decode_floats,
    encode_floats,
    plan_units,
    ragged_rows,
    read_root_attrs,
    resolve_codec,
    storage_numpy_dtype,
    token_rows,
)
from read_cache.store.writer import (
    BuildLock,
    CacheWriter,
    clear_cache_dir,
    is_cache,
    prepare_cache_dir,
    remove_partial_files,
)

__all__ = [
    "CHUNK_BYTES",
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "ROOT_ARRAYS",
    "SCALED_ARRAYS",
    "SPLITS",
    "UNIT_TOKEN_CHUNKS",
    "Block",
    "BuildLock",
    "Cache",
    "CacheWriter",
    "Example",
    "Geometry",
    "Split",
    "Unit",
    "channel_scale_array",
    "check_format_version",
    "choose_unit_examples",
    "clear_cache_dir",
    "codec_description",
    "resolve_codec",
    "decode_floats",
    "encode_floats",
    "free_bytes",
    "has_node",
    "is_cache",
    "open_cache",
    "open_node",
    "plan_units",
    "prepare_cache_dir",
    "read_root_attrs",
    "remove_partial_files",
    "storage_numpy_dtype",
    "ragged_rows",
    "token_rows",
]
