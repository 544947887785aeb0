"""How the float arrays are stored: 16-bit floats, or 8-/4-bit codes with scales beside them.

    from read_cache.store.formats import get_format, quantise, dequantise
    fmt = get_format("int8")
    codes, scale = quantise(x, fmt)          # x [..., d] float32 -> int8 codes [..., d], scale [...] float32
    y = dequantise(codes, scale, fmt)        # float32, |y - x| <= scale / 2 per value

Formats (`--store-dtype`), per (token, layer) row of d values:

    bfloat16  uint16 bits of the bfloat16 (top half of a float32)              2 bytes/value
    float16   IEEE half                                                          2 bytes/value
    fp8       float8 e4m3fn codes of x / s, s = absmax(row) / 448 (float32)      1 byte/value + 4 bytes/row
    int8      round(x / s) in [-127, 127], s = absmax(row) / 127 (float32)       1 byte/value + 4 bytes/row
    int4      round(x / s) in [-7, 7] + 8, s = absmax(group) / 7 (float16),      0.5 byte/value + 2 bytes/group
              groups of `group` values along d, two codes per byte (low nibble first)

The numpy functions here are the reference (and what docs/cache-format.md spells out for plain-zarr
readers); `quantise_torch` is the same arithmetic for the build (bit for bit, tested), and
`dequantise_torch` is what the training reader runs on the GPU, where decoding on the host would be
the bottleneck. This module imports neither zarr nor torch at import time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from read_cache.errors import ReadCacheError
from read_cache.kinds import STORE_DTYPES

FP8_MAX = 448.0
INT8_MAX = 127
INT4_MAX = 7
FLOAT16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class StoreFormat:
    """One `--store-dtype`: what a stored value looks like and how wrong it may be."""

    name: str
    code_dtype: str
    """numpy dtype of the stored codes."""
    bits: int
    """Bits per value in the codes."""
    scale_dtype: str | None
    """numpy dtype of the scales; None for the 16-bit formats (no scales)."""
    ceiling_rms: float
    """Largest allowed relative RMS error of a layer (sqrt(sum err^2 / sum x^2) over the sample)."""
    ceiling_row: float
    """Largest allowed relative error of one (token, layer) row, ||x - x'|| / ||x||."""
    ceiling_channel: float
    """Largest allowed channel-weighted relative RMS error of a layer (every channel scaled to unit RMS first):
    what outlier channels do to the small ones under a shared scale, which the two above barely see."""
    codec: str
    """The codec `--codec auto` picks for the codes and scales (docs/storage.md: measured): 'none' (raw, crc32c
    only) for the 8-/4-bit codes, which quantisation has already compressed and which blosc-zstd would decode at
    ~0.6 GB/s a core; 'zstd' (blosc zstd-1, byte-shuffled) for 16-bit floats, whose exponent bytes compress."""
    disk_bytes_per_value: float
    """Bytes per value on disk with that codec, codes + scales (measured for zstd; exact for raw), for projections."""

    @property
    def compact(self) -> bool:
        return self.scale_dtype is not None

    @property
    def grouped(self) -> bool:
        """Scales per group of values along d (int4), rather than one per row."""
        return self.name == "int4"

    def group_size(self, d: int) -> int:
        """Values per scale along d: the whole row, or int4's groups."""
        return int4_group(d) if self.name == "int4" else d

    def code_width(self, d: int) -> int:
        """Stored codes per row of d values (int4 packs two per byte)."""
        return d // 2 if self.name == "int4" else d

    def raw_bytes_per_row(self, d: int) -> float:
        """Codes plus scales of one row of d values, before compression."""
        codes = d * np.dtype(self.code_dtype).itemsize // (2 if self.name == "int4" else 1)
        scales = 0 if self.scale_dtype is None else (d // self.group_size(d)) * np.dtype(self.scale_dtype).itemsize
        return codes + scales


# Ceilings: 16-bit floats round each value to within 2^-9 (bfloat16) / 2^-11 (float16) of itself, so a
# row cannot exceed that (plus slack for float16 subnormals). fp8 keeps 3 mantissa bits: at most 2^-4
# relative per value. int8/int4 are absolute steps of the row's (group's) absmax: an outlier channel
# widens every step of its row, so the bound depends on absmax / RMS; the ceilings below allow
# absmax / RMS up to ~60 (int8) and ~25 (int4 per group) before failing loudly. See docs/storage.md.
FORMATS: dict[str, StoreFormat] = {
    f.name: f
    for f in (
        StoreFormat("bfloat16", "uint16", 16, None, 0.003, 0.004, 0.05, "zstd", 1.59),
        StoreFormat("float16", "float16", 16, None, 0.001, 0.002, 0.05, "zstd", 1.62),
        StoreFormat("fp8", "uint8", 8, "float32", 0.05, 0.07, 0.20, "none", 1.01),
        StoreFormat("int8", "int8", 8, "float32", 0.05, 0.15, 0.20, "none", 1.01),
        StoreFormat("int4", "uint8", 4, "float16", 0.20, 0.35, 0.40, "none", 0.5625),
    )
}
assert tuple(FORMATS) == STORE_DTYPES, "read_cache.kinds.STORE_DTYPES names the same formats in the same order"
COMPACT_DTYPES = tuple(n for n, f in FORMATS.items() if f.compact)


def get_format(name: str) -> StoreFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ReadCacheError(f"--store-dtype {name!r} is not one of {', '.join(STORE_DTYPES)}") from None


def int4_group(d: int) -> int:
    """int4's values per scale: 32, or the largest power of two dividing d below that (d must be even)."""
    group = 32
    while group > 2 and d % group:
        group //= 2
    return group


# --------------------------------------------------------------------------------------------------
# float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF are NaN.


def _fp8_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[[0x7F, 0xFF]] = np.nan
    return value.astype(np.float32)


FP8_VALUES = _fp8_table()
"""float32 value of every fp8 e4m3fn code: decoding is `FP8_VALUES[codes]`."""
_FP8_POSITIVE = FP8_VALUES[:0x7F]  # codes 0..126, increasing from 0 to 448
_FP8_MIDPOINTS = (_FP8_POSITIVE[:-1] + _FP8_POSITIVE[1:]) / 2  # exact in float32


def fp8_encode(y: np.ndarray) -> np.ndarray:
    """float32 in [-448, 448] -> e4m3fn codes, round to nearest, ties to even (as torch's cast)."""
    magnitude = np.abs(y)
    code = np.searchsorted(_FP8_MIDPOINTS, magnitude, side="left")
    # At an exact midpoint searchsorted picked the lower neighbour; ties go to the even code.
    tie = magnitude == _FP8_MIDPOINTS[np.minimum(code, len(_FP8_MIDPOINTS) - 1)]
    code = code + (tie & (code % 2 == 1))
    return (code.astype(np.uint8) | (np.signbit(y).astype(np.uint8) << 7)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# numpy reference


def _safe(scale: np.ndarray) -> np.ndarray:
    """Scales to divide by: an all-zero row (scale 0) stores zeros."""
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def quantise(x: np.ndarray, fmt: StoreFormat, channel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [..., d] -> (codes [..., code_width(d)], scales [...] or [..., d / group] or None); x is divided
    by the per-channel scales [layers, d] first where given (`fit_channel_scale`: powers of two, so exactly)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channel is not None:
        x = x / channel
    if fmt.name == "bfloat16":
        bits = x.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    if fmt.name == "float16":
        return x.astype(np.float16), None
    if fmt.name == "fp8":
        scale = (np.abs(x).max(axis=-1) / np.float32(FP8_MAX)).astype(np.float32)
        y = np.clip(x / _safe(scale)[..., None], -FP8_MAX, FP8_MAX)
        return fp8_encode(y), scale
    if fmt.name == "int8":
        scale = (np.abs(x).max(axis=-1) / np.float32(INT8_MAX)).astype(np.float32)
        q = np.clip(np.rint(x / _safe(scale)[..., None]), -INT8_MAX, INT8_MAX)
        return q.astype(np.int8), scale
    if fmt.name == "int4":
        d = x.shape[-1]
        groups = x.reshape(*x.shape[:-1], d // int4_group(d), int4_group(d))
        scale = _int4_scale(np.abs(groups).max(axis=-1))
        q = np.clip(np.rint(groups / _safe(scale.astype(np.float32))[..., None]), -INT4_MAX, INT4_MAX).astype(np.int8) + 8
        q = q.reshape(*x.shape[:-1], d // 2, 2).astype(np.uint8)
        return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8), scale
    raise ReadCacheError(f"unknown store format {fmt.name!r}")


def _int4_scale(absmax: np.ndarray) -> np.ndarray:
    if absmax.size and float(absmax.max()) / INT4_MAX > FLOAT16_MAX:
        raise ReadCacheError(
            f"a value of {float(absmax.max()):.3g} is beyond int4's float16 scales; store this model with --store-dtype fp8, int8 or bfloat16"
        )
    return (absmax / np.float32(INT4_MAX)).astype(np.float16)


def dequantise(
    codes: np.ndarray, scale: np.ndarray | None, fmt: StoreFormat, out: np.ndarray | None = None, channel: np.ndarray | None = None
) -> np.ndarray:
    """Stored codes (+ scales) -> float32 [..., d]; times the per-channel scales [layers, d] where the cache has them."""
    values = _dequantise(codes, scale, fmt, out)
    if channel is not None:
        values *= channel
    return values


def _dequantise(codes: np.ndarray, scale: np.ndarray | None, fmt: StoreFormat, out: np.ndarray | None) -> np.ndarray:
    if fmt.name == "bfloat16":
        wide = np.empty(codes.shape, np.uint32) if out is None else out.view(np.uint32)
        wide[...] = codes  # widen first: a shift in uint16 would drop the bits
        wide <<= np.uint32(16)
        return wide.view(np.float32)
    if fmt.name == "float16":
        return codes.astype(np.float32) if out is None else np.copyto(out, codes, casting="unsafe") or out
    assert scale is not None, f"{fmt.name} codes need their scales"
    if fmt.name == "fp8":
        # Fancy indexing, not np.take: measured ~3x faster on uint8 codes (take converts them to intp first).
        values = FP8_VALUES[codes] if out is None else np.take(FP8_VALUES, codes, out=out)
        return np.multiply(values, scale[..., None], out=values)
    if fmt.name == "int8":
        values = codes.astype(np.float32) if out is None else np.copyto(out, codes, casting="unsafe") or out
        return np.multiply(values, scale[..., None], out=values)
    if fmt.name == "int4":
        d = codes.shape[-1] * 2
        q = np.empty((*codes.shape, 2), np.int8)
        np.bitwise_and(codes, 15, out=q[..., 0], casting="unsafe")
        np.right_shift(codes, 4, out=q[..., 1], casting="unsafe")
        q -= 8
        values = q.reshape(*codes.shape[:-1], scale.shape[-1], -1).astype(np.float32)
        values *= scale.astype(np.float32)[..., None]
        values = values.reshape(*codes.shape[:-1], d)
        if out is not None:
            out[...] = values
            return out
        return values
    raise ReadCacheError(f"unknown store format {fmt.name!r}")


# --------------------------------------------------------------------------------------------------
# torch: quantise in the build (on the backbone's device), dequantise in the reader (on the GPU)


def quantise_torch(x: Any, fmt: StoreFormat, channel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The numpy `quantise` in torch, on x's device; returns numpy (the store's input). Bit-identical.

    It runs on the build's main thread between forward batches, and the batches grow (sorted by length), so
    every fresh temporary is new memory to fault in: the work is done in place on one float32 copy of x."""
    import torch

    y = _scaled(x, channel, copy=fmt.compact)  # the 16-bit formats only read it
    if fmt.name == "bfloat16":
        return y.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None
    if fmt.name == "float16":
        return y.to(torch.float16).cpu().numpy(), None
    if fmt.name in ("fp8", "int8"):
        top = FP8_MAX if fmt.name == "fp8" else float(INT8_MAX)
        scale = _absmax(y) / torch.tensor(top, dtype=torch.float32)
        y.div_(torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-top, top)
        codes = y.to(torch.float8_e4m3fn).view(torch.uint8) if fmt.name == "fp8" else y.round_().to(torch.int8)
        return codes.cpu().numpy(), scale.cpu().numpy()
    if fmt.name == "int4":
        d = y.shape[-1]
        groups = y.reshape(*y.shape[:-1], d // int4_group(d), int4_group(d))
        absmax = _absmax(groups)
        if absmax.numel() and float(absmax.max()) / INT4_MAX > FLOAT16_MAX:
            _int4_scale(absmax.cpu().numpy())  # raises the one-line error
        scale = (absmax / torch.tensor(float(INT4_MAX))).to(torch.float16)
        s = scale.float()
        q = groups.div_(torch.where(s > 0, s, 1.0)[..., None]).round_().clamp_(-INT4_MAX, INT4_MAX).add_(8).to(torch.uint8)
        q = q.reshape(*y.shape[:-1], d // 2, 2)
        return (q[..., 0] | (q[..., 1] << 4)).cpu().numpy(), scale.cpu().numpy()
    raise ReadCacheError(f"unknown store format {fmt.name!r}")


def _scaled(x: Any, channel: np.ndarray | None, copy: bool) -> Any:
    """x as float32 divided by the channel scales (exact: powers of two); with `copy`, in a tensor of its own,
    free to change in place (the caller keeps x)."""
    import torch

    if channel is not None and not np.all(channel == 1):
        # Widen, then divide in place: torch.div(x, channel) on a 16-bit x measured 15.5 ms against 2.1 on a
        # [1600, 6, 512] bfloat16 batch (2 cores), the same values (a 16-bit value is exact in float32).
        return x.to(torch.float32, copy=True).div_(torch.from_numpy(channel).to(x.device))
    return x.clone() if copy and x.dtype == torch.float32 else x.float()


def _absmax(y: Any) -> Any:
    """max |y| over the last axis with no |y| temporary (exact: -min and max are exact, abs_ makes -0.0 0.0).

    amin and amax apart, not torch.aminmax: 0.7 against 6.9 ms on a [1600, 6, 512] float32 batch (2 cores)."""
    import torch

    return torch.maximum(y.amin(-1).neg_(), y.amax(-1)).abs_()


def to_torch_codes(codes: np.ndarray) -> Any:
    """Codes as a torch tensor of a type torch can move and view (uint16 bfloat16 bits -> int16)."""
    import torch

    return torch.from_numpy(codes.view(np.int16) if codes.dtype == np.uint16 else codes)


def dequantise_torch(codes: Any, scale: Any | None, fmt: StoreFormat, channel: Any | None = None) -> Any:
    """Codes (from `to_torch_codes`) + scales on any device -> float32 there (times `channel`, as `dequantise`)."""
    values = _dequantise_torch(codes, scale, fmt)
    return values if channel is None else values.mul_(channel)


def _dequantise_torch(codes: Any, scale: Any | None, fmt: StoreFormat) -> Any:
    import torch

    if fmt.name == "bfloat16":
        return codes.view(torch.bfloat16).float()
    if fmt.name == "float16":
        return codes.float()
    if fmt.name == "fp8":
        return codes.view(torch.float8_e4m3fn).float() * scale[..., None]
    if fmt.name == "int8":
        return codes.float() * scale[..., None]
    if fmt.name == "int4":
        q = torch.stack([codes & 15, codes >> 4], dim=-1).to(torch.int8) - 8  # [..., d/2, 2]
        values = q.reshape(*codes.shape[:-1], scale.shape[-1], -1).float() * scale.float()[..., None]
        return values.reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    raise ReadCacheError(f"unknown store format {fmt.name!r}")


# --------------------------------------------------------------------------------------------------
# Per-channel scales: what keeps a few outlier channels from flattening the rest


CHANNEL_SAMPLE_EXAMPLES = 128
"""Train examples the build fits the per-channel scales on, before its first unit."""
OUTLIER_RATIO = 8.0
"""A channel is shrunk only when its largest value is at least this many times the layer's typical channel's."""


def fit_channel_scale(sample: np.ndarray) -> np.ndarray:
    """States [rows, layers, d] -> per-channel scales [layers, d]: powers of two >= 1 to divide by before quantising.

    Pretrained T5's residual stream carries a few channels tens to hundreds of times larger than the rest;
    under one scale per row (int8, fp8) or per group of 32 (int4) they set the scale and the other channels
    round to a few levels or to zero. Each channel's absmax over the sample, against the layer's median
    channel absmax, rounded to the nearest power of two: ordinary channels keep 1, an outlier comes down to
    within sqrt(2) of the typical channel's range (SmoothQuant's idea, without touching any weights). Rounding
    down left outliers up to 2x the rest, setting int4's group scales (ordinary channels 10.6-13.8% off on
    tests/test_outliers.py's model); rounding up squeezed the outliers' own values (worst rows 76% off). Dividing by a power of
    two is exact, so decoding stays a multiply (`dequantise(..., channel=)`).
    """
    absmax = np.abs(np.asarray(sample, dtype=np.float32)).max(axis=0)
    typical = np.median(absmax, axis=-1, keepdims=True)
    ratio = absmax / np.maximum(typical, np.finfo(np.float32).tiny)
    shrink = np.where(ratio >= OUTLIER_RATIO, np.exp2(np.rint(np.log2(np.maximum(ratio, 1.0)))), 1.0)
    return shrink.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Reconstruction error, measured during the build


CHANNEL_MIN_ROWS = 64
"""Rows a unit's sample needs before its channel-weighted error is checked: a channel's RMS from a
handful of rows is noise (the value is still recorded)."""


@dataclasses.dataclass
class ErrorStats:
    """Running error sums of one array, per layer: what `inspect` shows and the ceilings check."""

    err2: list[float]
    """Sum over sampled rows of ||x - x'||^2, per layer."""
    ref2: list[float]
    """Sum over sampled rows of ||x||^2, per layer."""
    worst_row: list[float]
    """Largest ||x - x'|| / ||x|| of a sampled row, per layer."""
    channel: list[float]
    """Sum over closed units of (channel-weighted relative RMS error x the unit's sampled rows), per layer:
    within a unit, sqrt(mean over channels of sum err^2 / sum x^2), i.e. every channel scaled to unit RMS."""
    channel_rows: int = 0
    """Sampled rows behind `channel`."""
    rows: int = 0
    _channel_err2: Any = dataclasses.field(default=None, repr=False)  # [layers, d] sums of the open unit
    _channel_ref2: Any = dataclasses.field(default=None, repr=False)
    _open_rows: int = 0

    @classmethod
    def empty(cls, layers: int) -> ErrorStats:
        return cls([0.0] * layers, [0.0] * layers, [0.0] * layers, [0.0] * layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorStats:
        return cls(**{k: d[k] for k in ("err2", "ref2", "worst_row", "channel", "channel_rows", "rows")})

    def add(self, x: np.ndarray, approx: np.ndarray) -> None:
        """Add a sample: x and its reconstruction, [rows, layers, d]; `close_unit` ends a unit."""
        x, approx = x.astype(np.float64), approx.astype(np.float64)
        diff2, ref2 = (x - approx) ** 2, x**2
        err2_rows, ref2_rows = diff2.sum(-1), ref2.sum(-1)  # [rows, layers]
        rel_rows = np.sqrt(err2_rows / np.maximum(ref2_rows, 1e-300))
        self.err2 = [a + b for a, b in zip(self.err2, err2_rows.sum(0).tolist())]
        self.ref2 = [a + b for a, b in zip(self.ref2, ref2_rows.sum(0).tolist())]
        self.worst_row = [max(a, b) for a, b in zip(self.worst_row, rel_rows.max(0).tolist())]
        self.rows += len(x)
        if self._channel_err2 is None:
            self._channel_err2, self._channel_ref2 = np.zeros(x.shape[1:]), np.zeros(x.shape[1:])
        self._channel_err2 += diff2.sum(0)
        self._channel_ref2 += ref2.sum(0)
        self._open_rows += len(x)

    def close_unit(self) -> list[float] | None:
        """Fold the open unit's per-channel sums into `channel`; returns its per-layer value (None if it had no rows)."""
        if self._channel_err2 is None or not self._open_rows:
            return None
        ratio = self._channel_err2 / np.maximum(self._channel_ref2, 1e-300)
        ratio[self._channel_ref2 == 0] = 0.0  # a channel that is always 0 is stored exactly
        value = np.sqrt(ratio.mean(-1)).tolist()
        self.channel = [a + b * self._open_rows for a, b in zip(self.channel, value)]
        self.channel_rows += self._open_rows
        self._channel_err2 = self._channel_ref2 = None
        self._open_rows = 0
        return value

    def merge(self, other: ErrorStats) -> None:
        other.close_unit()
        self.err2 = [a + b for a, b in zip(self.err2, other.err2)]
        self.ref2 = [a + b for a, b in zip(self.ref2, other.ref2)]
        self.worst_row = [max(a, b) for a, b in zip(self.worst_row, other.worst_row)]
        self.channel = [a + b for a, b in zip(self.channel, other.channel)]
        self.channel_rows += other.channel_rows
        self.rows += other.rows

    @property
    def rel_rms(self) -> list[float]:
        return [math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(self.err2, self.ref2)]

    @property
    def channel_rel_rms(self) -> list[float]:
        return [c / self.channel_rows if self.channel_rows else 0.0 for c in self.channel]

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")},
            "rel_rms": self.rel_rms,
            "worst_row_rel": self.worst_row,
            "channel_rel_rms": self.channel_rel_rms,
        }

    def check(self, fmt: StoreFormat, array: str) -> None:
        """Close the open unit and raise if any layer's error is above the format's ceiling."""
        rows = self._open_rows
        unit_channel = self.close_unit() or [0.0] * len(self.err2)
        if rows < CHANNEL_MIN_ROWS:
            unit_channel = [0.0] * len(self.err2)
        for layer, (rms, row, channel) in enumerate(zip(self.rel_rms, self.worst_row, unit_channel), start=1):
            if rms > fmt.ceiling_rms or row > fmt.ceiling_row or channel > fmt.ceiling_channel:
                raise ReadCacheError(
                    f"--store-dtype {fmt.name} stores {array} layer {layer} with relative RMS error {rms:.2%} "
                    f"(worst row {row:.2%}, channel-weighted {channel:.2%}), above its ceiling ({fmt.ceiling_rms:.0%} / "
                    f"{fmt.ceiling_row:.0%} / {fmt.ceiling_channel:.0%}): this model's states have outliers the format cannot "
                    "hold; delete the cache and rebuild with --store-dtype fp8 or bfloat16"
                )


def format_attrs(fmt: StoreFormat, d: int) -> dict[str, Any]:
    """The attributes of a stored state array: enough to decode it with numpy alone."""
    attrs: dict[str, Any] = {"float_dtype": fmt.name}
    if fmt.compact:
        attrs.update({"values_per_scale": fmt.group_size(d), "d": d})
    return attrs
