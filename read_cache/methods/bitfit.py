"""BitFit (Ben Zaken et al. 2022): only bias terms train.

T5 has no biases, so, as LST's BitFit baseline did, a zero-initialised bias is added to every Linear
of the encoder and decoder (the model's output is unchanged until training moves them); the LM head
stays as it is. BERT-family models train the biases they have (attention, FF and layer norms), not
the unused pooler's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from read_cache.methods.model import Body


def adapt(model: nn.Module, kind: str, size: int | None) -> Body:
    if kind == "t5":
        for stack in (model.encoder, model.decoder):
            for module in stack.modules():
                if isinstance(module, nn.Linear) and module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device))
    else:
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.startswith("pooler."):
                p.requires_grad_(True)
    return Body(model, kind)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """T5: the output width of every Linear; BERT: h (embedding norm) + N (7h + intermediate)."""
    if kind == "t5":
        inner = config.num_heads * config.d_kv
        ff = config.d_ff * (2 if getattr(config, "is_gated_act", False) else 1) + config.d_model  # wi (wi_0, wi_1), wo
        attention = 3 * inner + config.d_model  # q, k, v, o
        return config.num_layers * (attention + ff) + config.num_decoder_layers * (2 * attention + ff)
    h = config.hidden_size
    # per layer: q, k, v, attention output, its norm, intermediate, output, its norm
    return h + config.num_hidden_layers * (7 * h + config.intermediate_size)
