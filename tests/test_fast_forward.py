"""The tuned forward (SDPA where no attention probabilities are needed) computes the eager path's states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_encoder_only import make_tiny_bert

from read_cache.backbone.load import Backbone, load_backbone


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8 examples of 5-40 tokens, right-padded: padding is where a fused kernel's masking could go wrong."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 5, 17, 33, 12, 40, 8, 25]
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def eager_copy(backbone: Backbone) -> Backbone:
    """The same weights with every attention eager: the reference the tuned path must equal."""
    from copy import deepcopy

    net = deepcopy(backbone.model)
    net.set_attn_implementation("eager")
    return Backbone(net, backbone.tokenizer, backbone.kind, backbone.device, "fp32", backbone.info)


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def test_t5_encoder_runs_sdpa_and_decoder_eager(tiny_t5: Path) -> None:
    backbone = load_backbone(str(tiny_t5), dtype="fp32", device="cpu")
    assert backbone.model.encoder.config._attn_implementation == "sdpa"
    assert backbone.model.decoder.config._attn_implementation == "eager"  # its cross-attention probabilities are cached
    assert backbone.info["attention"] == "encoder sdpa, decoder eager"


@pytest.mark.parametrize("cross", ["mean", "heads"])
def test_t5_tuned_forward_equals_eager_fp32(tiny_t5: Path, cross: str) -> None:
    tuned = load_backbone(str(tiny_t5), dtype="fp32", device="cpu")
    ids, mask = padded_batch(len(tuned.tokenizer))
    fast, slow = tuned.forward(ids, mask, cross), eager_copy(tuned).forward(ids, mask, cross)
    for got, want in zip(fast, slow):
        assert got.shape == want.shape
        assert relative_rms(got, want) < 1e-5


def test_t5_tuned_bf16_stays_within_bf16_noise_of_eager_fp32(tiny_t5: Path) -> None:
    """bf16 autocast moves each layer's states by bf16 rounding, not more (2^-6 relative RMS per layer)."""
    tuned = load_backbone(str(tiny_t5), dtype="bf16", device="cpu")
    ids, mask = padded_batch(len(tuned.tokenizer))
    fast, slow = tuned.forward(ids, mask, "mean"), eager_copy(tuned).forward(ids, mask, "mean")
    for layer in range(fast.encoder_hidden.shape[1]):
        assert relative_rms(fast.encoder_hidden[:, layer], slow.encoder_hidden[:, layer]) < 2**-6
    for layer in range(fast.decoder_hidden.shape[1]):
        assert relative_rms(fast.decoder_hidden[:, layer], slow.decoder_hidden[:, layer]) < 2**-6
    assert relative_rms(fast.cross_attention, slow.cross_attention) < 2**-6


def test_encoder_only_tuned_forward_equals_eager_fp32(tiny_bert_folder: Path) -> None:
    tuned = load_backbone(str(tiny_bert_folder), dtype="fp32", device="cpu")
    assert tuned.info["attention"] == "sdpa"
    ids, mask = padded_batch(len(tuned.tokenizer))
    types = torch.zeros_like(ids)
    types[:, 10:] = 1  # a pair's second segment
    fast = tuned.forward(ids, mask, token_type_ids=types)
    slow = eager_copy(tuned).forward(ids, mask, token_type_ids=types)
    assert relative_rms(fast.encoder_hidden, slow.encoder_hidden) < 1e-5
