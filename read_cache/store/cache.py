"""Reading a cache: `open_cache(path)` -> `Cache` -> `Split` -> `Example` or `Block`.

    cache = read_cache.open_cache("caches/t5-small/sst2")
    cache["train"][0].encoder_hidden          # [m, N_E, d] float32
    cache["train"].read_block(0, 64)          # examples 0..63 as stored (the training reader's fast path)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from read_cache.errors import CacheCorruptError, ReadCacheError
from read_cache.store.attributes import CacheAttributes
from read_cache.store.formats import dequantise
from read_cache.store.layout import (
    ROOT_ARRAYS,
    SPLITS,
    Geometry,
    channel_scale_array,
    check_format_version,
    decode_floats,
    read_root_attrs,
)
from read_cache.store.location import (
    Location,
    is_storage_failure,
    storage_error,
    translated,
)


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
        self.offsets: np.ndarray = self.read_array("offsets", slice(None))
        self.labels: np.ndarray = self.read_array("label", slice(None))
        self.index: np.ndarray = self.read_array("index", slice(None))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"Split({self.name!r}, examples={len(self)}, tokens={self.n_tokens}, complete={self.complete})"

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def complete(self) -> bool:
        return bool(self.cache.split_status(self.name).get("complete", False))

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

    def read_array(self, name: str, where: Any) -> np.ndarray:
        """`array[where]` through zarr, with a missing array, a bad chunk or an unreachable store named in one line."""
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
        ids = self.read_array("input_ids", slice(int(self.offsets[i]), int(self.offsets[i + 1])))
        return Example(
            input_ids=ids,
            encoder_hidden=dequantise(block.encoder_hidden, block.encoder_scale, g.format, channel=self.cache.channel_scale("encoder_hidden")),
            decoder_hidden=None if block.decoder_hidden is None else dequantise(
                block.decoder_hidden, block.decoder_scale, g.format, channel=self.cache.channel_scale("decoder_hidden")
            )[0],
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
            encoder_hidden=self.read_array("encoder_hidden", tokens),
            cross_attention=self.read_array("cross_attention", tokens) if has_decoder else None,
            decoder_hidden=self.read_array("decoder_hidden", examples) if has_decoder else None,
            label=self.labels[start:stop],
            encoder_scale=self.read_array("encoder_hidden_scale", tokens) if scaled else None,
            decoder_scale=self.read_array("decoder_hidden_scale", examples) if scaled and has_decoder else None,
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
        """The raw root attributes (docs/cache-format.md); `info` is their typed view."""
        self.info = CacheAttributes.parse(attrs)
        self.geometry = Geometry(**attrs["geometry"])
        with translated(self.location):
            self._group = zarr.open_group(self.location.store(read_only=True), mode="r", zarr_format=3)
        self._splits: dict[str, Split] = {}
        self._channel_scales: dict[str, np.ndarray | None] = {}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, model={self.model!r}, task={self.task!r}, splits={self.splits})"

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.info.splits and has_node(self._group, s, self.path)]

    @property
    def model(self) -> str:
        return self.info.model

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def backbone_kind(self) -> str:
        return self.info.backbone_kind

    def split_status(self, split: str) -> dict[str, Any]:
        return self.info.splits.get(split, {})

    def channel_scale(self, name: str) -> np.ndarray | None:
        """`name`'s per-channel scales [layers, d] (multiply after dequantising), or None where the cache has none."""
        if name not in self._channel_scales:
            key = channel_scale_array(name)
            self._channel_scales[name] = self._group[key][...] if key in self._group else None
        return self._channel_scales[name]

    def lm_head_rows(self) -> np.ndarray | None:
        return self.root_array("lm_head_rows")

    def root_array(self, name: str) -> np.ndarray | None:
        """One of `layout.ROOT_ARRAYS` (float32), or None where this cache has none."""
        return self._group[name][...] if name in self._group else None

    def root_arrays(self) -> dict[str, np.ndarray]:
        """Every root array of `layout.ROOT_ARRAYS` this cache holds (what a transcode copies)."""
        return {name: a for name in ROOT_ARRAYS if (a := self.root_array(name)) is not None}

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
