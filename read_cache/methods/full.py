"""Full fine-tuning: every backbone weight trains (T5's LM head too, through its label-word rows)."""

from __future__ import annotations

from typing import Any

from torch import nn

from read_cache.methods.model import Body


def adapt(model: nn.Module, kind: str, size: int | None) -> Body:
    model.requires_grad_(True)
    return Body(model, kind)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """All of the backbone's weights: read off the model itself (tied embeddings counted once)."""
    if model is None:
        raise ValueError("full tuning's count is the backbone's own size; pass the model")
    return sum(p.numel() for p in model.parameters())
