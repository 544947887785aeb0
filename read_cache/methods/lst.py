"""Ladder Side-Tuning (Sung et al. 2022): a 1/r-width copy of the backbone beside it, fed through gated ladders.

    x_0 = down_0(h_0)                                   # the backbone's embedding output, to width d/r
    x_i = mu_i * down_i(h_i) + (1 - mu_i) * f_i(x_{i-1}),  mu_i = sigmoid(alpha_i / T)   for i = 1..N
    out = up(x_N)                                       # back to width d, read by the task's head

`h_i` is the frozen backbone's output of layer i, `f_i` the side copy's layer i (the same layer class
with every width divided by r: hidden, FF, per-head), `down_i` Linear(d -> d/r) ladders, `up`
Linear(d/r -> d). The backbone runs without gradients: nothing is backpropagated through it, which is
LST's memory saving. For T5 the side copy has an encoder and a decoder; the side decoder
cross-attends to the side encoder and is fed the backbone decoder's states at position 0 (the start
token), so its output takes READ's place before the frozen LM head.

The side copy starts from the backbone's weights, structurally pruned (`prune_into`: each Linear keeps
its rows, then columns, of largest L1 norm), as LST initialises it. Difference from the paper, stated:
every layer is kept (LST can drop some).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from read_cache.errors import ReadCacheError

TEMPERATURE = 0.1
"""T of the gates mu_i = sigmoid(alpha_i / T), as LST; alpha starts at 0 (mu = 0.5)."""


class Ladder(nn.Module):
    """One side stack's ladders: N+1 downsamplers and N gates, applied by a hook after each side layer."""

    def __init__(self, d: int, d_side: int, n_layers: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(d, d_side) for _ in range(n_layers + 1))
        self.alpha = nn.Parameter(torch.zeros(n_layers))
        self.states: list[torch.Tensor] = []

    def first(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Remember the backbone's states for this batch; the side stack's input (x_0)."""
        self.states = states
        return self.down[0](states[0])

    def hook(self, i: int) -> Any:
        def mix(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            side = output[0] if isinstance(output, tuple) else output
            mu = torch.sigmoid(self.alpha[i] / TEMPERATURE)
            mixed = mu * self.down[i + 1](self.states[i + 1]) + (1 - mu) * side
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return mix


class LadderSideBody(nn.Module):
    def __init__(self, model: nn.Module, kind: str, reduction: int):
        super().__init__()
        if kind == "decoder":
            # LST's side network is a pruned copy of the backbone's own layers (T5's or BERT's), wired in per family.
            raise ReadCacheError(f"--method lst is written for T5 and BERT-family backbones, not decoder-only {model.config.model_type!r} models; use lora, prompt, bitfit, adapter or full")
        self.model, self.kind = model, kind
        config = model.config
        if kind == "t5":
            from transformers.models.t5.modeling_t5 import T5Stack

            d = config.d_model
            side = side_config(config, kind, reduction)
            self.side_encoder, self.side_decoder = T5Stack(side["encoder"]), T5Stack(side["decoder"])
            for stack in (self.side_encoder, self.side_decoder):
                stack.embed_tokens = None  # fed by the ladders, never by token ids
            d_side = side["encoder"].d_model
            self.ladders = nn.ModuleDict({
                "encoder": Ladder(d, d_side, config.num_layers), "decoder": Ladder(d, d_side, config.num_decoder_layers),
            })
            blocks = {"encoder": self.side_encoder.block, "decoder": self.side_decoder.block}
        else:
            from transformers import AutoModel

            d = config.hidden_size
            side_cfg = side_config(config, kind, reduction)["encoder"]
            full = AutoModel.from_config(side_cfg, attn_implementation="eager")
            if not hasattr(full, "encoder") or not hasattr(full.encoder, "layer"):
                raise ReadCacheError(f"--method lst cannot build a side copy of {config.model_type!r} models; use another method")
            self.side_config, self.side_encoder = full.config, full.encoder  # the embeddings are not needed
            d_side = side_cfg.hidden_size
            self.ladders = nn.ModuleDict({"encoder": Ladder(d, d_side, config.num_hidden_layers)})
            blocks = {"encoder": self.side_encoder.layer}
        for stack, layers in blocks.items():
            for i, layer in enumerate(layers):
                layer.register_forward_hook(self.ladders[stack].hook(i))
        if kind == "t5":
            prune_into(self.side_encoder, model.encoder)
            prune_into(self.side_decoder, model.decoder)
        else:
            prune_into(self.side_encoder, model.encoder)
        self.up = nn.Linear(d_side, d)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> Any:
        if self.kind == "encoder":
            from transformers.masking_utils import create_bidirectional_mask

            with torch.no_grad():
                extra = {"token_type_ids": types} if types is not None else {}
                states = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra).hidden_states
            x = self.ladders["encoder"].first(list(states))
            side_mask = create_bidirectional_mask(config=self.side_config, inputs_embeds=x, attention_mask=mask)
            out = self.side_encoder(x, side_mask)
            return self.up(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), mask
        with torch.no_grad():
            encoded = self.model.encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            start = torch.full((len(mask), 1), self.model.config.decoder_start_token_id, device=mask.device)
            decoded = self.model.decoder(
                input_ids=start, encoder_hidden_states=encoded.last_hidden_state, encoder_attention_mask=mask,
                output_hidden_states=True, use_cache=False,
            )
        side_enc = self.side_encoder(inputs_embeds=self.ladders["encoder"].first(list(encoded.hidden_states)), attention_mask=mask).last_hidden_state
        side_dec = self.side_decoder(
            inputs_embeds=self.ladders["decoder"].first(list(decoded.hidden_states)),
            encoder_hidden_states=side_enc, encoder_attention_mask=mask, use_cache=False,
        ).last_hidden_state
        return self.up(side_dec[:, 0])  # [B, d]


@torch.no_grad()
def prune_into(side: nn.Module, backbone: nn.Module) -> None:
    """Initialise the side copy from the backbone's weights, structurally pruned (LST, after Li et al. 2017).

    Every Linear keeps the backbone's rows with the largest L1 norm, then of those the columns with the
    largest L1 norm (its bias follows the rows); norms keep their first entries; same-shaped weights
    (T5's relative position buckets) are copied. Layers are matched by name: the side copy is the same
    classes as the backbone's stack.
    """
    source = dict(backbone.named_modules())
    for name, module in side.named_modules():
        original = source.get(name)
        if original is None or module is side:
            continue
        if isinstance(module, nn.Linear) and isinstance(original, nn.Linear):
            rows = original.weight.abs().sum(1).topk(module.out_features).indices.sort().values
            kept = original.weight[rows]
            cols = kept.abs().sum(0).topk(module.in_features).indices.sort().values
            module.weight.copy_(kept[:, cols])
            if module.bias is not None and original.bias is not None:
                module.bias.copy_(original.bias[rows])
        elif isinstance(module, nn.Embedding) and module.weight.shape == original.weight.shape:
            module.weight.copy_(original.weight)
        elif not list(module.children()):  # norms: their first entries (scales ~1, biases small)
            for leaf, p in module.named_parameters(recurse=False):
                p.copy_(getattr(original, leaf).reshape(-1)[: p.numel()].reshape(p.shape))


def side_config(config: Any, kind: str, reduction: int) -> dict[str, Any]:
    """The backbone's config with every width divided by `reduction` (heads kept)."""
    side = copy.deepcopy(config)
    if kind == "t5":
        if config.d_model % reduction or config.d_kv % reduction or config.d_ff % reduction:
            raise ReadCacheError(f"--method lst-{reduction}: T5 widths {config.d_model}/{config.d_kv}/{config.d_ff} are not divisible by {reduction}; try lst-8")
        side.d_model, side.d_kv, side.d_ff = config.d_model // reduction, config.d_kv // reduction, config.d_ff // reduction
        side._attn_implementation = "eager"
        encoder, decoder = copy.deepcopy(side), copy.deepcopy(side)
        encoder.is_decoder, encoder.use_cache = False, False
        decoder.is_decoder, decoder.num_layers = True, config.num_decoder_layers
        return {"encoder": encoder, "decoder": decoder}
    if config.hidden_size % (reduction * config.num_attention_heads) or config.intermediate_size % reduction:
        raise ReadCacheError(
            f"--method lst-{reduction}: width {config.hidden_size} over {config.num_attention_heads} heads is not divisible by {reduction}; try lst-8 or lst-4"
        )
    side.hidden_size, side.intermediate_size = config.hidden_size // reduction, config.intermediate_size // reduction
    return {"encoder": side}


def adapt(model: nn.Module, kind: str, size: int | None) -> LadderSideBody:
    return LadderSideBody(model, kind, size or 8)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """The side copy's layers + N+1 ladders (d x d/r + d/r) and N gates per side stack + up (d/r x d + d)."""
    r = size or 8
    if kind == "t5":
        d, ds = config.d_model, config.d_model // r
        inner, ff = config.num_heads * config.d_kv // r, config.d_ff // r
        attention = 4 * ds * inner + ds  # q, k, v, o (no biases) and the sublayer's norm scale
        feed_forward = ds * ff * (2 if getattr(config, "is_gated_act", False) else 1) + ff * ds + ds
        relative_bias = config.relative_attention_num_buckets * config.num_heads  # block 0 of each stack
        encoder = config.num_layers * (attention + feed_forward) + relative_bias + ds
        decoder = config.num_decoder_layers * (2 * attention + feed_forward) + relative_bias + ds
        ladders = sum((n + 1) * (d * ds + ds) + n for n in (config.num_layers, config.num_decoder_layers))
        return encoder + decoder + ladders + ds * d + d
    d, ds, n = config.hidden_size, config.hidden_size // r, config.num_hidden_layers
    ff = config.intermediate_size // r
    layer = 4 * (ds * ds + ds) + 2 * ds + (ds * ff + ff) + (ff * ds + ds) + 2 * ds  # attention, its norm, FF, its norm
    return n * layer + (n + 1) * (d * ds + ds) + n + ds * d + d
