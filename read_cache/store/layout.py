"""The on-disk format of a cache: its tree, the 16-bit float encoding, the geometry, work units, root attributes.

    cache = read_cache.open_cache("caches/t5-small/sst2")
    cache["train"][0].encoder_hidden          # [m, N_E, d] float32

Layout (Zarr v3; see docs/cache-format.md for the same with plain-zarr recipes)::

    CACHE/                          group; root attributes describe everything (ROOT ATTRIBUTES below)
      lm_head_rows   [C, d] f32     LM-head rows of the label words' first tokens (T5 and decoder-only)
      final_norm_scale [d] f32      decoder-only: the final norm's effective scale (gain), and its bias
      final_norm_bias  [d] f32      where the norm has one (LayerNorm: GPT-2, GPT-NeoX, Phi)
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

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from read_cache.config import BuildConfig
from read_cache.errors import CacheCorruptError, ReadCacheError
from read_cache.store.formats import STORE_DTYPES, StoreFormat, get_format
from read_cache.store.location import Location

FORMAT_VERSION = 3
"""2 added the compact formats (fp8, int8, int4: codes + `*_scale` arrays); 3 stores their codes and scales raw
(crc32c only) by default and records the codec in the geometry, and its compact caches may carry per-channel
scales (root arrays `encoder_hidden_channel_scale`, `decoder_hidden_channel_scale`: a reader that finds none
multiplies by 1, so caches written before them read unchanged). Caches of versions 1 and 2 read unchanged: zarr
reads every array's codecs from its own zarr.json."""
SPLITS = ("train", "validation", "test")
FLOAT_DTYPES = STORE_DTYPES
ROOT_ARRAYS = ("lm_head_rows", "final_norm_scale", "final_norm_bias")
"""The float32 arrays at a cache's root besides the per-channel scales: what training needs of the backbone."""
SCALED_ARRAYS = ("encoder_hidden", "decoder_hidden")
"""The arrays a compact format quantises; cross-attention stays bfloat16 (N_D values per token)."""


def channel_scale_array(name: str) -> str:
    """The root array of `name`'s per-channel scales [layers, d] (compact caches built since format 3.1)."""
    return f"{name}_channel_scale"


# Chunk targets, in raw bytes: big enough that codec and file overheads vanish, small enough that a
# training reader's shuffle blocks stay fine-grained (DESIGN: ~1-8 MB).
CHUNK_BYTES = int(BuildConfig.chunk_mb * 2**20)  # the default lives on BuildConfig
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


def resolve_codec(float_dtype: str, codec: str = "auto") -> str:
    """`--codec auto` is the format's measured choice (`StoreFormat.codec`); any other value is taken as given."""
    return get_format(float_dtype).codec if codec == "auto" else codec


def codec_description(float_dtype: str = "bfloat16", codec: str = "auto") -> dict[str, Any]:
    codec = resolve_codec(float_dtype, codec)
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
    return ragged_rows(offsets[examples], offsets[examples + 1] - offsets[examples])


def ragged_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows [starts[i], starts[i] + lengths[i]) of every i, concatenated in that order (one vectorised pass)."""
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
    codec: str = "auto"
    """Codec of the states and their scales ('none', 'zstd', 'lz4'; 'auto': the format's, see `resolve_codec`).
    Caches before format 3 do not record it; zarr reads each array's codecs from its zarr.json either way."""

    @property
    def states_codec(self) -> str:
        return resolve_codec(self.float_dtype, self.codec)

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
        """The largest per-example chunk: about half a token chunk's bytes (see `split_example_chunk`)."""
        per_example = max(self.bytes_per_example, 2 * self.d_model)
        return _pow2_at_most(self.chunk_bytes // 2 // per_example)

    def split_example_chunk(self, n_examples: int, n_tokens: int) -> int:
        """Examples per chunk of a split's per-example arrays: about as many as one token chunk holds.

        A training read takes whole examples, so it decodes about one decoder-state chunk per token chunk;
        a chunk of many more examples than a read's would be decoded whole for a few of them, by every
        read that touches it. At most `example_chunk`. (Caches of format 2 before this had `example_chunk`.)
        """
        mean_len = max(n_tokens / max(n_examples, 1), 1.0)
        return min(self.example_chunk, _pow2_at_most(int(self.token_chunk / mean_len)))

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
    e = geometry.split_example_chunk(n_examples, n_tokens)
    mean_len = max(n_tokens / max(n_examples, 1), 1.0)
    return e * max(1, math.ceil(UNIT_TOKEN_CHUNKS * geometry.token_chunk / (e * mean_len)))


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

