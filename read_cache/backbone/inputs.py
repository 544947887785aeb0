"""Tokenised inputs: the task's text as token ids, grouped into length batches and padded for the backbone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from read_cache.config import BuildConfig
from read_cache.tasks.specs import TaskSpec


@dataclasses.dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: int
    type_ids: list[list[int]] | None = None
    """Segment ids per token where the tokenizer makes them (BERT pairs: 0 for the first text, 1 for the second).
    The model must get them; the cache need not keep them: they follow from input_ids (segment 1 starts
    after the first separator), and `predict` remakes them from the text with the same tokenizer."""
    last_only: bool = False
    """`build --tokens last`: the cache keeps each example's last token alone (its readout), so it stores one
    row per example; the backbone still reads every token of `ids`."""

    @property
    def offsets(self) -> np.ndarray:
        """Where each example's stored rows start and end: its tokens, or its one readout row."""
        lengths = [min(len(x), 1) if self.last_only else len(x) for x in self.ids]
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def stored_ids(self) -> np.ndarray:
        """The token ids the cache keeps beside the states (int32): every token, or each example's last."""
        rows = (x[-1:] for x in self.ids) if self.last_only else self.ids
        return np.fromiter((t for ids in rows for t in ids), dtype=np.int32, count=int(self.offsets[-1]))


def model_inputs(
    backbone_kind: str, task: TaskSpec, texts: Sequence[tuple[str, ...]], protocol: str = "t5", template: str | None = None
) -> tuple[list[Any], list[Any] | None]:
    """T5 reads the paper's prefixed text (as `protocol` writes it); an encoder reads the raw text (pair); a decoder-only
    model reads one plain prompt (`template`, default `TaskSpec.lm_template`) ending where the label word follows."""
    if backbone_kind == "t5":
        return [task.t5_input(t, protocol) for t in texts], None
    if backbone_kind == "decoder":
        return [task.fill(input_template(backbone_kind, task, protocol, template), t) for t in texts], None
    firsts = [t[0] for t in texts]
    seconds = [t[1] for t in texts] if len(task.text_fields) > 1 else None
    return firsts, seconds


def input_template(backbone_kind: str, task: TaskSpec, protocol: str = "t5", template: str | None = None) -> str:
    """What the cache records as `task.template`: T5's prompt, a decoder-only model's (checked), or the encoder's raw text."""
    if backbone_kind == "t5":
        return task.template(protocol)
    if backbone_kind == "decoder":
        if template is not None:
            task.check_template(template)
        return template or task.lm_template(protocol)
    return "text pair" if len(task.text_fields) > 1 else "text"


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


def tokenize_split(tokenizer: Any, kind: str, task: TaskSpec, texts: Sequence[tuple[str, ...]], cfg: BuildConfig) -> Tokenized:
    """One split's inputs as the build (and `--dry-run`) tokenises them, `--tokens last` applied."""
    tokenized = tokenize(tokenizer, *model_inputs(kind, task, texts, cfg.protocol, cfg.prompt), cfg.max_length)
    return dataclasses.replace(tokenized, last_only=cfg.tokens == "last")


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
