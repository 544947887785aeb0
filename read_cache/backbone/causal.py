"""What differs for decoder-only language models (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, GPT-NeoX families).

    body = base_model(causal_lm)                 # the transformer without its LM head (no vocabulary-wide logits)
    scale, bias = final_norm(causal_lm)          # the final norm's effective gain (and bias), for the cache
    token = readout_token(tokenizer, "answer:", "positive")   # the label word's first token after the prompt

The families listed in DECODER_FAMILY are the ones whose `hidden_states[-1]` was checked (tests/test_decoder_only.py)
to be taken after the final norm, so that `lm_head(hidden_states[-1])` is the model's own logits: READ's
correction is added there and the frozen LM head reads it. A family not yet checked is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

from read_cache.errors import ReadCacheError

DECODER_FAMILY = (
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox",
)
"""Causal-LM `model_type`s whose last hidden state is the final norm's output and whose logits are lm_head(it)
(+ a soft cap where the config sets one), each checked on a random tiny model."""

NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""Where the families above keep their final norm on the base model."""
LAYER_LISTS = ("layers", "h")
"""Where they keep their decoder layers (Llama-style `layers`, GPT-2's `h`)."""


def base_model(net: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's head (`model`, `transformer`, `gpt_neox`: `base_model_prefix`)."""
    return net.base_model


def final_norm(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final norm's effective gain [d] and bias [d] (None for RMSNorm), measured rather than read.

    Reading `weight` would be wrong for Gemma, whose RMSNorm multiplies by (1 + weight). A zero-mean input with
    unit RMS (+1, -1, ...) is its own normalisation under RMSNorm and LayerNorm alike, so norm(x) = x * gain + bias,
    and norm(0) = bias (LayerNorm) or 0 (RMSNorm).
    """
    body = base_model(net)
    norm = next((getattr(body, n) for n in NORM_NAMES if isinstance(getattr(body, n, None), torch.nn.Module)), None)
    if norm is None:
        raise ReadCacheError(f"{type(net).__name__} has no final norm under {', '.join(NORM_NAMES)}; this family is not supported")
    d = net.config.hidden_size
    weight = next(norm.parameters())
    unit = torch.ones(d, dtype=weight.dtype, device=weight.device)
    unit[1::2] = -1
    with torch.no_grad():
        zero = norm(torch.zeros_like(unit).unsqueeze(0))[0].float()
        gain = (norm(unit.unsqueeze(0))[0].float() - zero) * unit.float()
    has_bias = getattr(norm, "bias", None) is not None
    return gain.cpu(), zero.cpu() if has_bias else None


def layer_list(net: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (for --drop-last-layers)."""
    body = base_model(net)
    for name in LAYER_LISTS:
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ReadCacheError(f"{type(net).__name__} keeps its layers under none of {', '.join(LAYER_LISTS)}; --drop-last-layers cannot cut it")


def lm_head_extras(net: torch.nn.Module, token_ids: list[int]) -> dict[str, Any]:
    """What the LM head applies besides the rows: a bias (Phi), and the logit soft cap (Gemma 2: cap * tanh(z / cap))."""
    head = net.get_output_embeddings()
    bias = getattr(head, "bias", None)
    cap = getattr(net.config, "final_logit_softcapping", None)
    return {
        "bias": None if bias is None else [float(b) for b in bias.detach().float().cpu()[token_ids]],
        "softcap": None if cap is None else float(cap),
    }


def readout_token(tokenizer: Any, prompt_end: str, word: str) -> int:
    """The first token of `word` as it follows the prompt's end after a space ("answer: positive").

    Byte-level BPE (GPT-2, Llama 3, Qwen) and sentencepiece tokenizers both fold the space into the word's first
    token, so it is taken as the first token the word adds to the prompt's end, not as `word` tokenised alone.
    """
    context = tokenizer(prompt_end, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{prompt_end} {word}", add_special_tokens=False)["input_ids"]
    added = full[len(context) :] if full[: len(context)] == context else tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    if not added or not word.strip():
        raise ReadCacheError(f"label word {word!r} tokenizes to nothing after the prompt {prompt_end!r}; choose another label word or tokenizer")
    return int(added[0])


def prepare_tokenizer(tokenizer: Any) -> None:
    """Truncation keeps the prompt's end, where the label word follows (the readout); pads go right (inputs.pad)."""
    tokenizer.truncation_side = "left"


def prompt_end(template: str) -> str:
    """The template's last line: the text the label word follows (what `readout_token` tokenises it after)."""
    return template.rsplit("\n", 1)[-1].rsplit("}", 1)[-1]
