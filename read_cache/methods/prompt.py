"""Prompt tuning (Lester et al. 2021) through peft: n trainable virtual tokens before every input.

peft's `PromptEmbedding` holds the [n, d] prompt, initialised from n embeddings sampled from the
vocabulary. We prepend it ourselves: peft 0.21's feature-extraction wrapper drops BERT's
`token_type_ids`, which would read the second text of a pair as the first; and for T5 the prompt
goes to the encoder only (the paper's setting), so decoder position 0 stays READ's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from read_cache.methods.model import quiet_peft, run_backbone


class PromptBody(nn.Module):
    def __init__(self, model: nn.Module, kind: str, n_tokens: int):
        super().__init__()
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        task_type = TaskType.SEQ_2_SEQ_LM if kind == "t5" else TaskType.FEATURE_EXTRACTION  # a causal LM's prompt too: we prepend it
        config = PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=n_tokens, num_transformer_submodules=1, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
        )
        with quiet_peft():
            wrapped = get_peft_model(model, config)
        self.prompt = wrapped.prompt_encoder[wrapped.active_adapter]  # PromptEmbedding: [n, d]
        self.model, self.kind, self.n_tokens = model, kind, n_tokens
        self.register_buffer("prompt_ids", torch.arange(n_tokens), persistent=False)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> Any:
        batch = len(input_ids)
        prompt = self.prompt(self.prompt_ids).unsqueeze(0).expand(batch, -1, -1)  # [B, n, d]
        embeds = torch.cat([prompt, self.model.get_input_embeddings()(input_ids)], dim=1)
        ones = mask.new_ones(batch, self.n_tokens)
        full_mask = torch.cat([ones, mask], dim=1)
        full_types = torch.cat([torch.zeros_like(ones), types], dim=1) if types is not None else None
        out = run_backbone(self.model, self.kind, None, full_mask, full_types, inputs_embeds=embeds)
        if self.kind != "t5":  # the head pools the real tokens only (a causal LM: its last), as every other method's does
            return out[0][:, self.n_tokens :], mask
        return out


def adapt(model: nn.Module, kind: str, size: int | None) -> PromptBody:
    return PromptBody(model, kind, size or 0)


def expected_parameters(config: Any, kind: str, size: int | None, model: nn.Module | None = None) -> int:
    """n virtual tokens x the embedding width."""
    return (size or 0) * (config.d_model if kind == "t5" else config.hidden_size)
