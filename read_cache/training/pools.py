"""Examples held in memory as stored, and the batches gathered from them (on the host or on a device).

A `Pool` is some examples of a split in their stored form: codes (+ scales) or 16-bit floats, ragged like
the store. Its token arrays need not be contiguous per window: `starts[i]` is where example i's tokens
begin, `examples[i]` its row in the per-example arrays, so a window read chunk by chunk straight into a
reused buffer (training.windows) is a Pool as it lies, with the chunk edges' foreign tokens left in place.

A batch leaves a pool in one of three forms:

  float32      `gather` copies the batch's examples, one `np.take` per array, into a slot of a `BufferRing`
               and dequantises them in one pass into float32 (a CPU run)
  CodedBatch   the same copy, shipped as stored: codes + scales + offsets, for `batch_to` to dequantise on
               the device (the RAM tier feeding a GPU)
  WindowBatch  no copy at all: the examples' token rows in the windows they lie in. `batch_to` copies each
               window to the device once, for all of its batches, and gathers and dequantises there, as the
               device tier (`DevicePool`) does every batch. This is how a stream feeds a GPU: the host's only
               work is the read itself (docs/benchmarks.md measures what the host gather cost)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch

from read_cache.store import Block, Split, ragged_rows
from read_cache.store.formats import (
    StoreFormat,
    dequantise,
    dequantise_torch,
    get_format,
    to_torch_codes,
)
from read_cache.training.buffers import BufferRing, Layout, Views

Batch = dict[str, torch.Tensor]
TOKEN_ARRAYS = ("enc", "enc_scale", "cross")
"""Fields indexed by token; the others ("dec", "dec_scale") by example."""
STORED = {
    "enc": "encoder_hidden", "enc_scale": "encoder_hidden_scale", "cross": "cross_attention",
    "dec": "decoder_hidden", "dec_scale": "decoder_hidden_scale",
}
"""A pool's fields and the split arrays they hold."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a split's stored arrays become batches."""

    states: StoreFormat
    """Format of encoder_hidden / decoder_hidden."""
    cross: StoreFormat
    """Format of cross_attention (16-bit)."""
    coded: bool = False
    """Yield codes + scales as stored (a CodedBatch, dequantised by `batch_to` on the device) instead of float32."""
    channels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False)
    """Per-channel scales [layers, d] by field ("enc", "dec"), where the cache has them: multiplied in after dequantising."""

    @classmethod
    def of(cls, split: Split, coded: bool) -> Decoding:
        g, cache = split.cache.geometry, split.cache
        channels = {k: cache.channel_scale(STORED[k]) for k in ("enc", "dec")}
        return cls(g.format, get_format(g.cross_dtype), coded, {k: v for k, v in channels.items() if v is not None})

    def format_of(self, key: str) -> StoreFormat:
        return self.cross if key == "cross" else self.states

    def decode_torch(self, key: str, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """`key`'s codes (+ scales) on their device -> float32 there, as the host's `dequantise` gives them."""
        channel = self.channels.get(key)
        return dequantise_torch(codes, scale, self.format_of(key), None if channel is None else torch.from_numpy(channel).to(codes.device))


class CodedBatch(dict):
    """A batch whose states are still stored codes (+ `*_scale`); `batch_to` decodes it on the device."""

    decoding: Decoding
    views: Views | None = None
    """The ring slot its tensors live in (`batch_to` records the copy's CUDA event there)."""


@dataclasses.dataclass
class Pool:
    """Some examples of a split as stored (see the module)."""

    starts: np.ndarray  # [n] first token row of each example in the token arrays
    lengths: np.ndarray  # [n] tokens per example
    examples: np.ndarray  # [n] each example's row in the per-example arrays
    label: np.ndarray  # [n]
    rows: np.ndarray  # [n] rows in the split
    arrays: dict[str, np.ndarray]  # enc [T, N_E, d'], enc_scale, cross [T, N_D(, H)], dec [n', N_D, d'], dec_scale
    device_copies: dict[torch.device, DevicePool] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    """This pool's arrays on a device, made by `on` for the window's batches to share."""

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_block(cls, block: Block) -> Pool:
        n = len(block)
        fields = {"enc": block.encoder_hidden, "enc_scale": block.encoder_scale, "cross": block.cross_attention,
                  "dec": block.decoder_hidden, "dec_scale": block.decoder_scale}
        return cls(
            block.offsets[:-1].copy(), np.diff(block.offsets), np.arange(n), block.label,
            np.arange(block.start, block.start + n, dtype=np.int64), {k: v for k, v in fields.items() if v is not None},
        )

    def on(self, device: torch.device) -> DevicePool:
        """This pool's arrays copied to `device`, once: every batch of a window gathers from the one copy. From
        a pinned ring slot the copy is asynchronous; its CUDA event keeps the slot busy until it is done. A
        window staged straight to a device (training.staging) holds no host arrays: it is that copy already."""
        held = self.device_copies.get(device)
        if held is None and not self.arrays and self.device_copies:  # a window landed on a device (training.staging)
            landed = next(iter(self.device_copies.values()))
            held = self.device_copies[device] = DevicePool(landed.pool, {k: v.to(device) for k, v in landed.tensors.items()}, device)
        elif held is None:
            held = self.device_copies[device] = DevicePool.of(self, device)
            if isinstance(self.arrays, Views) and device.type == "cuda":
                self.arrays.slot.event = torch.cuda.Event()
                self.arrays.slot.event.record()
        return held

    def gather(self, positions: np.ndarray, decoding: Decoding, ring: BufferRing | None = None) -> Batch:
        """The batch of the examples at `positions` (see `gather`)."""
        return gather([Order(self, np.asarray(positions, dtype=np.int64)).segment(0, len(positions))], decoding, ring)

    def decoded(self, decoding: Decoding, ring: BufferRing | None = None) -> dict[str, torch.Tensor]:
        """This pool's states as float32 tensors (a ring slot's memory when given), per-channel scales applied."""
        floats = {k: (a.shape[:-1] + (a.shape[-1] * (2 if decoding.format_of(k).name == "int4" else 1),), np.float32)
                  for k, a in self.arrays.items() if not k.endswith("_scale")}
        out = ring.take(floats) if ring is not None else {k: np.empty(s, d) for k, (s, d) in floats.items()}
        return {
            key: torch.from_numpy(dequantise(
                self.arrays[key], self.arrays.get(f"{key}_scale"), decoding.format_of(key), out=out[key], channel=decoding.channels.get(key)
            ))
            for key in floats
        }


class Segment(NamedTuple):
    """Some examples of one pool, in batch order: a streaming batch may take the last examples of one window
    and the first of the next, each from where it lies."""

    pool: Pool
    positions: np.ndarray  # [n] the examples' positions in the pool
    tokens: np.ndarray  # [T] their token rows there, example after example
    lengths: np.ndarray  # [n]
    label: np.ndarray  # [n]
    rows: np.ndarray  # [n] rows in the split
    token_example: np.ndarray | None = None  # [T] each token's example, numbered within its batch (Order's batch_size)


Segments = list[Segment]


class Order:
    """A pool's examples in the order an epoch yields them, their index arrays made once for every batch cut
    from it: a streamed batch is then slices of these, not a dozen small numpy calls of its own."""

    def __init__(self, pool: Pool, positions: np.ndarray, batch_size: int = 0, first_slot: int = 0):
        """With `batch_size`, the order is cut into batches of that size whose first already holds `first_slot`
        examples (a streamed window's first examples may finish the last window's batch): each token's example
        number within its batch is then made here too, once for the window (`Segment.token_example`)."""
        self.pool, self.positions = pool, positions
        self.lengths, self.label, self.rows = pool.lengths[positions], pool.label[positions], pool.rows[positions]
        self.tokens = ragged_rows(pool.starts[positions], self.lengths)
        self.token_at = offsets_of(self.lengths)
        self.token_example = np.repeat((np.arange(len(positions)) + first_slot) % batch_size, self.lengths) if batch_size else None

    def __len__(self) -> int:
        return len(self.positions)

    def segment(self, a: int, b: int) -> Segment:
        """The examples [a, b) of this order."""
        t0, t1 = self.token_at[a], self.token_at[b]
        token_example = None if self.token_example is None else self.token_example[t0:t1]
        return Segment(self.pool, self.positions[a:b], self.tokens[t0:t1], self.lengths[a:b], self.label[a:b], self.rows[a:b], token_example)


def take_segments(segments: Segments, ring: BufferRing | None = None) -> Pool:
    """The examples of `segments`, in order, copied contiguously (into a ring slot when given)."""
    lengths = _joined([s.lengths for s in segments])
    n, tokens = len(lengths), int(lengths.sum())
    layout: Layout = {k: (((tokens if k in TOKEN_ARRAYS else n), *a.shape[1:]), a.dtype) for k, a in segments[0].pool.arrays.items()}
    out = ring.take(layout) if ring is not None else {k: np.empty(s, d) for k, (s, d) in layout.items()}
    at_token = at_example = 0
    for segment in segments:
        _copy(segment, out, at_token, at_example)
        at_token, at_example = at_token + len(segment.tokens), at_example + len(segment.positions)
    return Pool(offsets_of(lengths)[:-1], lengths, np.arange(n), _joined([s.label for s in segments]), _joined([s.rows for s in segments]), out)


def _copy(segment: Segment, out: dict[str, np.ndarray], at_token: int, at_example: int) -> None:
    """Copy a segment's examples into `out` from token row `at_token` and example row `at_example` on: one
    `np.take` per array over the batch's token rows (a C loop of row copies with the GIL released; a Python
    slice per example ran ~0.8x its speed and held the GIL). mode="clip" writes straight into `out` (numpy
    buffers the result first under its default mode="raise"); the rows are in range by construction."""
    rows = segment.pool.examples[segment.positions]
    for k, a in segment.pool.arrays.items():
        index, at = (segment.tokens, at_token) if k in TOKEN_ARRAYS else (rows, at_example)
        np.take(a, index, axis=0, out=out[k][at : at + len(index)], mode="clip")


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def gather(segments: Segments, decoding: Decoding, ring: BufferRing | None = None) -> Batch:
    """The batch of the examples of `segments`: copied once into a ring slot, then shipped as stored
    (coded) or dequantised from there into float32 (in a second slot)."""
    stored = take_segments(segments, ring)
    fields = example_fields(stored.lengths, stored.label, stored.rows)
    if not decoding.coded:
        return {**fields, **stored.decoded(decoding, ring)}
    batch = CodedBatch(fields)
    batch.update({k: to_torch_codes(v) for k, v in stored.arrays.items()})
    batch.decoding = decoding
    batch.views = stored.arrays if isinstance(stored.arrays, Views) else None
    return batch


class WindowBatch(dict):
    """A streamed batch still lying in its windows (see the module): the per-example fields, and the segments
    of the windows it takes examples from. Holding it holds those windows' ring slots."""

    decoding: Decoding
    segments: Segments


def window_batch(segments: Segments, decoding: Decoding) -> WindowBatch:
    """The batch of the examples of `segments`, left where they lie (see `WindowBatch`). The segments come from
    Orders with the batch size, so they bring their token -> example map along (`example_fields`' entries made
    once per window): the batch is slices, no numpy work."""
    batch = WindowBatch({f: torch.from_numpy(_joined([getattr(s, f) for s in segments])) for f in ("token_example", "label", "rows")})
    batch.segments, batch.decoding = segments, decoding
    return batch


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Token offsets [n+1] of n examples of `lengths` tokens laid end to end."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def example_fields(lengths: np.ndarray, label: np.ndarray, rows: np.ndarray) -> Batch:
    """A batch's per-example entries, on the host in every tier: token -> example map, labels, split rows."""
    return {
        "token_example": torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)),
        "label": torch.from_numpy(np.ascontiguousarray(label)),
        "rows": torch.from_numpy(np.ascontiguousarray(rows)),
    }


def concat_pools(pools: list[Pool]) -> Pool:
    """One pool of several dense ones (from blocks or `take`: tokens and examples laid end to end)."""
    if len(pools) == 1:
        return pools[0]
    token_base = offsets_of(np.array([int(p.lengths.sum()) for p in pools]))[:-1]
    example_base = offsets_of(np.array([len(p) for p in pools]))[:-1]
    return Pool(
        np.concatenate([p.starts + b for p, b in zip(pools, token_base)]),
        np.concatenate([p.lengths for p in pools]),
        np.concatenate([p.examples + b for p, b in zip(pools, example_base)]),
        np.concatenate([p.label for p in pools]),
        np.concatenate([p.rows for p in pools]),
        {k: np.concatenate([p.arrays[k] for p in pools]) for k in pools[0].arrays},
    )


@dataclasses.dataclass
class DevicePool:
    """Examples' stored codes (+ scales) as tensors on a torch device: the `device` tier gathers and
    dequantises each batch there, so the host moves no states at all after the first read."""

    pool: Pool  # positions and labels on the host; its arrays are not kept
    tensors: dict[str, torch.Tensor]  # enc, cross, dec and *_scale, as stored (`to_torch_codes`)
    device: torch.device

    @classmethod
    def of(cls, pool: Pool, device: torch.device) -> DevicePool:
        tensors = {k: to_torch_codes(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in pool.arrays.items()}
        return cls(dataclasses.replace(pool, arrays={}), tensors, device)

    @classmethod
    def concat(cls, pools: list[DevicePool]) -> DevicePool:
        if len(pools) == 1:
            return pools[0]
        return cls(concat_pools([p.pool for p in pools]), {k: torch.cat([p.tensors[k] for p in pools]) for k in pools[0].tensors}, pools[0].device)

    def batch(self, positions: np.ndarray, decoding: Decoding) -> Batch:
        """The examples at `positions`, decoded on the device exactly as `Pool.gather` decodes on the host."""
        positions = np.asarray(positions, dtype=np.int64)
        p = self.pool
        batch = example_fields(p.lengths[positions], p.label[positions], p.rows[positions])
        return {**batch, **self.states(positions, ragged_rows(p.starts[positions], p.lengths[positions]), decoding)}

    def states(self, positions: np.ndarray, tokens: np.ndarray, decoding: Decoding) -> Batch:
        """The states of the examples at `positions` (their token rows `tokens`), gathered and decoded on the device."""
        index = {
            True: torch.from_numpy(tokens.astype(np.int64, copy=False)).to(self.device),
            False: torch.from_numpy(self.pool.examples[positions].astype(np.int64)).to(self.device),
        }
        states = {}
        for key in ("enc", "cross", "dec"):
            if key in self.tensors:
                rows = index[key in TOKEN_ARRAYS]
                scale = self.tensors.get(f"{key}_scale")
                codes = self.tensors[key].index_select(0, rows)
                states[key] = decoding.decode_torch(key, codes, None if scale is None else scale.index_select(0, rows))
        return states


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to `device`; a CodedBatch is moved as codes and dequantised there, a WindowBatch gathered
    there from its windows' device copies. The copy from a ring slot is asynchronous on CUDA: its event marks
    the slot busy until the copy is done."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if isinstance(batch, WindowBatch):
        parts = [s.pool.on(device).states(s.positions, s.tokens, batch.decoding) for s in batch.segments]
        moved.update({k: parts[0][k] if len(parts) == 1 else torch.cat([p[k] for p in parts]) for k in parts[0]})
        return moved
    if isinstance(batch, CodedBatch):
        if batch.views is not None and device.type == "cuda":
            batch.views.slot.event = torch.cuda.Event()
            batch.views.slot.event.record()
        for key in ("enc", "cross", "dec"):
            if key in moved:
                moved[key] = batch.decoding.decode_torch(key, moved[key], moved.pop(f"{key}_scale", None))
    return moved
