"""Writing a cache (stage one only): the build's lock, its output folder, and `CacheWriter`.

A unit's chunk files are fsynced before `units_done[u]` is set; the format is in `store.layout`. Raw arrays of a
local cache are written by `store.direct` (measured faster than zarr-python's pipeline), the rest by zarr.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from read_cache.errors import ReadCacheError
from read_cache.store.direct import DirectArray
from read_cache.store.formats import format_attrs
from read_cache.store.layout import (
    FORMAT_VERSION,
    SCALED_ARRAYS,
    Geometry,
    Unit,
    _compressors,
    channel_scale_array,
    choose_unit_examples,
    storage_numpy_dtype,
)
from read_cache.store.location import Location
from read_cache.util.files import FolderLock, fsync_path, remove


def BuildLock(path: Path) -> FolderLock:  # noqa: N802 - reads as the lock it returns
    """The build's lock: an exclusive flock on the cache folder, so two builds into one path cannot both write."""
    return FolderLock(path, busy="another build is writing {path} right now; wait for it to finish or choose another --out")


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
        remove(child)


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
        self._status_lock = threading.Lock()
        """Serialises `update_split_status`: the main thread marks a split complete while the writer thread
        records the next split's progress, and both rewrite the one `splits` attribute."""

    @classmethod
    def create(
        cls, path: Path | Location, geometry: Geometry, attrs: dict[str, Any], root_arrays: dict[str, np.ndarray] | None,
        channel_scales: dict[str, np.ndarray] | None = None,
    ) -> CacheWriter:
        """A new store with `root_arrays` (float32, `layout.ROOT_ARRAYS`: the LM head's rows, a causal LM's final norm); `channel_scales` (array name -> [layers, d], `formats.fit_channel_scale`) are written
        before any unit, as root arrays `<name>_channel_scale`, so a resume and every rank use the same."""
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
        for name, values in (root_arrays or {}).items():
            group.create_array(name, data=np.asarray(values, dtype=np.float32), overwrite=True)
        for name, scale in (channel_scales or {}).items():
            group.create_array(channel_scale_array(name), data=scale.astype(np.float32), overwrite=True)
        return cls(path, geometry)

    def channel_scales(self) -> dict[str, np.ndarray]:
        """The per-channel scales this store was created with (none for 16-bit formats and older caches)."""
        return {name: self.group[channel_scale_array(name)][...] for name in SCALED_ARRAYS if channel_scale_array(name) in self.group}

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
        tc, ec = g.token_chunk, g.split_example_chunk(n, total)
        cross16 = storage_numpy_dtype(g.cross_dtype)
        self._array(sg, "offsets", offsets.astype(np.int64), chunks=(1 << 20,))
        self._array(sg, "input_ids", input_ids.astype(np.int32), chunks=(tc * 8,))
        # Labels and indices are read whole when a split is opened: few big chunks (a GET each in a bucket).
        self._array(sg, "label", labels.astype(np.float32 if g.regression else np.int64), chunks=(1 << 16,))
        self._array(sg, "index", index.astype(np.int64), chunks=(1 << 16,))
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
        self._empty(group, name, (rows, layers, width), (chunk, layers, width), fmt.code_dtype, attrs, g.states_codec)
        if fmt.compact:
            scales = g.scale_shape()
            self._empty(group, f"{name}_scale", (rows, layers, *scales), (chunk, layers, *scales), fmt.scale_dtype, {"scale_of": name}, g.states_codec)

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
        local = self.location.path
        blocks = [(name, block, *unit.tokens) for name, block in tokens.items()] + [(name, block, *unit.examples) for name, block in examples.items()]
        for name, block, start, stop in blocks:
            arr = sg[name]
            # Raw local arrays skip zarr's copies and per-chunk renames (`store.direct`).
            direct = DirectArray.open(arr, local / split / name) if local is not None else None
            if direct is not None:
                direct.write_rows(start, stop, block)
            else:
                arr[start:stop] = block
            if local is not None:  # in a bucket a PUT is acknowledged only once durable
                _fsync_chunks(local / split / name, arr, start, stop)
        sg["units_done"][unit.index] = 1
        if local is not None:
            _fsync_chunks(local / split / "units_done", sg["units_done"], unit.index, unit.index + 1)

    # --- attributes --------------------------------------------------------------------------------
    def split_status(self, split: str) -> dict[str, Any]:
        return dict(self.group.attrs.get("splits", {}).get(split, {}))

    def update_split_status(self, split: str, status: dict[str, Any]) -> None:
        if self.guard is not None:
            self.guard()
        with self._status_lock:  # a read-modify-write of the root's attributes: two threads would lose an update
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


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        fsync_path(p)

