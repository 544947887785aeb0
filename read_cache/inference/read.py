"""Online use of a READ run: frozen backbone + side network on new text, as the cached path computes it.

    from read_cache.inference.read import predict_read
    out = predict_read("runs/sst2-gru256-lm-20250101-120000", ["a lovely film", "a dull plot"])

The text goes through exactly what the build did: the same prompt (`backbone.inputs.model_inputs`), tokenizer
and max length (`backbone.inputs.tokenize`), length-grouped batches of the build's batch size
(`backbone.forward.forward_batches`), and the states are rounded through the stored format (`round_trip`:
quantised and decoded as the cache does) before the side network sees them, so online outputs equal the cached path's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from read_cache.backbone.forward import forward_batches
from read_cache.backbone.hub import require_hub_for
from read_cache.backbone.inputs import model_inputs, tokenize
from read_cache.backbone.load import Backbone, load_backbone
from read_cache.errors import ReadCacheError
from read_cache.inference.results import Predictions, as_tuples
from read_cache.store import token_rows
from read_cache.store.formats import StoreFormat, dequantise, get_format, quantise_torch
from read_cache.tasks.specs import TaskSpec, get_task
from read_cache.training.side_network import SideNetwork
from read_cache.training.train import load_run

log = logging.getLogger(__name__)


def predict_read(
    run_dir: str | Path,
    texts: Sequence[str] | Sequence[tuple[str, ...]],
    model: str | None = None,
    *,
    batch_size: int | None = None,
    device: str | None = None,
) -> Predictions:
    """Labels (or scores) and logits of a READ run for `texts` (see `inference.predict.predict`)."""
    net, config = load_run(run_dir)
    cache = config["cache"]
    task = get_task(cache["task"])
    examples = as_tuples(task, texts)
    backbone = load_checked_backbone(cache, model, device)
    states = online_states(backbone, task, examples, cache, batch_size or cache.get("build_batch_size") or 64)
    logits = side_network_logits(net, states)
    if net.config.regression:
        return Predictions([float(x) for x in logits], None, logits)
    ids = logits.argmax(axis=-1)
    # Under --protocol lst the targets are the digits "0", "1", "2"; people read the task's label words.
    words = list(task.label_words) if cache.get("protocol") == "lst" else cache.get("label_words") or list(task.label_words)
    return Predictions([words[i] for i in ids], ids, logits, list(words))


def load_checked_backbone(cache: dict[str, Any], model: str | None, device: str | None) -> Backbone:
    """The run's backbone; refuses one whose weights (fingerprint) or identity differ from the cache's."""
    recorded = cache["model"]
    require_hub_for(model or recorded, data_dir=None, want_data=False)
    backbone = load_backbone(
        model or recorded, dtype=cache.get("compute_dtype"), device=device, drop_last_layers=int(cache.get("drop_last_layers") or 0)
    )
    fingerprint = backbone.info["fingerprint"]
    if fingerprint != cache["fingerprint"]:
        raise ReadCacheError(
            f"model {model or recorded!r} has weights {fingerprint}, but the run was trained on a cache of {recorded!r} "
            f"with weights {cache['fingerprint']}; pass --model with the backbone the cache was built from"
        )
    # A local folder that was moved or copied keeps its content hash; anything else must be the same id.
    same_content = fingerprint.startswith("sha256:")
    if backbone.info["model"] != recorded and not same_content:
        raise ReadCacheError(f"model {model!r} is not {recorded!r}, the backbone the run's cache was built from; pass --model {recorded}")
    tokenizer = cache.get("tokenizer") or {}
    if tokenizer.get("vocab_size") not in (None, len(backbone.tokenizer)):
        raise ReadCacheError(
            f"model {model or recorded!r} has a tokenizer of {len(backbone.tokenizer)} tokens, the cache's had {tokenizer['vocab_size']}; "
            "pass the model folder the cache was built from"
        )
    return backbone


def online_states(backbone: Backbone, task: TaskSpec, texts: list[tuple[str, ...]], cache: dict[str, Any], batch_size: int) -> dict[str, torch.Tensor]:
    """The cached quantities for `texts`, in example order, rounded through the store's 16-bit type."""
    # A decoder-only cache records its prompt (`--prompt` or the task's default): the online input is the same text.
    template = cache.get("template") if backbone.kind == "decoder" else None
    firsts, seconds = model_inputs(backbone.kind, task, texts, cache.get("protocol") or "t5", template)
    tokenized = tokenize(backbone.tokenizer, firsts, seconds, int(cache["max_length"]))
    tokenized.last_only = cache.get("tokens") == "last"
    if tokenized.truncated:
        log.info("%d of %d inputs were longer than %d tokens and truncated, as the build did", tokenized.truncated, len(texts), cache["max_length"])
    offsets = tokenized.offsets
    fmt, cross_mode = get_format(cache["float_dtype"]), cache["cross_attention"] or "mean"
    cross_fmt = get_format("bfloat16" if fmt.compact else fmt.name)  # the store keeps cross-attention 16-bit
    channels = {name: np.asarray(v, dtype=np.float32) for name, v in (cache.get("channel_scales") or {}).items()}
    enc = np.empty((int(offsets[-1]), backbone.n_encoder_layers, backbone.d_model), dtype=np.float32)
    cross = dec = None
    for positions, states in forward_batches(backbone, tokenized.ids, batch_size, cross_mode, tokenized.type_ids, tokenized.last_only):
        dest = token_rows(offsets, positions)
        enc[dest] = round_trip(states.encoder_hidden, fmt, channels.get("encoder_hidden"))
        if states.cross_attention is not None:
            stored_cross, stored_dec = round_trip(states.cross_attention, cross_fmt), round_trip(states.decoder_hidden, fmt, channels.get("decoder_hidden"))
            if cross is None:
                cross = np.empty((len(enc), *stored_cross.shape[1:]), dtype=np.float32)
                dec = np.empty((len(texts), *stored_dec.shape[1:]), dtype=np.float32)
            cross[dest], dec[positions] = stored_cross, stored_dec
    lengths = torch.from_numpy(np.diff(offsets))
    out = {
        "enc": torch.from_numpy(enc),
        "token_example": torch.repeat_interleave(torch.arange(len(texts)), lengths),
        "rows": torch.arange(len(texts)),
    }
    if cross is not None:
        out["cross"], out["dec"] = torch.from_numpy(cross), torch.from_numpy(dec)
    return out


def round_trip(states: torch.Tensor, fmt: StoreFormat, channel: np.ndarray | None = None) -> np.ndarray:
    """States as the cache gives them back: divided by the per-channel scales, quantised to the store's format,
    decoded again and multiplied back (as `build.units.StatesOut` stores and the reader decodes them)."""
    return dequantise(*quantise_torch(states, fmt, channel), fmt, channel=channel)


@torch.no_grad()
def side_network_logits(net: SideNetwork, states: dict[str, torch.Tensor], batch_size: int = 256) -> np.ndarray:
    """The side network and head over `states` (all examples), in fp32 on the CPU, batch by batch."""
    n = len(states["rows"])
    offsets = np.concatenate([[0], np.cumsum(torch.bincount(states["token_example"], minlength=n).numpy())])
    outs = []
    for b0 in range(0, n, batch_size):
        b1 = min(b0 + batch_size, n)
        t0, t1 = int(offsets[b0]), int(offsets[b1])
        outs.append(
            net(
                enc=states["enc"][t0:t1],
                token_example=states["token_example"][t0:t1] - b0,
                n_examples=b1 - b0,
                cross=states["cross"][t0:t1] if "cross" in states else None,
                dec=states["dec"][b0:b1] if "dec" in states else None,
            ).float()
        )
    return torch.cat(outs).numpy()
