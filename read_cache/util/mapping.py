"""Files mapped back to back into one contiguous stretch of memory, so a reader can index across them.

    region = Region(total_bytes)                 # address space only: no memory until a page is touched
    region.map_file(fd, offset, nbytes)          # the file's first nbytes now appear at region[offset:]
    rows = region.array(0, total_bytes)          # a numpy view of the whole stretch (it keeps the region)

A streaming window is several runs of chunk files; mapping them back to back lets one `np.take` gather a
batch's ragged tokens across chunk edges straight from the page cache, where reading the chunks first
copied every byte once more into a buffer (docs/benchmarks.md measures both). `mmap` with MAP_FIXED over a
reservation is what glibc's own loader does; Python's `mmap` module cannot place a mapping, so the one call
goes through ctypes (which releases the GIL). The region is one anonymous `mmap.mmap`: when the last view
of it is gone, Python unmaps the whole stretch, file mappings included. Files are mapped privately and
read-only: a write to a mapped page would fault, so the views `array` hands out are read-only.

Linux-only (MAP_FIXED as Linux defines it); `Region.available()` says whether it works here, and readers
fall back to reading the files into buffers where it does not.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys

import numpy as np

PAGE = mmap.PAGESIZE
MAP_FIXED = 0x10
"""Linux's value (Python's mmap module does not export it). No MAP_POPULATE: the CRC32C check that follows
touches every page anyway, and faulting them in there (16 pages a fault) measured a little cheaper."""


@functools.cache
def _libc_mmap() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.mmap
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_void_p
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return call


class Region:
    """A contiguous stretch of address space that files are mapped into (see the module)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(PAGE, -(-nbytes // PAGE) * PAGE)
        self._memory = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self._memory)
        self.address = ctypes.addressof(anchor)
        del anchor  # the export would keep the mmap from ever closing

    @staticmethod
    def available() -> bool:
        return _libc_mmap() is not None

    def map_file(self, fd: int, offset: int, nbytes: int) -> None:
        """Map the first `nbytes` of file `fd` at `offset` (a whole page), read-only."""
        call = _libc_mmap()
        if call is None or offset % PAGE or offset + nbytes > self.nbytes:
            raise ValueError(f"cannot map {nbytes} bytes at {offset} of a {self.nbytes}-byte region")
        got = call(self.address + offset, nbytes, mmap.PROT_READ, mmap.MAP_PRIVATE | MAP_FIXED, fd, 0)
        if got is None or got == ctypes.c_void_p(-1).value:
            error = ctypes.get_errno()
            raise OSError(error, f"mmap of a chunk file failed: {os.strerror(error)}")

    def array(self, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """Read-only uint8 view of [offset, offset + nbytes); it keeps the region (and its mappings) alive."""
        view = np.frombuffer(self._memory, dtype=np.uint8)[offset : self.nbytes if nbytes is None else offset + nbytes]
        view.flags.writeable = False
        return view

    def fill(self, offset: int, nbytes: int, dtype: np.dtype, value: object) -> None:
        """Fill [offset, offset + nbytes) of the anonymous reservation (no file mapped there) with `value`."""
        np.frombuffer(self._memory, dtype=np.uint8)[offset : offset + nbytes].view(dtype)[:] = value
