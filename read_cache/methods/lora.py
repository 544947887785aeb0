"""LoRA (Hu et al. 2021) through peft: a rank-r update B A beside the attention query and value projections.

peft injects `lora_A` [r, in] and `lora_B` [out, r] next to each target Linear, in place, so the
backbone's own weights stay frozen and untouched. Targets are peft's defaults per model family
(T5: q and v of every self- and cross-attention; BERT: query and value; Llama-style LMs q_proj and
v_proj, GPT-2 its fused c_attn, GPT-NeoX query_key_value, Phi also its feed-forward fc1 and fc2).
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

    # GPT-2's Conv1D stores its weight transposed (fan_in_fan_out), which peft would otherwise warn about and set itself.
    transposed = model.config.model_type == "gpt2"
    config = LoraConfig(r=size, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=target_modules(model.config.model_type), fan_in_fan_out=transposed)
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
    if kind == "decoder":
        return r * sum(map(sum, decoder_projections(config))) * config.num_hidden_layers
    return r * 2 * config.hidden_size * 2 * config.num_hidden_layers


def decoder_projections(config: Any) -> list[tuple[int, int]]:
    """(in, out) of each LoRA target of one decoder layer: queries H*hd wide, keys and values KV*hd (grouped-query
    attention), the fused q/k/v projections (H + 2 KV)*hd, Phi's feed-forward d <-> intermediate."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    shapes = {"q_proj": (d, heads * head_dim), "v_proj": (d, kv * head_dim), "c_attn": (d, 3 * d),
              "query_key_value": (d, 3 * d), "fc1": (d, getattr(config, "intermediate_size", 0)), "fc2": (getattr(config, "intermediate_size", 0), d)}
    return [shapes[name] for name in target_modules(config.model_type)]
