"""One work unit of a split: the backbone over its examples (`compute_unit`), laid out as the store wants it,
and the writer thread that stores units while the backbone computes the next (`UnitWriter`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from read_cache.backbone.forward import forward_batch, to_stored
from read_cache.backbone.inputs import Tokenized, length_batches
from read_cache.backbone.load import Backbone, BackboneStates
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import CacheWriter, Geometry, Unit, token_rows
from read_cache.store.formats import (
    CHANNEL_SAMPLE_EXAMPLES,
    ErrorStats,
    dequantise,
    fit_channel_scale,
    quantise_torch,
)

ERROR_SAMPLE_STRIDE = 8
"""Every 8th row of every batch is dequantised again and compared with the float32 it came from."""
SAMPLE_BATCH_DIVISOR = 4
"""The channel fit's sample is forwarded in batches of batch_size / this (see `unit_batches`)."""
Ahead = dict[bytes, BackboneStates]
"""Forward states computed before their unit, by the batch's positions (`np.ndarray.tobytes`): the channel fit's
sample, train's first examples, which train's first unit then takes instead of computing them again."""


class StatesOut:
    """One unit's rows of a hidden-state array in the store's format: codes, and scales for compact formats."""

    def __init__(self, rows: int, layers: int, geometry: Geometry, name: str, channel: np.ndarray | None = None):
        fmt = geometry.format
        self.name, self.fmt = name, fmt
        self.channel = channel
        """Per-channel scales [layers, d] (powers of two) the states are divided by before quantising, or None."""
        self.codes = np.empty((rows, layers, fmt.code_width(geometry.d_model)), dtype=fmt.code_dtype)
        self.scale = np.empty((rows, layers, *geometry.scale_shape()), dtype=fmt.scale_dtype) if fmt.compact else None
        self.errors = ErrorStats.empty(layers)

    def put(self, dest: np.ndarray, states: torch.Tensor) -> None:
        if self.fmt.compact:
            codes, scale = quantise_torch(states, self.fmt, self.channel)
        else:  # 16-bit: to_stored also refuses a float16 overflow, naming the part
            codes, scale = to_stored(states, self.fmt.name, self.name.split("_")[0]), None
        self.codes[dest] = codes
        if scale is not None:
            self.scale[dest] = scale
        sample = slice(None, None, ERROR_SAMPLE_STRIDE)
        reference = states[sample].float().cpu().numpy()
        if len(reference):
            # With channel scales the error is measured on the scaled states, every channel in its typical
            # range: unscaled, a row's norm is its outliers', and the ceilings would judge only them.
            decoded = dequantise(codes[sample], None if scale is None else scale[sample], self.fmt)
            self.errors.add(reference if self.channel is None else reference / self.channel, decoded)

    def arrays(self, rows: slice) -> dict[str, np.ndarray]:
        out = {self.name: self.codes[rows]}
        if self.scale is not None:
            out[f"{self.name}_scale"] = self.scale[rows]
        return out


def compute_unit(
    backbone: Backbone, unit: Unit, tokenized: Tokenized, offsets: np.ndarray, cfg: BuildConfig, geometry: Geometry,
    on_batch: Callable[[int], None] = lambda n: None, channels: dict[str, np.ndarray] | None = None, ahead: Ahead | None = None,
) -> tuple[dict, dict, dict[str, ErrorStats]]:
    """Run the backbone over a unit's examples and lay the results out as the store wants them (train's first
    unit takes the batches in `ahead` as they are: `unit_batches`).

    `on_batch(n)` is told after each forward batch how many of the unit's own examples it computed, so
    progress moves per batch rather than per unit (a unit of a big model is minutes of work).
    Also returns the unit's reconstruction error per array (on a sample), after checking it against
    the format's ceiling: a format that cannot hold this model's states stops the build here.
    """
    c0, c1 = unit.compute
    base = int(offsets[c0])
    n_tok = int(offsets[c1]) - base
    channels = channels or {}
    enc = StatesOut(n_tok, geometry.n_encoder_layers, geometry, "encoder_hidden", channels.get("encoder_hidden"))
    cross = np.empty((n_tok, *geometry.cross_shape()), dtype=_np16(geometry.cross_dtype)) if geometry.cross_attention else None
    e0, e1 = unit.examples
    dec = StatesOut(e1 - e0, geometry.n_decoder_layers, geometry, "decoder_hidden", channels.get("decoder_hidden")) if geometry.cross_attention else None
    ids, types = tokenized.ids[c0:c1], tokenized.type_ids[c0:c1] if tokenized.type_ids is not None else None
    # The unit the channel fit's states belong to (train's first, compact formats) batches them as the fit does,
    # whether this build fitted them or the one it resumes did; every other unit batches by length alone (batching
    # a sample apart pads it to its longest example: +8% padded tokens when every split's first unit did it).
    fitted = c0 == 0 and ahead is not None and geometry.format.compact
    ahead = ahead if fitted else {}  # fitted implies it is a dict (empty on a resume)
    for positions in unit_batches(np.array([len(x) for x in ids]), fitted, cfg.batch_size):
        states = ahead.pop(positions.tobytes(), None)
        if states is None:
            states = forward_batch(backbone, ids, positions, cfg.cross_attention, types, tokenized.last_only)
        examples = positions + c0
        dest = token_rows(offsets, examples) - base
        enc.put(dest, states.encoder_hidden)
        own = (examples >= e0) & (examples < e1)
        if cross is not None:
            cross[dest] = to_stored(states.cross_attention, geometry.cross_dtype, "cross-attention of decoder")
            dec.put(examples[own] - e0, states.decoder_hidden[torch.from_numpy(own)])
        on_batch(int(own.sum()))
    t0, t1 = unit.tokens[0] - base, unit.tokens[1] - base
    tokens = enc.arrays(slice(t0, t1))
    examples_out = {}
    errors = {"encoder_hidden": enc.errors}
    if cross is not None:
        tokens["cross_attention"] = cross[t0:t1]
        examples_out = dec.arrays(slice(None))
        errors["decoder_hidden"] = dec.errors
    for name, stats in errors.items():
        stats.check(geometry.format, name)
    return tokens, examples_out, errors


def fit_channel_scales(backbone: Backbone, tokenized: Tokenized, cfg: BuildConfig, ahead: Ahead) -> dict[str, np.ndarray]:
    """Per-channel scales of the quantised arrays, fitted on the first CHANNEL_SAMPLE_EXAMPLES train examples
    (`formats.fit_channel_scale`); the build stores them with the new cache, before its first unit. The sample's
    states go to `ahead`, batched as train's first unit batches them, so the build computes them once."""
    ids = tokenized.ids[:CHANNEL_SAMPLE_EXAMPLES]
    types = tokenized.type_ids[:CHANNEL_SAMPLE_EXAMPLES] if tokenized.type_ids is not None else None
    samples: dict[str, list[np.ndarray]] = {"encoder_hidden": [], "decoder_hidden": []}
    for batch in unit_batches(np.array([len(x) for x in ids]), True, cfg.batch_size):
        states = ahead[batch.tobytes()] = forward_batch(backbone, ids, batch, cfg.cross_attention, types, tokenized.last_only)
        samples["encoder_hidden"].append(states.encoder_hidden.float().cpu().numpy())
        if states.decoder_hidden is not None:
            samples["decoder_hidden"].append(states.decoder_hidden.float().cpu().numpy())
    return {name: fit_channel_scale(np.concatenate(parts)) for name, parts in samples.items() if parts}


def unit_batches(lengths: np.ndarray, fitted: bool, batch_size: int) -> list[np.ndarray]:
    """A unit's forward batches (positions in the unit), grouped by length. The unit the channel fit's sample
    comes from (`fitted`) batches its first CHANNEL_SAMPLE_EXAMPLES apart, as `fit_channel_scales` batches them:
    the fit's states are then this unit's own, bit for bit, whether this build fitted them or the one it resumes did."""
    if not fitted:
        return length_batches(lengths, batch_size)
    head = min(CHANNEL_SAMPLE_EXAMPLES, len(lengths))
    # The sample is the unit's first examples, of every length: batched at the build's size, its two batches were
    # padded to their longest (+87% tokens on SST-2, 3% of a --limit 1000 build); batches of a quarter, +18%.
    fine = max(1, batch_size // SAMPLE_BATCH_DIVISOR)
    return length_batches(lengths[:head], fine) + [b + head for b in length_batches(lengths[head:], batch_size)]


def _np16(float_dtype: str) -> Any:
    return np.uint16 if float_dtype == "bfloat16" else np.float16


# --------------------------------------------------------------------------------------------------
# The writer thread


class UnitWriter:
    """Writes units on a background thread so the backbone never waits on disk."""

    def __init__(self, writer: CacheWriter, split: str, on_written: Callable[[Unit, int, dict[str, ErrorStats]], None]):
        self.writer = writer
        self.split = split
        self.on_written = on_written
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"read-cache-writer-{split}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain without writing once something failed
            unit, tokens, examples, errors = item
            try:
                self.writer.write_unit(self.split, unit, tokens, examples)
                self.on_written(unit, sum(a.nbytes for a in (*tokens.values(), *examples.values())), errors)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self.error = e

    def put(self, unit: Unit, tokens: dict, examples: dict, errors: dict[str, ErrorStats] | None = None) -> None:
        self._raise_if_failed()
        while True:
            try:
                self.queue.put((unit, tokens, examples, errors or {}), timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, OSError) and self.error.errno == 28:
            raise ReadCacheError(
                f"the disk filled up while writing {self.writer.path}; free some space and rerun the same command to resume"
            ) from self.error
        raise self.error
