"""The on-disk cache: the only module that knows (and imports) zarr.

    cache = read_cache.open_cache("caches/t5-small/sst2")
    cache["train"][0].encoder_hidden          # [m, N_E, d] float32

Layout (Zarr v3; see docs/cache-format.md for the same with plain-zarr recipes)::

    CACHE/                          group; root attributes describe everything (ROOT ATTRIBUTES below)
      lm_head_rows   [C, d] f32     LM-head rows of the label words' first tokens (T5 only)
      train/                        one group per split: train, validation, test
        offsets         [N+1] i64   example n owns tokens offsets[n]:offsets[n+1]
        input_ids       [T] i32     the tokens of every example, concatenated (ragged, never padded)
        encoder_hidden  [T, N_E, d] encoder states after layers 1..N_E (16-bit, or 8-/4-bit codes: `float_dtype`)
        encoder_hidden_scale [T, N_E(, d/g)] the codes' scales (fp8, int8, int4 only; see store/formats.py)
        cross_attention [T, N_D]    decoder position 0's cross-attention onto each token, head mean
                        [T, N_D, H] ... or per head (`--cross-attention heads`); absent for encoders
        decoder_hidden  [N, N_D, d] decoder states after layers 1..N_D at position 0; absent for encoders
        decoder_hidden_scale [N, N_D(, d/g)] its scales (compact formats)
        label           [N]         i64 class id, or f32 score (STS-B)
        index           [N] i64     row of the example in its original dataset split
        units_done      [U] u8      1 once work unit u is durable (one chunk per unit)
      validation/ ...
      test/ ...

Why it looks like this:
- Per-token arrays share axis 0 and are chunked in whole tokens (all layers of a token in one chunk),
  so a training reader decodes contiguous token blocks, and nothing is padded.
- 16-bit floats: bfloat16 is stored as its raw uint16 bits (zarr has no bfloat16 type); the array
  attribute `float_dtype` says so. float16 is stored natively. The compact formats (fp8, int8, int4)
  store codes plus scales in their own arrays, chunked with the same rows (store/formats.py);
  cross-attention stays bfloat16 in them (it is small).
- Work is cut into *units* of whole example chunks. Unit u owns examples [u*U, (u+1)*U) and the
  token chunks whose first token falls inside its examples, so every chunk of every array is
  written by exactly one unit: units can be written in any order, by any number of processes, and a
  rerun of a unit rewrites the same bytes. `units_done[u]` is set only after the unit's chunk files
  are fsynced, and a split is `complete` in the root attributes only after every unit is done.
- Every chunk ends in a CRC32C checksum, so a flipped byte is an error naming the array, never
  silently wrong numbers.
- The same tree lives in an object store (s3://, gs://, az://, fsspec URLs): `store.location` picks the
  zarr store for a path or URL, `store.lease` replaces the flock there, `store.readahead` keeps many
  block reads in flight (docs/object-storage.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from read_cache.errors import CacheCorruptError, ReadCacheError
from read_cache.store.formats import STORE_DTYPES, StoreFormat, dequantise, format_attrs, get_format
from read_cache.store.location import Location, is_storage_failure, storage_error, translated

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2 added the compact formats (fp8, int8, int4: codes + `*_scale` arrays); version-1 caches read unchanged."""
SPLITS = ("train", "validation", "test")
FLOAT_DTYPES = STORE_DTYPES
SCALED_ARRAYS = ("encoder_hidden", "decoder_hidden")
"""The arrays a compact format quantises; cross-attention stays bfloat16 (N_D values per token)."""
# Chunk targets, in raw bytes: big enough that codec and file overheads vanish, small enough that a
# training reader's shuffle blocks stay fine-grained (DESIGN: ~1-8 MB).
CHUNK_BYTES = 4 << 20
UNIT_TOKEN_CHUNKS = 32  # a unit spans about this many token chunks, so its boundary costs ~1%


# --------------------------------------------------------------------------------------------------
# 16-bit float encoding


def encode_floats(values: np.ndarray, float_dtype: str) -> np.ndarray:
    """float32 -> the stored 16-bit representation (bfloat16 bits as uint16, or float16)."""
    if float_dtype == "float16":
        return values.astype(np.float16)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Round to nearest even, as torch's .to(torch.bfloat16) does.
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def decode_floats(stored: np.ndarray, float_dtype: str) -> np.ndarray:
    """The stored 16-bit representation -> float32."""
    if float_dtype == "float16":
        return stored.astype(np.float32)
    return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)


def storage_numpy_dtype(float_dtype: str) -> str:
    return "uint16" if float_dtype == "bfloat16" else "float16"


def codec_description(float_dtype: str = "bfloat16") -> dict[str, Any]:
    codec = get_format(float_dtype).codec
    if codec == "none":
        return {"compressor": "none", "cname": "none", "clevel": 0, "shuffle": "none", "checksum": "crc32c"}
    return {"compressor": "blosc", "cname": codec, "clevel": 1, "shuffle": "shuffle", "checksum": "crc32c"}


def _compressors(typesize: int, codec: str = "zstd") -> list[Any]:
    # Byte-shuffling puts the sign/exponent bytes of 16-bit floats together, which is where the
    # redundancy is; zstd level 1 keeps up with the forward pass. CRC32C catches corrupt chunks.
    # Per-format codecs were chosen from measurements (docs/storage.md).
    if codec == "none":
        return [Crc32cCodec()]
    return [BloscCodec(cname=codec, clevel=1, shuffle="shuffle", typesize=typesize), Crc32cCodec()]


def token_rows(offsets: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """The token rows of `examples` (ragged, delimited by `offsets`), concatenated in that order."""
    starts, stops = offsets[examples], offsets[examples + 1]
    lengths = stops - starts
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(int(lengths.sum())) + shift


# --------------------------------------------------------------------------------------------------
# Geometry: what the arrays of one cache look like


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shapes and types shared by every split of one cache."""

    n_encoder_layers: int
    """N_E: encoder layers cached (1..N_E; the embeddings are not)."""
    n_decoder_layers: int
    """N_D: decoder layers cached; 0 for encoder-only backbones."""
    d_model: int
    """Width d of the hidden states."""
    n_heads: int
    """Attention heads (kept only with cross_attention == 'heads')."""
    cross_attention: str | None
    """'mean' (averaged over heads), 'heads', or None for encoder-only backbones."""
    float_dtype: str
    """How encoder/decoder states are stored: 'bfloat16', 'float16', or codes + scales 'fp8', 'int8', 'int4'."""
    regression: bool
    """Labels are float scores (STS-B) rather than class ids."""
    chunk_bytes: int = CHUNK_BYTES
    """Target raw size of a token chunk (an example chunk gets half)."""

    @property
    def format(self) -> StoreFormat:
        return get_format(self.float_dtype)

    @property
    def cross_dtype(self) -> str:
        """The cross-attention's 16-bit type: the store's own, or bfloat16 beside a compact format."""
        return "bfloat16" if self.format.compact else self.float_dtype

    @property
    def bytes_per_token(self) -> int:
        """Raw (uncompressed) bytes one token adds: states (codes + scales), cross-attention, its id."""
        heads = self.n_heads if self.cross_attention == "heads" else 1
        cross = self.n_decoder_layers * heads if self.cross_attention else 0
        return int(self.n_encoder_layers * self.format.raw_bytes_per_row(self.d_model)) + 2 * cross + 4

    @property
    def bytes_per_example(self) -> int:
        return int(self.n_decoder_layers * self.format.raw_bytes_per_row(self.d_model)) + 16

    @property
    def token_chunk(self) -> int:
        codes = self.n_encoder_layers * self.format.code_width(self.d_model) * np.dtype(self.format.code_dtype).itemsize
        return _pow2_at_most(self.chunk_bytes // codes)

    def values(self, tokens: int, examples: int) -> tuple[int, int]:
        """(hidden-state values, cross-attention values) of `tokens` tokens in `examples` examples."""
        heads = self.n_heads if self.cross_attention == "heads" else 1
        states = (tokens * self.n_encoder_layers + examples * self.n_decoder_layers) * self.d_model
        cross = tokens * self.n_decoder_layers * heads if self.cross_attention else 0
        return states, cross

    def projected_disk_bytes(self, tokens: int, examples: int) -> int:
        """Bytes on disk, from the measured bytes per stored value of the format (docs/storage.md)."""
        states, cross = self.values(tokens, examples)
        bf16 = get_format("bfloat16").disk_bytes_per_value
        return int(states * self.format.disk_bytes_per_value + cross * bf16 + 4 * tokens + 16 * examples)

    def scale_shape(self) -> tuple[int, ...]:
        """Trailing shape of a (token or example, layer) scale array: () per row, (d/g,) per group."""
        fmt = self.format
        return (self.d_model // fmt.group_size(self.d_model),) if fmt.grouped else ()

    @property
    def example_chunk(self) -> int:
        per_example = max(self.bytes_per_example, 2 * self.d_model)
        return _pow2_at_most(self.chunk_bytes // 2 // per_example)

    def cross_shape(self) -> tuple[int, ...]:
        if self.cross_attention == "heads":
            return (self.n_decoder_layers, self.n_heads)
        return (self.n_decoder_layers,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pow2_at_most(n: int) -> int:
    return 1 << max(4, int(math.log2(max(n, 16))))


# --------------------------------------------------------------------------------------------------
# Work units


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently writable piece of a split."""

    index: int
    examples: tuple[int, int]
    """Examples [start, stop) whose per-example rows this unit writes."""
    tokens: tuple[int, int]
    """Tokens [start, stop) this unit writes: whole chunks, except the split's last."""
    compute: tuple[int, int]
    """Examples [start, stop) the backbone must run to produce those rows and tokens."""


def plan_units(offsets: np.ndarray, unit_examples: int, token_chunk: int) -> list[Unit]:
    """Cut a split into units; every chunk of every array belongs to exactly one unit."""
    n = len(offsets) - 1
    total = int(offsets[-1])
    starts = list(range(0, n, unit_examples))
    bounds = [0] + [int(offsets[s]) // token_chunk * token_chunk for s in starts[1:]] + [total]
    units = []
    for u, start in enumerate(starts):
        stop = min(start + unit_examples, n)
        first_needed = int(np.searchsorted(offsets, bounds[u], side="right")) - 1
        units.append(Unit(u, (start, stop), (bounds[u], bounds[u + 1]), (min(first_needed, start), stop)))
    return units


def choose_unit_examples(geometry: Geometry, n_examples: int, n_tokens: int) -> int:
    """Whole example chunks, spanning about UNIT_TOKEN_CHUNKS token chunks."""
    e = geometry.example_chunk
    mean_len = max(n_tokens / max(n_examples, 1), 1.0)
    chunks = max(1, math.ceil(UNIT_TOKEN_CHUNKS * geometry.token_chunk / (e * mean_len)))
    return e * chunks


# --------------------------------------------------------------------------------------------------
# Root attributes


def read_root_attrs(path: Path | str | Location) -> dict[str, Any] | None:
    """The root attributes of a cache at `path` (a folder or URL), or None where there is no cache."""
    location = Location.parse(path)
    try:
        if location.path is not None and not (location.path / "zarr.json").is_file():
            return None
        raw = location.read_bytes("zarr.json")
        return None if raw is None else json.loads(raw).get("attributes", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(f"{location.child('zarr.json')} is not readable JSON ({e}); the cache is damaged: delete it and rebuild") from e


def check_format_version(attrs: dict[str, Any], path: Path | Location) -> None:
    version = attrs.get("format_version")
    if version is None:
        raise ReadCacheError(f"{path} is a zarr group but not a read-cache cache (no format_version attribute)")
    if version > FORMAT_VERSION:
        raise ReadCacheError(
            f"{path} was written in cache format {version}, newer than this read-cache reads ({FORMAT_VERSION}); "
            "upgrade read-cache (pip install -U read-cache)"
        )


# --------------------------------------------------------------------------------------------------
# Writing


class BuildLock:
    """An exclusive flock on the cache folder: two builds into one path cannot both write.

    The kernel drops the lock when the process dies, even by kill -9, so a crashed build never
    leaves a stale lock behind.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ReadCacheError(
                f"another build is writing {self.path} right now; wait for it to finish or choose another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


def prepare_cache_dir(where: Path | Location) -> None:
    """Check --out can hold a cache and create the folder (in a bucket: check it is reachable and fit)."""
    location = Location.parse(where)
    if location.path is None:
        location.check_reachable()
        keys = [k for k in location.keys() if k != "build.lease"]
        if keys and "zarr.json" not in keys:
            raise ReadCacheError(f"--out {location} holds objects but no cache; choose an empty or new prefix")
        return
    path = location.path
    if path.exists() and not path.is_dir():
        raise ReadCacheError(f"--out {path} is a file, not a folder; choose a folder path for the cache")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").is_file():
        raise ReadCacheError(f"--out {path} is a non-empty folder that holds no cache; choose an empty or new folder")
    path.mkdir(parents=True, exist_ok=True)


def clear_cache_dir(where: Path | Location) -> None:
    """Delete a cache's contents but keep its folder: the build's lock is held on the folder itself
    (in a bucket: every object under the prefix but the build's lease)."""
    location = Location.parse(where)
    if location.path is None:
        location.delete_keys([k for k in location.keys() if k != "build.lease"])
        return
    for child in location.path.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def is_cache(path: Path) -> bool:
    """A folder with a read-cache root zarr.json (readable or not)."""
    meta = path / "zarr.json"
    return meta.is_file() and '"format_version"' in meta.read_text(errors="replace")


def remove_partial_files(where: Path | Location) -> int:
    """Delete zarr's temporary `*.partial` files left behind by a killed writer (none in a bucket: PUTs are atomic)."""
    location = Location.parse(where)
    if location.path is None:
        return 0
    removed = 0
    for leftover in location.path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


class CacheWriter:
    """Creates a cache and writes units of its splits; used by stage one only."""

    def __init__(self, path: Path | Location, geometry: Geometry):
        self.location = Location.parse(path)
        self.path = self.location.path or self.location  # a Path on disk, else the Location (prints as its URL)
        self.geometry = geometry
        self.group = zarr.open_group(self.location.store(), mode="a", zarr_format=3)
        self.guard: Any = None
        """Called before each write; the build sets it to its lease's `check` (see store.lease)."""

    @classmethod
    def create(cls, path: Path | Location, geometry: Geometry, attrs: dict[str, Any], lm_head_rows: np.ndarray | None) -> CacheWriter:
        attrs = {**attrs, "format_version": FORMAT_VERSION, "geometry": geometry.to_dict(), "splits": {}}
        location = Location.parse(path)
        if location.is_local:
            # Never mode="w": that deletes and recreates the folder, and the build's flock (held on the
            # folder itself) would stay on the deleted one, letting a second build in.
            group = zarr.create_group(location.store(), zarr_format=3, attributes=attrs, overwrite=False)
        else:
            # The prefix already holds the build's lease object, which create_group would refuse (and
            # mode "w" delete); prepare_cache_dir made sure nothing else is there.
            group = zarr.open_group(location.store(), mode="a", zarr_format=3, attributes=attrs)
        if lm_head_rows is not None:
            group.create_array("lm_head_rows", data=lm_head_rows.astype(np.float32), overwrite=True)
        return cls(path, geometry)

    # --- split creation --------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return split in self.group and "units_done" in self.group[split]

    def create_split(
        self,
        split: str,
        *,
        offsets: np.ndarray,
        input_ids: np.ndarray,
        labels: np.ndarray,
        index: np.ndarray,
        info: dict[str, Any],
    ) -> None:
        """Write the split's label-independent skeleton; hidden states follow unit by unit."""
        g = self.geometry
        n, total = len(offsets) - 1, int(offsets[-1])
        unit_examples = choose_unit_examples(g, n, total)
        n_units = math.ceil(n / unit_examples)
        sg = self.group.require_group(split)
        sg.attrs.update({**info, "n_examples": n, "n_tokens": total, "unit_examples": unit_examples, "n_units": n_units})
        tc, ec = g.token_chunk, g.example_chunk
        cross16 = storage_numpy_dtype(g.cross_dtype)
        self._array(sg, "offsets", offsets.astype(np.int64), chunks=(1 << 20,))
        self._array(sg, "input_ids", input_ids.astype(np.int32), chunks=(tc * 8,))
        self._array(sg, "label", labels.astype(np.float32 if g.regression else np.int64), chunks=(ec,))
        self._array(sg, "index", index.astype(np.int64), chunks=(ec,))
        self._states(sg, "encoder_hidden", total, tc, g.n_encoder_layers)
        if g.cross_attention:
            self._empty(sg, "cross_attention", (total, *g.cross_shape()), (tc, *g.cross_shape()), cross16, {"float_dtype": g.cross_dtype})
            self._states(sg, "decoder_hidden", n, ec, g.n_decoder_layers)
        # Created last: its presence says the skeleton above is complete.
        self._empty(sg, "units_done", (n_units,), (1,), "uint8", {})
        if self.location.path is not None:  # in a bucket every PUT is already durable
            _fsync_tree(self.location.path / split)

    def _states(self, group: zarr.Group, name: str, rows: int, chunk: int, layers: int) -> None:
        """A hidden-state array in the cache's format, and its scales beside it (compact formats)."""
        g, fmt = self.geometry, self.geometry.format
        attrs = format_attrs(fmt, g.d_model)
        width = fmt.code_width(g.d_model)
        self._empty(group, name, (rows, layers, width), (chunk, layers, width), fmt.code_dtype, attrs, fmt.codec)
        if fmt.compact:
            scales = g.scale_shape()
            self._empty(group, f"{name}_scale", (rows, layers, *scales), (chunk, layers, *scales), fmt.scale_dtype, {"scale_of": name}, "zstd")

    def _array(self, group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        arr = self._empty(group, name, data.shape, (min(chunks[0], max(len(data), 1)),), data.dtype.str, {})
        arr[...] = data

    def _empty(
        self, group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, attrs: dict, codec: str = "zstd"
    ) -> zarr.Array:
        chunks = (max(1, min(chunks[0], shape[0])), *chunks[1:])
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=_compressors(np.dtype(dtype).itemsize, codec),
            fill_value=0,
            attributes=attrs,
            overwrite=True,
            # Every chunk is written even when all zeros, so a missing chunk file is always an error.
            config={"write_empty_chunks": True},
        )

    def split_skeleton(self, split: str) -> dict[str, np.ndarray]:
        sg = self.group[split]
        return {name: sg[name][...] for name in ("offsets", "input_ids", "label", "index", "units_done")}

    # --- units -----------------------------------------------------------------------------------
    def write_unit(self, split: str, unit: Unit, tokens: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> None:
        """Write one unit's rows, make them durable, then mark the unit done."""
        if self.guard is not None:
            self.guard()
        sg = self.group[split]
        t0, t1 = unit.tokens
        e0, e1 = unit.examples
        touched: list[tuple[zarr.Array, int, int]] = []
        for name, block in tokens.items():
            sg[name][t0:t1] = block
            touched.append((sg[name], t0, t1))
        for name, block in examples.items():
            sg[name][e0:e1] = block
            touched.append((sg[name], e0, e1))
        local = self.location.path
        if local is not None:  # in a bucket a PUT is acknowledged only once durable
            for arr, start, stop in touched:
                _fsync_chunks(local / split / arr.basename, arr, start, stop)
        sg["units_done"][unit.index] = 1
        if local is not None:
            _fsync_chunks(local / split / "units_done", sg["units_done"], unit.index, unit.index + 1)

    # --- attributes --------------------------------------------------------------------------------
    def split_status(self, split: str) -> dict[str, Any]:
        return dict(self.group.attrs.get("splits", {}).get(split, {}))

    def update_split_status(self, split: str, status: dict[str, Any]) -> None:
        if self.guard is not None:
            self.guard()
        splits = dict(self.group.attrs.get("splits", {}))
        splits[split] = {**splits.get(split, {}), **status}
        self.group.attrs["splits"] = splits
        if self.location.path is not None:
            fsync_path(self.location.path / "zarr.json")


def _fsync_chunks(array_dir: Path, arr: zarr.Array, start: int, stop: int) -> None:
    """fsync the chunk files (and their folders) holding rows [start, stop) of `arr`."""
    if stop <= start:
        return
    rows = arr.chunks[0]
    tail = ["0"] * (arr.ndim - 1)
    folders = set()
    for c in range(start // rows, (stop - 1) // rows + 1):
        chunk = array_dir.joinpath("c", str(c), *tail)
        fsync_path(chunk)
        folders.add(chunk.parent)
    for folder in folders | {array_dir / "c"}:
        fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (which makes the names in it, e.g. a rename's, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        fsync_path(p)


# --------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class Example:
    """One cached example, as float32 numpy arrays (or torch tensors after `.to_torch()`)."""

    input_ids: np.ndarray  # [m]
    encoder_hidden: np.ndarray  # [m, N_E, d]
    decoder_hidden: np.ndarray | None  # [N_D, d]; None for encoder-only caches
    cross_attention: np.ndarray | None  # [m, N_D] or [m, N_D, heads]; None for encoder-only caches
    label: int | float
    index: int

    def to_torch(self) -> dict[str, Any]:
        import torch

        return {
            f.name: torch.from_numpy(getattr(self, f.name)) if isinstance(getattr(self, f.name), np.ndarray) else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }


@dataclasses.dataclass
class Block:
    """Examples [start, stop) of a split, as stored: ragged token arrays plus local offsets."""

    start: int
    offsets: np.ndarray  # [n+1], starting at 0
    encoder_hidden: np.ndarray  # [tokens, N_E, d] stored (16-bit, or codes [tokens, N_E, d or d/2])
    cross_attention: np.ndarray | None  # [tokens, N_D(, H)] stored 16-bit
    decoder_hidden: np.ndarray | None  # [n, N_D, d] stored
    label: np.ndarray  # [n]
    encoder_scale: np.ndarray | None = None  # [tokens, N_E(, d/g)] compact formats' scales
    decoder_scale: np.ndarray | None = None  # [n, N_D(, d/g)]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        arrays = (self.encoder_hidden, self.cross_attention, self.decoder_hidden, self.label, self.offsets, self.encoder_scale, self.decoder_scale)
        return sum(a.nbytes for a in arrays if a is not None)


class Split:
    """One split of a cache: `len(split)`, `split[i]`, `split.read_block(start, stop)`."""

    def __init__(self, cache: Cache, name: str, group: zarr.Group):
        self.cache = cache
        self.name = name
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each opening is a metadata GET in a bucket
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.offsets: np.ndarray = self._read("offsets", slice(None))
        self.labels: np.ndarray = self._read("label", slice(None))
        self.index: np.ndarray = self._read("index", slice(None))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"Split({self.name!r}, examples={len(self)}, tokens={self.n_tokens}, complete={self.complete})"

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def complete(self) -> bool:
        return bool(self.cache.attrs.get("splits", {}).get(self.name, {}).get("complete", False))

    @property
    def token_chunk(self) -> int:
        return self.array("encoder_hidden").chunks[0]

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = open_node(self._group, name, self.cache.path / self.name)
        return self._arrays[name]

    def array_names(self) -> list[str]:
        """Names of the arrays stored for this split."""
        try:
            return list(self._group.array_keys())
        except Exception as e:  # one array's metadata is unreadable: name it (open_node does) rather than dump a traceback
            for name in ("offsets", "input_ids", "label", "index", "units_done", "encoder_hidden", "cross_attention", "decoder_hidden"):
                with contextlib.suppress(KeyError):
                    self.array(name)
            raise CacheCorruptError(f"the metadata of split {self.name} of {self.cache.path} is damaged ({e}); delete the cache and rebuild it") from e

    def _read(self, name: str, where: Any) -> np.ndarray:
        try:
            array = self.array(name)
        except KeyError as e:
            raise CacheCorruptError(f"array {self.name}/{name} is missing from {self.cache.path}: the cache is damaged; rebuild it") from e
        try:
            return array[where]
        except KeyError as e:
            raise CacheCorruptError(f"array {self.name}/{name} is missing from {self.cache.path}: the cache is damaged; rebuild it") from e
        except Exception as e:  # zarr raises ValueError for checksum mismatches, others for bad codecs
            if not self.cache.location.is_local and is_storage_failure(e):
                raise storage_error(e, self.cache.location.child(f"{self.name}/{name}")) from e
            raise CacheCorruptError(
                f"array {self.name}/{name} of {self.cache.path} has a corrupt or truncated chunk ({e}); "
                "delete the cache and rebuild it"
            ) from e

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for split {self.name!r} of {len(self)} examples")
        i %= len(self)
        block = self.read_block(i, i + 1)
        g = self.cache.geometry
        ids = self._read("input_ids", slice(int(self.offsets[i]), int(self.offsets[i + 1])))
        return Example(
            input_ids=ids,
            encoder_hidden=dequantise(block.encoder_hidden, block.encoder_scale, g.format),
            decoder_hidden=None if block.decoder_hidden is None else dequantise(block.decoder_hidden, block.decoder_scale, g.format)[0],
            cross_attention=None if block.cross_attention is None else decode_floats(block.cross_attention, g.cross_dtype),
            label=block.label[0].item(),
            index=int(self.index[i]),
        )

    def read_block(self, start: int, stop: int) -> Block:
        """Read examples [start, stop) in one contiguous read per array (the fast path)."""
        t0, t1 = int(self.offsets[start]), int(self.offsets[stop])
        tokens = slice(t0, t1)
        has_decoder = self.cache.geometry.cross_attention is not None
        scaled = self.cache.geometry.format.compact
        examples = slice(start, stop)
        return Block(
            start=start,
            offsets=self.offsets[start : stop + 1] - t0,
            encoder_hidden=self._read("encoder_hidden", tokens),
            cross_attention=self._read("cross_attention", tokens) if has_decoder else None,
            decoder_hidden=self._read("decoder_hidden", examples) if has_decoder else None,
            label=self.labels[start:stop],
            encoder_scale=self._read("encoder_hidden_scale", tokens) if scaled else None,
            decoder_scale=self._read("decoder_hidden_scale", examples) if scaled and has_decoder else None,
        )

    def block_bounds(self, target_tokens: int | None = None) -> list[tuple[int, int]]:
        """Example ranges that each cover about `target_tokens` (default: one chunk) of whole tokens."""
        target = target_tokens or self.token_chunk
        cuts = np.searchsorted(self.offsets, np.arange(target, self.n_tokens, target), side="left")
        edges = sorted({0, *map(int, cuts), len(self)})
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def iter_blocks(self, target_tokens: int | None = None) -> Iterator[Block]:
        for start, stop in self.block_bounds(target_tokens):
            yield self.read_block(start, stop)


def open_node(group: zarr.Group, name: str, where: Path) -> Any:
    """`group[name]`, with damaged metadata (zarr.json) reported as an error naming the file, not a traceback."""
    try:
        return group[name]
    except KeyError:
        raise
    except Exception as e:  # zarr raises JSONDecodeError, ValueError or TypeError for unreadable metadata
        if is_storage_failure(e):  # the store could not be reached: say so, not "damaged"
            raise storage_error(e, where / name) from e
        raise CacheCorruptError(
            f"{where / name / 'zarr.json'} is damaged ({type(e).__name__}: {e}); the cache is damaged: delete it and rebuild"
        ) from e


def has_node(group: zarr.Group, name: str, where: Path) -> bool:
    try:
        open_node(group, name, where)
    except KeyError:
        return False
    return True


class Cache:
    """A read-only view of a cache; `read_cache.open_cache(path)` returns one."""

    def __init__(self, path: Path | Location):
        self.location = Location.parse(path)
        self.path: Path | Location = self.location.path or self.location
        """The folder (a Path) of a local cache, else its Location (prints as the URL)."""
        self.location.check_reachable()
        attrs = read_root_attrs(self.location)
        if attrs is None:
            raise ReadCacheError(f"{self.path} holds no cache (no zarr.json); build one with `read-cache build` or pass its path")
        check_format_version(attrs, self.path)
        self.attrs = attrs
        self.geometry = Geometry(**attrs["geometry"])
        with translated(self.location):
            self._group = zarr.open_group(self.location.store(read_only=True), mode="r", zarr_format=3)
        self._splits: dict[str, Split] = {}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, model={self.model!r}, task={self.task!r}, splits={self.splits})"

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.attrs.get("splits", {}) and has_node(self._group, s, self.path)]

    @property
    def model(self) -> str:
        return self.attrs["backbone"]["model"]

    @property
    def task(self) -> str:
        return self.attrs["task"]["name"]

    @property
    def backbone_kind(self) -> str:
        return self.attrs["backbone"]["kind"]

    def split_status(self, split: str) -> dict[str, Any]:
        return self.attrs.get("splits", {}).get(split, {})

    def lm_head_rows(self) -> np.ndarray | None:
        return self._group["lm_head_rows"][...] if "lm_head_rows" in self._group else None

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise ReadCacheError(f"cache {self.path} has no split {split!r}; it has {', '.join(self.splits) or 'none'}")
        if split not in self._splits:
            self._splits[split] = Split(self, split, open_node(self._group, split, self.path))
        return self._splits[split]

    def require_complete(self, splits: tuple[str, ...] = SPLITS) -> None:
        """Refuse to train from a cache whose build has not finished."""
        for split in splits:
            if split not in self.splits:
                raise ReadCacheError(f"cache {self.path} has no {split} split; rebuild it with `read-cache build`")
            if not self.split_status(split).get("complete"):
                raise ReadCacheError(
                    f"split {split!r} of cache {self.path} is incomplete (its build was interrupted); "
                    "rerun the same `read-cache build` command to finish it"
                )

    @property
    def url(self) -> str:
        """The cache's absolute path, or its URL."""
        return str(self.location)

    def disk_bytes(self, split: str | None = None) -> int:
        """Bytes stored: file sizes on disk, object sizes in a bucket."""
        return self.location.total_bytes(f"{split}/" if split and not self.location.is_local else split or "")

    def raw_bytes(self, split: str) -> int:
        s = self[split]
        return sum(s.array(name).nbytes for name in s.array_names())


def open_cache(path: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None) -> Cache:
    """Open a cache for reading: a folder (`~` is expanded), or a URL (s3://bucket/prefix, gs://, az://, memory://, ...)."""
    return Cache(Location.parse(path, storage_options))


def free_bytes(path: Path | Location) -> int | None:
    """Free disk space where a cache goes; None in an object store (nothing to check)."""
    return Location.parse(path).free_bytes()
