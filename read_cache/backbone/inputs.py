"""Tokenised inputs: the task's text as token ids, grouped into length batches and padded for the backbone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from read_cache.tasks.specs import TaskSpec


@dataclasses.dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: int
    type_ids: list[list[int]] | None = None
    """Segment ids per token where the tokenizer makes them (BERT pairs: 0 for the first text, 1 for the second).
    The model must get them; the cache need not keep them: they follow from input_ids (segment 1 starts
    after the first separator), and `predict` remakes them from the text with the same tokenizer."""

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(x) for x in self.ids])]).astype(np.int64)


def model_inputs(
    backbone_kind: str, task: TaskSpec, texts: Sequence[tuple[str, ...]], protocol: str = "t5"
) -> tuple[list[Any], list[Any] | None]:
    """T5 reads the paper's prefixed text (as `protocol` writes it); an encoder reads the raw text (pair)."""
    if backbone_kind == "t5":
        return [task.t5_input(t, protocol) for t in texts], None
    firsts = [t[0] for t in texts]
    seconds = [t[1] for t in texts] if len(task.text_fields) > 1 else None
    return firsts, seconds


def tokenize(tokenizer: Any, firsts: list[str], seconds: list[str] | None, max_length: int) -> Tokenized:
    """Token ids (and segment ids, where the tokenizer makes them) of every example, truncated to max_length."""
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    encoded = tokenizer(firsts, seconds, truncation=False, verbose=False, return_token_type_ids=with_types)
    full, types = encoded["input_ids"], encoded["token_type_ids"] if with_types else None
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        cut = tokenizer(
            [firsts[i] for i in too_long],
            [seconds[i] for i in too_long] if seconds else None,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=with_types,
        )
        for n, i in enumerate(too_long):
            full[i] = cut["input_ids"][n]
            if types is not None:
                types[i] = cut["token_type_ids"][n]
    return Tokenized(
        [list(map(int, ids)) for ids in full],
        len(too_long),
        [list(map(int, t)) for t in types] if types is not None else None,
    )


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions grouped by length (stable, so deterministic) into batches with little padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask
