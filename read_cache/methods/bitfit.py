"""BitFit (Ben Zaken et al. 2022): only bias terms train.

T5 has no biases, so, as LST's BitFit baseline did, a zero-initialised bias is added to every Linear
of the encoder and decoder (the model's output is unchanged until training moves them); the LM head
stays as it is. BERT-family models train the biases they have (attention, FF and layer norms), not
the unused pooler's. Decoder-only LMs get both: the biases they have (GPT-2's everywhere, Qwen2's q/k/v,
LayerNorms') train, and every bias-less Linear under the LM head gets a zero one, as T5's do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from read_cache.methods.model import Body


def adapt(model: nn.Module, kind: str, size: int | None) -> Body:
    if kind != "encoder":
        stacks = (model.encoder, model.decoder) if kind == "t5" else (model.base_model,)
        for stack in stacks:
            for module in stack.modules():
                if isinstance(module, nn.Linear) and module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device))
    if kind == "decoder":
        for p in biases(model.base_model):
            p.requires_grad_(True)
    elif kind == "encoder":
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.startswith("pooler."):
                p.requires_grad_(True)
    return Body(model, kind)


def biases(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if name.endswith("bias")]


def decoder_bias_width(module: nn.Module) -> int:
    """The bias a decoder-only LM's module contributes: a Linear's or Conv1D's output width, a LayerNorm's width."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed Linear: weight [in, out], always biased
        return module.nf
    if isinstance(module, nn.LayerNorm) and module.bias is not None:
        return module.normalized_shape[0]
    return 0


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """T5: the output width of every Linear; BERT: h (embedding norm) + N (7h + intermediate); a decoder-only LM: the
    output width of every Linear and GPT-2 Conv1D under the LM head, plus every LayerNorm's width (its bias)."""
    if kind == "decoder":
        if model is None:
            raise ValueError("a decoder-only LM's BitFit count is read off its layers; pass the model")
        return sum(decoder_bias_width(m) for m in model.base_model.modules())
    if kind == "t5":
        inner = config.num_heads * config.d_kv
        ff = config.d_ff * (2 if getattr(config, "is_gated_act", False) else 1) + config.d_model  # wi (wi_0, wi_1), wo
        attention = 3 * inner + config.d_model  # q, k, v, o
        return config.num_layers * (attention + ff) + config.num_decoder_layers * (2 * attention + ff)
    h = config.hidden_size
    # per layer: q, k, v, attention output, its norm, intermediate, output, its norm
    return h + config.num_hidden_layers * (7 * h + config.intermediate_size)
