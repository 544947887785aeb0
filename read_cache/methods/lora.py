"""LoRA (Hu et al. 2021) through peft: a rank-r update B A beside the attention query and value projections.

peft injects `lora_A` [r, in] and `lora_B` [out, r] next to each target Linear, in place, so the
backbone's own weights stay frozen and untouched. Targets are peft's defaults per model family
(T5: q and v of every self- and cross-attention; BERT: query and value).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from read_cache.errors import ReadCacheError
from read_cache.methods.model import Body, quiet_peft

ALPHA = 16
"""LoRA's scaling numerator (the update is scaled by alpha / r), as the LoRA paper's GLUE runs."""


def target_modules(model_type: str) -> list[str]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        raise ReadCacheError(f"--method lora does not know the attention projections of {model_type!r} models; use another method")
    return list(TARGETS[model_type])


def adapt(model: nn.Module, kind: str, size: int | None) -> Body:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=size, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=target_modules(model.config.model_type))
    with quiet_peft():
        get_peft_model(model, config)  # injects the LoRA layers into `model` in place; we run `model` itself
    return Body(model, kind)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """r (in + out) per target: T5 has 2 per encoder layer and 4 per decoder layer (self + cross), BERT 2 per layer."""
    r = size or 0
    if kind == "t5":
        inner = config.num_heads * config.d_kv
        per_projection = r * (config.d_model + inner)
        return per_projection * (2 * config.num_layers + 4 * config.num_decoder_layers)
    return r * 2 * config.hidden_size * 2 * config.num_hidden_layers
