"""The frozen backbone: load a T5-family, encoder-only or decoder-only checkpoint and extract what READ needs.

    backbone = load_backbone("t5-small")        # hub id or local folder
    states = backbone.forward(input_ids, attention_mask)              # + token_type_ids for BERT pairs

Only stage one (`build`), `predict` and `bench` import this module; training never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from read_cache.backbone import causal
from read_cache.backbone.causal import DECODER_FAMILY
from read_cache.errors import ReadCacheError
from read_cache.util.device import (
    default_compute_dtype,
    pick_device,
    warn_if_risky_dtype,
)

log = logging.getLogger(__name__)

T5_FAMILY = ("t5", "mt5", "umt5")
ENCODER_FAMILY = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert", "mpnet", "camembert")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "1_Pooling/config.json")


class BackboneStates(NamedTuple):
    """One batch's cached quantities, tokens flattened over the real (unpadded) positions."""

    encoder_hidden: torch.Tensor
    """[tokens, N_E, d]: phi_E[1..N_E] of every real token, example after example (a decoder-only model's layers;
    [batch, N, d] of each example's last token alone under `last_only`)."""
    cross_attention: torch.Tensor | None
    """[tokens, N_D] (head mean) or [tokens, N_D, H]: sigma_D of decoder position 0; None for encoders."""
    decoder_hidden: torch.Tensor | None
    """[batch, N_D, d]: phi_D[1..N_D] at decoder position 0; None for encoders."""


@dataclasses.dataclass
class Backbone:
    """A frozen model, its tokenizer and the facts about it the cache records."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    """'t5' (encoder-decoder), 'encoder' (BERT family) or 'decoder' (causal LM)."""
    device: str
    dtype: str
    info: dict[str, Any]
    """What the cache records under the root attribute `backbone`."""

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dims(self) -> ModelDims:
        return model_dims(self.config, self.kind)

    @property
    def n_encoder_layers(self) -> int:
        return self.dims.n_encoder_layers

    @property
    def n_decoder_layers(self) -> int:
        return self.dims.n_decoder_layers

    @property
    def d_model(self) -> int:
        return self.dims.d_model

    @property
    def n_heads(self) -> int:
        return self.dims.n_heads

    @property
    def pad_id(self) -> int:
        """The id padding takes: the tokenizer's pad token, else 0. Any id in the vocabulary will do (the mask hides
        it, and pads go right): a causal LM's tokenizer often has none, or one the embeddings lack (Qwen2's class
        adds <|endoftext|> to a vocabulary without it)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None and pad < self.model.get_input_embeddings().num_embeddings else 0

    @property
    def uses_token_types(self) -> bool:
        """True where the model reads segment ids (BERT: the second text of a pair is segment 1)."""
        return self.kind == "encoder" and "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_attention: str = "mean",
        *,
        token_type_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> BackboneStates:
        """Run the frozen model on a right-padded batch and return the flattened per-token states.

        `token_type_ids` [B, L] are the tokenizer's segment ids; encoders that use them (BERT) must get
        them for sentence pairs, or the second sentence is read as if it were the first. `last_only`
        (decoder-only models) keeps each example's last real token alone: [B, N, d].
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        real = attention_mask.bool()
        with torch.autocast(device_type=self.device.split(":")[0], dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32"):
            if self.kind == "decoder":
                return self._decoder_states(input_ids, attention_mask, last_only)
            if self.kind == "encoder":
                extra = {"token_type_ids": token_type_ids.to(self.device)} if token_type_ids is not None and self.uses_token_types else {}
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
                enc = torch.stack(out.hidden_states[1:], dim=2)  # [B, L, N_E, d]
                check_finite("encoder", enc[real])
                return BackboneStates(enc[real], None, None)
            # Encoder and decoder separately: the LM head's vocabulary-wide logits are never needed.
            encoded = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            start = torch.full((len(input_ids), 1), self.config.decoder_start_token_id, device=self.device)
            decoded = self.model.decoder(
                input_ids=start,
                encoder_hidden_states=encoded.last_hidden_state,
                encoder_attention_mask=attention_mask,
                output_hidden_states=True,
                output_attentions=True,
                use_cache=False,
            )
        enc = torch.stack(encoded.hidden_states[1:], dim=2)  # [B, L, N_E, d]
        check_finite("encoder", enc[real])
        dec = torch.stack(decoded.hidden_states[1:], dim=1)[:, :, 0]  # [B, N_D, d]
        check_finite("decoder", dec)
        cross = torch.stack(decoded.cross_attentions, dim=1)[:, :, :, 0, :]  # [B, N_D, H, L]
        cross = cross.permute(0, 3, 1, 2)  # [B, L, N_D, H]
        if cross_attention == "mean":
            cross = cross.float().mean(dim=-1)
        check_finite("cross-attention of decoder", cross[real])
        return BackboneStates(enc[real], cross[real], dec)

    def _decoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_only: bool) -> BackboneStates:
        """A causal LM's layers 1..N per real token (right padding: causal attention never lets a real token see a
        pad, so its states are the unpadded sequence's). The LM head is not run: the cache needs no vocabulary-wide logits."""
        out = causal.base_model(self.model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = torch.stack(out.hidden_states[1:], dim=2)  # [B, L, N, d]; the last is after the final norm
        if last_only:
            last = attention_mask.sum(dim=1) - 1
            states = states[torch.arange(len(states), device=states.device), last]  # [B, N, d]
        else:
            states = states[attention_mask.bool()]
        check_finite("decoder-only", states)
        return BackboneStates(states, None, None)

    def lm_head(self, label_words: tuple[str, ...], template: str | None = None) -> dict[str, Any]:
        """What the `lm` head needs, so training never loads the model: label tokens, LM rows, scaling (and for a
        causal LM, read after `template`'s end, the head's bias and soft cap)."""
        if self.kind == "decoder":
            end = causal.prompt_end(template or "")
            token_ids = [causal.readout_token(self.tokenizer, end, word) for word in label_words]
        else:
            token_ids = [self.first_token(word) for word in label_words]
        if len(set(token_ids)) != len(token_ids):
            raise ReadCacheError(f"label words {label_words} share a first token under this tokenizer; the lm head cannot tell them apart")
        rows = self.model.get_output_embeddings().weight[token_ids].detach().float().cpu().numpy()
        if self.kind == "decoder":
            return {"label_words": list(label_words), "token_ids": token_ids, "output_scale": 1.0, **causal.lm_head_extras(self.model, token_ids), "rows": rows}
        # T5 rescales the decoder output by d**-0.5 before the (tied) LM head; v5 names the switch.
        scale_flag = getattr(self.config, "scale_decoder_outputs", getattr(self.config, "tie_word_embeddings", True))
        scale = self.d_model**-0.5 if scale_flag else 1.0
        return {"label_words": list(label_words), "token_ids": token_ids, "output_scale": scale, "rows": rows}

    def root_arrays(self, lm: dict[str, Any] | None) -> dict[str, Any]:
        """The float arrays the cache keeps at its root (`store.layout.ROOT_ARRAYS`): LM rows, a causal LM's final norm."""
        arrays = {"lm_head_rows": lm["rows"]} if lm else {}
        if self.kind == "decoder":
            gain, bias = causal.final_norm(self.model)
            arrays["final_norm_scale"] = gain.numpy()
            if bias is not None:
                arrays["final_norm_bias"] = bias.numpy()
        return arrays

    def first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ReadCacheError(f"label word {word!r} tokenizes to nothing")
        return int(ids[0])


def check_finite(part: str, states: torch.Tensor) -> None:
    """Stop at the first inf/NaN: name the layer (1-based, as `phi[i]`) so the cause can be found.

    `states` is [rows, layers, ...]: hidden states [T or B, layers, d], cross-attention [T, N_D(, heads)]. T5 in
    fp16 is the usual culprit: its feed-forward activations overflow fp16's 65,504 in the later layers.
    """
    finite = torch.isfinite(states)
    if bool(finite.all()):
        return
    bad = (~finite).transpose(0, 1).reshape(states.shape[1], -1).any(dim=1)  # [layers]
    layer = int(bad.nonzero()[0]) + 1
    raise ReadCacheError(
        f"the backbone produced inf/NaN in {part} layer {layer} of {states.shape[1]}; the build stopped before "
        "writing that batch. fp16 overflows in T5: rebuild with --dtype bf16 (or fp32), or check the model's weights"
    )


def use_fast_attention(net: torch.nn.Module, kind: str) -> str:
    """Switch the attention that needs no probabilities to SDPA (fused kernels); returns what each part runs.

    Loading is eager, because T5's decoder must return its cross-attention probabilities (SDPA returns
    none). But those are one query per layer (decoder position 0), so only the encoder's self-attention,
    L x L per head and layer, is worth fusing; an encoder-only backbone needs no probabilities at all. The
    states are the eager path's within float rounding (tests/test_fast_forward.py holds them to it). A family
    without an SDPA kernel keeps eager.
    """
    part = net.encoder if kind == "t5" else net
    if kind == "decoder" and getattr(net.config, "final_logit_softcapping", None) is not None:
        return "eager"  # Gemma 2 soft-caps its attention logits, which only its eager path does
    try:
        part.set_attn_implementation("sdpa")
    except (ValueError, ImportError, AttributeError) as e:
        log.info("%s keeps eager attention (%s)", type(net).__name__, _first_line(e))
        return "eager"
    return "encoder sdpa, decoder eager" if kind == "t5" else "sdpa"


def truncate_layers(net: torch.nn.Module, kind: str, drop: int) -> None:
    """Drop the last `drop` encoder (and decoder) layers in place, before any forward pass (READ-large's T5-large).

    T5 keeps its final layer norm, so the last kept layer's output is normalised as the full model's last one is.
    """
    if drop == 0:
        return
    config = net.config
    stacks = {
        "encoder": lambda: [(net.encoder.layer, "num_hidden_layers")],
        "decoder": lambda: [(causal.layer_list(net), "num_hidden_layers")],
        "t5": lambda: [(net.encoder.block, "num_layers"), (net.decoder.block, "num_decoder_layers")],
    }[kind]()
    for layers, attr in stacks:
        if drop >= len(layers):
            raise ReadCacheError(f"--drop-last-layers {drop} leaves no layer of the model's {len(layers)}; pass a smaller number")
        del layers[len(layers) - drop :]
        setattr(config, attr, len(layers))


def load_backbone(
    model: str,
    *,
    dtype: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    drop_last_layers: int = 0,
) -> Backbone:
    """Load a frozen, eval-mode backbone from a hub id or a local folder (less its last `drop_last_layers` layers)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        T5ForConditionalGeneration,
    )

    device = str(pick_device(device))  # checked before any weights load: no CUDA here is one line, not a traceback
    config = _load_config(AutoConfig, model, revision)
    kind = backbone_kind(config, model)
    dtype = dtype or default_compute_dtype(device, kind)
    if dtype not in DTYPES:
        raise ReadCacheError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    warn_if_risky_dtype(dtype, kind)
    # Attention maps need eager attention in transformers 5 (SDPA refuses output_attentions); the parts
    # that need none switch to SDPA after loading (use_fast_attention).
    # A causal LM with its head: the `lm` head's rows (and bias) are the head's, and the online baselines train through it.
    cls = {"t5": T5ForConditionalGeneration, "decoder": AutoModelForCausalLM}.get(kind, AutoModel)
    try:
        net = cls.from_pretrained(model, revision=revision, attn_implementation="eager", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise ReadCacheError(f"cannot load model {model!r}: {_first_line(e)}") from e
    if kind == "decoder":
        causal.prepare_tokenizer(tokenizer)
    truncate_layers(net, kind, drop_last_layers)
    attention = use_fast_attention(net, kind)
    net.requires_grad_(False).eval().to(device)
    info = {
        "kind": kind,
        "model": model_reference(model),
        "model_type": config.model_type,
        "revision": revision or getattr(config, "_commit_hash", None),
        "fingerprint": model_fingerprint(model, config),
        "config": config.to_diff_dict(),
        "drop_last_layers": drop_last_layers,
        "attention": attention,
    }
    if kind == "encoder":
        # What `read-cache train` pools by when no --pooling is given (the family's own way).
        info["pooling"] = suggested_pooling(model, revision)
    if kind == "decoder":
        info["pooling"] = "last"  # the readout: the only token that has read the whole prompt
    log.info("loaded %s (%s) on %s with %s compute", model, kind, device, dtype)
    return Backbone(net, tokenizer, kind, device, dtype, info)


def _load_config(auto_config: Any, model: str, revision: str | None) -> Any:
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ReadCacheError(f"--model {model} is a folder without config.json, so not a model folder; pass a hub id or a saved model folder")
    try:
        return auto_config.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        hint = "" if path.exists() else " (no such local folder, and the hub could not provide it: pass a local model folder where the hub is unreachable)"
        raise ReadCacheError(f"cannot load model {model!r}{hint}: {_first_line(e)}") from e


def model_reference(model: str) -> str:
    """How a cache names its model: the hub id, or the absolute path of a local folder."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def backbone_kind(config: Any, model: str) -> str:
    """'t5', 'encoder' or 'decoder'; anything else (a causal family not yet checked, other encoder-decoders) is
    refused with the families we support."""
    if config.model_type in T5_FAMILY:
        return "t5"
    if config.model_type in ENCODER_FAMILY and not getattr(config, "is_decoder", False):
        return "encoder"
    if config.model_type in DECODER_FAMILY:
        return "decoder"
    what = "a decoder-only" if getattr(config, "is_decoder", False) or _causal(config) else "an unsupported"
    raise ReadCacheError(
        f"--model {model} is {what} {config.model_type!r} model whose hidden states read-cache has not been checked against; "
        f"it supports T5-family encoder-decoders ({', '.join(T5_FAMILY)}), encoder-only models of the BERT family "
        f"({', '.join(ENCODER_FAMILY)}) and decoder-only models of the families {', '.join(DECODER_FAMILY)}"
    )


class ModelDims(NamedTuple):
    n_encoder_layers: int
    """The layers READ's encoder recurrence runs over (a decoder-only model's only stack)."""
    n_decoder_layers: int
    d_model: int
    n_heads: int


def model_dims(config: Any, kind: str) -> ModelDims:
    """The shapes the cache records, from the model config alone (the build's and `--dry-run`'s one source)."""
    if kind == "t5":
        return ModelDims(config.num_layers, config.num_decoder_layers, config.d_model, config.num_heads)
    # BERT and the causal families name these alike (GPT-2's n_layer / n_embd / n_head through attribute_map).
    return ModelDims(config.num_hidden_layers, 0, config.hidden_size, config.num_attention_heads)


def _causal(config: Any) -> bool:
    """A decoder-only family: transformers knows a causal LM for it and no sequence-to-sequence model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def suggested_pooling(model: str, revision: str | None = None) -> str:
    """How the encoder's family pools its tokens: 'mean' for sentence-transformers models, else 'first' ([CLS]).

    A sentence-transformers checkpoint says so with modules.json / 1_Pooling/config.json; the latter
    names the mode (mean or CLS token). A plain BERT-style checkpoint is a classifier: its first token.
    """
    # modules.json first: for a hub id every lookup is a request, and a plain BERT needs only this one.
    local_markers = any((Path(model) / name).exists() for name in (*SENTENCE_TRANSFORMERS_FILES, "1_Pooling"))
    if _model_file(model, "modules.json", revision) is None and not local_markers:
        return "first"
    pooling_config = _model_file(model, "1_Pooling/config.json", revision)
    if pooling_config is not None:
        modes = json.loads(Path(pooling_config).read_text())
        return "first" if modes.get("pooling_mode_cls_token") and not modes.get("pooling_mode_mean_tokens") else "mean"
    return "mean"


def _model_file(model: str, name: str, revision: str | None) -> str | None:
    """A file of a local model folder, or of a hub repository (None when absent or unreachable)."""
    path = Path(model)
    if path.is_dir():
        return str(path / name) if (path / name).is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            model, name, revision=revision, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
    except (OSError, ValueError):
        return None


def model_fingerprint(model: str, config: Any) -> str:
    """Identify the weights: the hub commit, or for a folder a hash of its weight files' ends and sizes."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{getattr(config, '_commit_hash', None) or 'unknown'}"
    digest = hashlib.sha256()
    for weights in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:  # both ends: random weights differ everywhere, and this stays fast for GBs
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return f"sha256:{digest.hexdigest()[:16]}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def package_versions() -> dict[str, str]:
    import numcodecs
    import transformers
    import zarr

    import read_cache

    return {
        "read_cache": read_cache.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "python": os.sys.version.split()[0],
    }
