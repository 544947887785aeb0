"""The backbone's forward pass over length-grouped batches, and the store's 16-bit form of its states.

    for positions, states in forward_batches(backbone, tokenized.ids, 64, "mean"):
        ...   # states: BackboneStates of the examples at `positions`
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from read_cache.backbone.inputs import length_batches, pad
from read_cache.backbone.load import Backbone, BackboneStates, check_finite
from read_cache.errors import ReadCacheError


def to_stored(t: torch.Tensor, float_dtype: str, part: str = "the states") -> np.ndarray:
    """A tensor in the store's 16-bit representation (bfloat16 as raw uint16 bits).

    float16 tops out at 65,504, which T5's later layers exceed: an overflow is an error naming the layer
    (`part` says which states), never a silent inf in the cache.
    """
    if float_dtype == "float16":
        half = t.to(torch.float16)
        try:
            check_finite(part, half)
        except ReadCacheError as e:
            raise ReadCacheError(f"{e}".split(";")[0].replace("the backbone produced inf/NaN", "storing as float16 overflowed")
                                 + "; rebuild with --store-dtype bfloat16 (fp32's range)") from None
        return half.cpu().numpy()
    return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def forward_batches(
    backbone: Backbone, ids: list[list[int]], batch_size: int, cross: str, type_ids: list[list[int]] | None = None, last_only: bool = False
) -> Iterator[tuple[np.ndarray, BackboneStates]]:
    """(positions, states) for length-grouped batches of `ids`; the bare forward pass is this alone.

    `type_ids` (from `Tokenized.type_ids`) go to encoders that read segment ids, so BERT sees a pair as a pair.
    `last_only` (`Tokenized.last_only`) keeps each example's last token's states alone.
    """
    for batch in length_batches(np.array([len(x) for x in ids]), batch_size):
        yield batch, forward_batch(backbone, ids, batch, cross, type_ids, last_only)


def forward_batch(
    backbone: Backbone, ids: list[list[int]], batch: np.ndarray, cross: str, type_ids: list[list[int]] | None = None, last_only: bool = False
) -> BackboneStates:
    """The states of the examples ids[batch], padded together (see `forward_batches`)."""
    input_ids, mask = pad([ids[i] for i in batch], backbone.pad_id)
    types = pad([type_ids[i] for i in batch], 0)[0] if type_ids is not None and backbone.uses_token_types else None
    return backbone.forward(input_ids, mask, cross, token_type_ids=types, last_only=last_only)
