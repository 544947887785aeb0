"""The task model every baseline trains: the (adapted) backbone under READ's heads.

    task_model = build_task_model(backbone, get_task("sst2"), parse_method("lora-8"))
    logits = task_model(input_ids, attention_mask, token_type_ids)       # [B, C] ([B, 1] for STS-B)

T5 classification scores the first token of each label word with the backbone's own LM head, as
READ's `lm` head does (decoder position 0, fed only the start token; the decoder output scaled by
d**-0.5 when the embeddings are tied), so a T5 baseline and READ predict the same way; a decoder-only
LM scores them the same way at its last real token (its bias and soft cap applied). Encoders pool
their last layer the family's way (mean for sentence-transformers models, the first token for
BERT classifiers) and a new linear head reads it; STS-B gets a linear head with one output.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from read_cache.backbone.inputs import input_template
from read_cache.backbone.load import Backbone
from read_cache.errors import ReadCacheError
from read_cache.kinds import MethodSpec, Pooling
from read_cache.tasks.specs import TaskSpec
from read_cache.training.side_network import lm_logits, pool

log = logging.getLogger(__name__)


class Body(nn.Module):
    """What a method changes: the backbone's forward up to the states a head reads.

    `forward` returns T5: [B, d] the decoder output at position 0; encoders and decoder-only LMs: ([B, L, d]
    last-layer token states, [B, L] their mask), so a method may add positions (prompt tuning) and drop them here.
    """

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> Any:
        return run_backbone(self.model, self.kind, input_ids, mask, types)


def run_backbone(
    model: nn.Module, kind: str, input_ids: torch.Tensor | None, mask: torch.Tensor, types: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None
) -> Any:
    """The plain HF forward, without the vocabulary-wide LM logits (only the label rows are needed)."""
    if kind == "decoder":  # the transformer under the LM head; its last state is the final norm's output
        out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, mask
    if kind == "encoder":
        extra = {"token_type_ids": types} if types is not None else {}
        out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, **extra)
        return out.last_hidden_state, mask
    encoded = model.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
    start = torch.full((len(mask), 1), model.config.decoder_start_token_id, device=mask.device)
    decoded = model.decoder(input_ids=start, encoder_hidden_states=encoded, encoder_attention_mask=mask, use_cache=False)
    return decoded.last_hidden_state[:, 0]  # [B, d]


class TaskModel(nn.Module):
    """A method's body under the task's head; `trainable_state()` is everything a run folder must keep."""

    def __init__(self, body: nn.Module, backbone: Backbone, task: TaskSpec, pooling: str):
        super().__init__()
        self.body, self.kind, self.pooling, self.regression = body, backbone.kind, pooling, task.is_regression
        self.lm_head = None
        if scores_label_words(backbone, task):
            lm = backbone.lm_head(task.label_words, input_template(backbone.kind, task))
            if backbone.kind == "decoder" and pooling != Pooling.LAST:
                raise ReadCacheError(f"the LM head scores the label words at the last token, so --pooling {pooling} cannot go with it; leave --pooling out")
            # The LM head itself (not a copy of its rows): frozen for every method but full tuning.
            self.lm_head = backbone.model.get_output_embeddings()
            self.register_buffer("label_ids", torch.tensor(lm["token_ids"]), persistent=False)
            self.output_scale, self.softcap = float(lm["output_scale"]), lm.get("softcap")
            self.head = None
        else:
            self.head = nn.Linear(backbone.d_model, task.num_labels)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(input_ids, mask, types)
        if self.kind != "t5":
            tokens, token_mask = out
            real = token_mask.bool()
            features = pool(tokens[real], torch.nonzero(real)[:, 0], len(tokens), self.pooling)  # [B, d]
        else:
            features = out  # [B, d]
        if self.lm_head is not None:
            bias = getattr(self.lm_head, "bias", None)
            return lm_logits(features, self.lm_head.weight[self.label_ids], self.output_scale, None if bias is None else bias[self.label_ids], self.softcap)
        return self.head(features)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits, labels.long())

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.regression else logits.argmax(-1)

    def trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by name (tied weights once)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone().contiguous() for name, p in self.trainable().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(f"weights do not fit this method: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def build_task_model(backbone: Backbone, task: TaskSpec, spec: MethodSpec, *, pooling: str | None = None, seed: int = 0) -> TaskModel:
    """Freeze the backbone, let the method add (or unfreeze) its parameters, and put the task's head on top."""
    backbone.model.requires_grad_(False)
    torch.manual_seed(seed)
    body = spec.module().adapt(backbone.model, backbone.kind, spec.size)
    pooling = pooling or backbone.info.get("pooling", "mean")
    return TaskModel(body, backbone, task, pooling)


def scores_label_words(backbone: Backbone, task: TaskSpec) -> bool:
    """T5 and decoder-only classification score the label words with the model's own LM head; else a linear head."""
    return backbone.kind != "encoder" and bool(task.label_words)


def head_parameters(backbone: Backbone, task: TaskSpec) -> int:
    """The head's own parameters: none for label-word scoring, a Linear(d -> classes) elsewhere."""
    if scores_label_words(backbone, task):
        return 0
    return backbone.d_model * task.num_labels + task.num_labels


def backbone_parameters(model: nn.Module) -> int:
    """The backbone's own weights (tied ones once), before any method adds to it."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 asks transformers 5 a deprecated question on every wrap; the FutureWarning is theirs, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
