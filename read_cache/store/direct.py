"""Rows of a local cache's raw arrays read straight from their chunk files (`preadv` + a crc32c check), and
written the same way by the build.

    rows = DirectArray.open(split.array("encoder_hidden"), cache_dir / "train" / "encoder_hidden")
    first = rows.read_into(t0, t1, out)      # whole chunks land in out; rows t0..t1 are out[first : first + t1 - t0]
    rows.write_rows(t0, t1, block)           # the build: whole chunks, each file written once (store.writer fsyncs them)

Format 3 stores the 8-/4-bit codes and their scales raw: a chunk file is the chunk's C-order bytes followed
by their 4-byte CRC32C (docs/cache-format.md). zarr-python reads such a chunk through its codec pipeline:
a bytes copy for the checksum (google-crc32c, ~1.5 GB/s here), another out of the chunk into the result,
and the coroutine machinery per chunk; `bench --methods reader` races it against this engine, the `zarrs`
pipeline and tensorstore (docs/benchmarks.md). Here one `preadv` lands the chunk in the caller's buffer
(the trailing checksum in a 4-byte side buffer), `checksum` (CRC32C in hardware, GIL released) checks it in
place (the chunk is still in the core's cache), and nothing else touches the bytes. Give it a buffer that
starts on a page (util.aligned: the kernel's copy runs ~4x faster there on this CPU). Whole chunks are read
because a chunk's checksum covers all of it: the caller's buffer holds the chunks that cover the rows asked
for, and `read_into` says where they start. `read_chunk_through` reads a chunk in pieces instead, each into
a small buffer of the caller's and handed on, the checksum running over the pieces (training.staging feeds a
GPU so: the host never holds a whole window).

Writing is the mirror image. zarr-python writes a chunk by copying it out of the block, encoding it (another
copy to append the checksum) and replacing the file atomically (a temporary file, a rename, a folder made per
chunk): a t5-small test split's unit (100 MB int8) took its writer 0.42-0.55 s here, fsyncs included. Here a
chunk is one `writev` of the block's rows (zero copies: chunks split axis 0 alone) and its checksum; the
writer fsyncs the unit's files and folders as it does zarr's. The build's units own whole chunks and a unit
is marked done only after its chunks are durable, so a chunk file written in place counts only once its unit
is marked done: a killed build's unit is computed and written again (a reader of an unfinished split must
keep to the units marked done, docs/cache-format.md).

Only plain local files qualify (an object store goes through zarr, with reads in flight), and only arrays
chunked along axis 0 alone with codecs exactly bytes + crc32c; anything else returns None from `open` and
stays on zarr. The engine holds no open files or threads, so it survives a fork.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c_rs
import numpy as np

from read_cache.errors import CacheCorruptError

CHECKSUM_BYTES = 4

checksum = crc32c_rs.crc32c
"""CRC32C of a buffer, continued from a previous value (`checksum(data, value)`), GIL released. `crc32c-rs`
picks the CPU's fastest kernel at import (here `crc32` and `pclmulqdq` interleaved): 22-32 GB/s on a 2-4 MB
buffer in cache against ICRAR `crc32c`'s 20-22 (`crc32` alone), which made steady streamed epochs 1-5% faster
(docs/benchmarks.md, twelfth session). Every chunk read and written here, and the bench's ceilings, use it."""


@dataclasses.dataclass(frozen=True)
class DirectArray:
    """One raw, row-chunked array of a local cache, read chunk file by chunk file."""

    folder: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    fill_value: Any

    @classmethod
    def open(cls, array: Any, folder: Path) -> DirectArray | None:
        """The direct reader of a zarr array at `folder`, or None where it does not qualify (see the module)."""
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or not folder.is_dir():
            return None
        codecs = [c.to_dict() for c in meta.codecs]
        if [c["name"] for c in codecs] != ["bytes", "crc32c"]:
            return None
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        if endian != "little" and array.dtype.itemsize > 1:
            return None
        encoding = meta.chunk_key_encoding.to_dict()
        if encoding.get("name") != "default" or (encoding.get("configuration") or {}).get("separator", "/") != "/":
            return None
        if tuple(array.chunks[1:]) != tuple(array.shape[1:]):
            return None
        return cls(folder, tuple(array.shape), np.dtype(array.dtype).newbyteorder("<"), int(array.chunks[0]), array.fill_value)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @functools.cached_property  # asked per chunk read: the product is worth keeping
    def chunk_bytes(self) -> int:
        return self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def chunks_of(self, start: int, stop: int) -> range:
        """The chunks that hold rows [start, stop)."""
        return range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1) if stop > start else range(0)

    def span(self, start: int, stop: int) -> int:
        """Rows `read_into` lands for rows [start, stop): their whole chunks."""
        return len(self.chunks_of(start, stop)) * self.chunk_rows

    def read_into(self, start: int, stop: int, out: np.ndarray) -> int:
        """Read the chunks holding rows [start, stop) into out[: span], checking each one's CRC32C; returns
        the position of row `start` in `out` (rows start..stop-1 are out[first : first + stop - start])."""
        chunks = self.chunks_of(start, stop)
        if out.dtype != self.dtype or out.shape[1:] != self.row_shape or len(out) < len(chunks) * self.chunk_rows:
            raise ValueError(f"out must be {self.dtype}[>= {len(chunks) * self.chunk_rows}, {self.row_shape}], got {out.dtype}{out.shape}")
        flat = out.reshape(len(out), -1).view(np.uint8)
        for k, c in enumerate(chunks):
            self.read_chunk(c, flat[k * self.chunk_rows : (k + 1) * self.chunk_rows].reshape(-1))
        return start - chunks.start * self.chunk_rows if chunks else 0

    def chunk_path(self, c: int) -> Path:
        return Path(self._chunk_file(c))

    def _chunk_file(self, c: int) -> str:
        """Chunk c's file, as a string: building a `Path` per chunk cost more than opening the file (17-20 us
        against 7 here)."""
        head, tail = self._chunk_name
        return f"{head}{c}{tail}"

    @functools.cached_property
    def _chunk_name(self) -> tuple[str, str]:
        return os.path.join(os.fspath(self.folder), "c", ""), "".join(os.sep + "0" for _ in self.shape[1:])

    def read_chunk(self, c: int, dest: np.ndarray) -> None:
        """Chunk c's bytes into `dest` (uint8, chunk_bytes long), checksum checked; a chunk never written is the fill value."""
        self.read_chunk_through(c, lambda n: dest, lambda piece, at: None, dest.nbytes)

    def read_chunk_through(
        self, c: int, buffer: Callable[[int], np.ndarray], land: Callable[[np.ndarray, int], object], piece_bytes: int
    ) -> None:
        """Chunk c in pieces of up to `piece_bytes`: each read into `buffer(n)` (uint8, at least n long; the first n
        bytes are used), then handed to `land(piece, at)` (chunk bytes [at, at + n)). The CRC32C runs over the
        pieces as they pass and is checked after the last, so what was landed counts only once this returns.
        A chunk never written is the fill value (zarr leaves chunks of only the fill value unwritten)."""
        path, size = self._chunk_file(c), self.chunk_bytes
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            for at in range(0, size, piece_bytes):
                n = min(piece_bytes, size - at)
                piece = buffer(n)[:n]
                piece.view(self.dtype)[:] = self.fill_value
                land(piece, at)
            return
        crc, stored = 0, bytearray(CHECKSUM_BYTES)
        try:
            for at in range(0, size, piece_bytes):
                n = min(piece_bytes, size - at)
                piece = buffer(n)[:n]
                last = at + n == size  # the last piece brings the checksum along: one syscall (each one's GIL hand-off costs)
                got = os.preadv(fd, [piece, stored] if last else [piece], at)
                if got != n + (CHECKSUM_BYTES if last else 0):
                    raise CacheCorruptError(f"chunk {path} is truncated ({at + got} of {size + CHECKSUM_BYTES} bytes); delete the cache and rebuild it")
                crc = checksum(piece, crc)
                land(piece, at)
        finally:
            os.close(fd)
        if crc != int.from_bytes(stored, "little"):
            raise CacheCorruptError(f"chunk {path} fails its CRC32C checksum (a flipped or damaged byte); delete the cache and rebuild it")

    def write_rows(self, start: int, stop: int, block: np.ndarray) -> None:
        """Write rows [start, stop) (`block`), whole chunks (start on a chunk's first row, stop on a chunk's end or
        the array's). Making them durable is the caller's (`store.writer` fsyncs every unit's chunks and folders)."""
        rows = self.chunk_rows
        if start % rows or (stop % rows and stop != self.shape[0]) or block.shape != (stop - start, *self.row_shape):
            raise ValueError(f"rows [{start}, {stop}) of {self.folder} are not whole chunks of {rows} rows, or block {block.shape} does not fit them")
        block = np.ascontiguousarray(block, dtype=self.dtype)
        for c in self.chunks_of(start, stop):
            part = block[c * rows - start : (c + 1) * rows - start]
            if len(part) < rows:  # the array's last chunk: stored whole, its rows past the end the fill value
                whole = np.full((rows, *self.row_shape), self.fill_value, self.dtype)
                whole[: len(part)] = part
                part = whole
            self.write_chunk(c, part.reshape(-1).view(np.uint8))

    def write_chunk(self, c: int, data: np.ndarray) -> None:
        """Chunk c's file: `data` (uint8, chunk_bytes long) and its CRC32C."""
        path = self.chunk_path(c)
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [memoryview(data), memoryview(checksum(data).to_bytes(CHECKSUM_BYTES, "little"))]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            while parts:  # a regular file takes a whole writev; a short one (a signal, a full disk) goes on
                done = os.writev(fd, parts)
                while parts and done >= len(parts[0]):
                    done -= len(parts.pop(0))
                if parts:
                    parts[0] = parts[0][done:]
        finally:
            os.close(fd)


def direct_arrays(split: Any, names: tuple[str, ...]) -> dict[str, DirectArray]:
    """The direct readers of those of `names` a local split stores raw (an empty dict in an object store)."""
    location = split.cache.location
    if not location.is_local:
        return {}
    found = {}
    for name in names:
        if name in split.array_names():
            direct = DirectArray.open(split.array(name), location.path / split.name / name)
            if direct is not None:
                found[name] = direct
    return found
