"""Chunk files landed in a device's window through small host buffers: how a stream feeds a GPU.

    stager = Stager(torch.device("cuda"))
    window = stager.window(nbytes)                  # uint8 memory on the device
    stager.read_into(direct, t0, t1, window.memory[at:], window)   # rows t0..t1's whole chunks land at `at`

Landing a whole ~128 MB window in host memory and then copying it to the GPU makes the host write every
byte to memory once and read it again: on the 2-core VM the window landed at 0.52-0.61 of what `preadv`
gives into a buffer that stays in the core's cache (docs/benchmarks.md, seventh and tenth sessions). Here
each reader thread reads a chunk (in pieces of `STAGE_BYTES` where it is larger; smaller ones several to a
buffer) into one of `BUFFERS` small host buffers of its own (pinned on CUDA), the chunk's CRC32C runs over
the pieces as they pass (store.direct), and each buffer is copied to its place in the device's window on
the thread's own CUDA stream. The buffers stay in the cache; the host never holds the window.

The rules that keep it exact on CUDA:
  - a buffer is refilled only once its last copy has finished (its event);
  - a thread's copies into a window start only after the work the window's memory was last used for
    (`ready`, recorded on the allocating stream when the window was made: the caching allocator hands a
    freed block to the next allocation on that stream at once, while kernels may still read it);
  - `read_into` returns only once its copies are done, so a window whose reads have returned is whole,
    and a chunk whose checksum fails raises before anyone uses the window.
On a CPU device the copy is a memcpy (the tests' check that a window lands bit for bit as on the host); on
`meta` it is nothing, which is how `bench --methods reader` times the host's share of a GPU stream on a
machine without a GPU (the copy itself is the GPU's copy engine's).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from read_cache.store.direct import DirectArray
from read_cache.util.aligned import page_aligned

STAGE_BYTES = 4 << 20
"""One buffer, and the largest piece copied at once. On the 2-core VM, two threads staging the int4 bench cache
through two buffers each ran at 0.60 (256 KB pieces), 0.68 (512 KB), 0.67 (1 MB), 0.73 (2 MB) and 0.72 (4 MB) of
the `preadv` limit, against 0.54 for landing the window whole; at 4 MB a cache's ~2-3 MB chunks go whole, one
`preadv` and one copy each (the Python around each piece serialises the threads on the GIL)."""
BUFFERS = 2
"""Host buffers per thread: one is read into while the other's copy runs."""


class Stager:
    """Lands chunks on `device` through each calling thread's own small host buffers (see the module)."""

    def __init__(self, device: torch.device, piece_bytes: int | None = None):
        self.device = device
        self.piece_bytes = piece_bytes or STAGE_BYTES
        self._local = threading.local()

    def window(self, nbytes: int) -> DeviceWindow:
        """A fresh window's memory on the device (uint8), and the event its copies must wait for."""
        memory = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        ready = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        return DeviceWindow(memory, ready)

    def read_into(self, direct: DirectArray, start: int, stop: int, out: torch.Tensor, window: DeviceWindow) -> None:
        """The chunks holding rows [start, stop) into `out` (a uint8 view of `window`'s memory, at least their
        span's bytes), each checked; returns once they are there (see the module). Chunks no larger than a
        piece are packed whole into a buffer, several to a copy (a scale array's chunks are ~1% of its codes'
        and cost a copy each otherwise); a larger chunk goes in pieces."""
        mine = self._buffers()
        if mine.stream is not None and window.ready is not None:
            mine.stream.wait_event(window.ready)
        size, chunks = direct.chunk_bytes, direct.chunks_of(start, stop)
        if size > self.piece_bytes:
            for k, c in enumerate(chunks):
                direct.read_chunk_through(c, mine.next_free, lambda piece, at: mine.land(piece, out[k * size + at :]), self.piece_bytes)
        else:
            per_buffer = self.piece_bytes // size
            for first in range(0, len(chunks), per_buffer):
                batch = chunks[first : first + per_buffer]
                buffer = mine.next_free(len(batch) * size)
                for k, c in enumerate(batch):
                    direct.read_chunk(c, buffer[k * size : (k + 1) * size])
                mine.land(buffer[: len(batch) * size], out[first * size :])
        mine.finish()

    def _buffers(self) -> _ThreadBuffers:
        mine = getattr(self._local, "buffers", None)
        if mine is None:
            mine = self._local.buffers = _ThreadBuffers(self.device, self.piece_bytes)
        return mine


@dataclasses.dataclass(frozen=True)
class DeviceWindow:
    """A window's memory on the device, and (CUDA) the event its copies wait for: its last use is done."""

    memory: torch.Tensor
    ready: Any


class _ThreadBuffers:
    """One thread's host buffers, and on CUDA its copy stream and each buffer's last copy's event."""

    def __init__(self, device: torch.device, nbytes: int):
        on_cuda = device.type == "cuda"
        self.tensors = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(BUFFERS)] if on_cuda else None
        self.arrays = [t.numpy() for t in self.tensors] if self.tensors is not None else [page_aligned(nbytes) for _ in range(BUFFERS)]
        self.events: list[Any] = [None] * BUFFERS
        self.stream = torch.cuda.Stream(device) if on_cuda else None
        self._next = 0
        self._current = 0

    def next_free(self, n: int) -> np.ndarray:
        """The next buffer, once its last copy is done."""
        k = self._current = self._next
        self._next = (k + 1) % BUFFERS
        if self.events[k] is not None:
            self.events[k].synchronize()
            self.events[k] = None
        return self.arrays[k]

    def land(self, piece: np.ndarray, dest: torch.Tensor) -> None:
        """Copy the piece just read (the start of the current buffer) to the start of `dest` on the device."""
        k, n = self._current, len(piece)
        if self.stream is None:
            dest[:n].copy_(torch.from_numpy(piece))
            return
        with torch.cuda.stream(self.stream):
            dest[:n].copy_(self.tensors[k][:n], non_blocking=True)
            self.events[k] = self.stream.record_event()

    def finish(self) -> None:
        """Wait for every copy issued so far (the window is then whole, as far as this thread wrote it)."""
        if self.stream is not None:
            self.stream.synchronize()
            self.events = [None] * BUFFERS
