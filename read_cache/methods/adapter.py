"""Houlsby adapters (Houlsby et al. 2019): a bottleneck after every attention and feed-forward sublayer.

    y = F(x)                 # the sublayer's output projection (attention `o`, FF `wo` / BERT's `output.dense`)
    y' = y + up(gelu(down(y)))   # the adapter, before the sublayer's residual add and norm

`up` starts at zero, so the adapted model starts as the backbone. The adapters live in this body's
`adapters` dict and reach the backbone through forward hooks on those projections: the backbone's
modules and weights are left as they are (the `adapters` package would do the same, but pins
transformers 4). T5 gets one after self-attention, cross-attention (decoder) and FF of every block;
BERT-family encoders one after the attention output and one after the FF output of every layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from read_cache.errors import ReadCacheError
from read_cache.methods.model import Body

T5_OUTPUTS = ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")
ENCODER_OUTPUTS = ("attention.output.dense", "output.dense", "attention.out_lin", "ffn.lin2")
"""Sublayer output projections: BERT/RoBERTa/ELECTRA/DeBERTa names first, DistilBERT's after."""
DECODER_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj", "attention.dense", "mlp.dense_4h_to_h", "self_attn.dense", "mlp.fc2")
"""Decoder-only LMs' sublayer outputs: Llama-style (Qwen, Mistral, Gemma, Phi-3), GPT-NeoX, Phi. GPT-2's are Conv1D
(not Linear), so it gets none and is refused in one line."""


class Adapter(nn.Module):
    def __init__(self, d: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, bottleneck), nn.Linear(bottleneck, d)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))


class AdapterBody(Body):
    def __init__(self, model: nn.Module, kind: str, bottleneck: int):
        super().__init__(model, kind)
        targets = adapter_targets(model, kind)
        if not targets:
            raise ReadCacheError(f"--method adapter does not know where the sublayers of {model.config.model_type!r} models end; use another method")
        d = model.config.d_model if kind == "t5" else model.config.hidden_size
        if len(targets) != sublayers(model.config, kind):
            raise ReadCacheError(f"--method adapter found {len(targets)} sublayer outputs in {model.config.model_type!r}, not the {sublayers(model.config, kind)} it expects; use another method")
        self.adapters = nn.ModuleDict({name.replace(".", "__"): Adapter(d, bottleneck) for name in targets})
        modules = dict(model.named_modules())
        for name in targets:
            adapter = self.adapters[name.replace(".", "__")]
            modules[name].register_forward_hook(lambda _module, _inputs, output, adapter=adapter: adapter(output))


def adapter_targets(model: nn.Module, kind: str) -> list[str]:
    """Names of the Linear layers whose outputs get an adapter, in the model's order."""
    suffixes = {"t5": T5_OUTPUTS, "decoder": DECODER_OUTPUTS}.get(kind, ENCODER_OUTPUTS)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith("pooler"):
            continue
        if any(name.endswith("." + s) for s in suffixes):
            # BERT: "...attention.output.dense" also ends with "output.dense"; it is one sublayer, named once.
            names.append(name)
    return names


def adapt(model: nn.Module, kind: str, size: int | None) -> AdapterBody:
    return AdapterBody(model, kind, size or 0)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """(2 d m + m + d) per sublayer: T5 2 per encoder block and 3 per decoder block, BERT 2 per layer."""
    m = size or 0
    d = config.d_model if kind == "t5" else config.hidden_size
    return sublayers(config, kind) * (2 * d * m + m + d)


def sublayers(config: Any, kind: str) -> int:
    """Adapters a model gets: T5 2 per encoder block and 3 per decoder block, others 2 per layer (attention, FF)."""
    return 2 * config.num_layers + 3 * config.num_decoder_layers if kind == "t5" else 2 * config.num_hidden_layers
