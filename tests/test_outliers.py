"""Compact formats hold states with a few outlier channels (~100x the rest, as in pretrained T5's residual
stream): per-channel power-of-two scales fitted at build start keep the ordinary channels exact enough."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_quietly, make_tokenizer

from read_cache.store import open_cache
from read_cache.store.formats import fit_channel_scale
from read_cache.store.transcode import transcode
from read_cache.training.reader import TIERS, SplitReader

OUTLIERS = [3, 77, 200]
CEILINGS = {"int8": 0.03, "int4": 0.12}


@pytest.fixture(scope="module")
def outlier_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random T5 (d 256: eight int4 groups, as t5-small has sixteen) with three embedding channels 100x
    larger: the residual stream carries them through every layer, as pretrained T5's carries its outliers."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("outliers") / "model"
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tok), d_model=256, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.shared.weight[:, OUTLIERS] *= 100
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def caches(outlier_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outlier-caches")
    return {fmt: build_quietly(outlier_t5, "sst2", glue_dir, root / fmt, float_dtype=fmt, limit=60) for fmt in ("bfloat16", "int8", "int4")}


def ordinary_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """Worst layer's relative RMS error over the channels that are not outliers."""
    keep = np.setdiff1d(np.arange(exact.shape[-1]), OUTLIERS)
    a, x = approx[..., keep], exact[..., keep]
    return float(np.max(np.sqrt(((a - x) ** 2).sum(axis=(0, -1)) / (x**2).sum(axis=(0, -1)))))


def encoder_states(path: Path, n: int = 40) -> np.ndarray:
    split = open_cache(path)["train"]
    return np.concatenate([split[i].encoder_hidden for i in range(n)])


def test_the_states_really_carry_outliers(caches: dict[str, Path]) -> None:
    x = encoder_states(caches["bfloat16"])
    absmax = np.abs(x).max(axis=0)  # [layers, d]
    ordinary = np.median(absmax, axis=-1)
    assert (absmax[:, OUTLIERS].min(axis=-1) > 15 * ordinary).all()  # the last layer is after T5's final RMS norm


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compact_formats_keep_the_ordinary_channels(caches: dict[str, Path], fmt: str) -> None:
    cache = open_cache(caches[fmt])
    scale = cache.channel_scale("encoder_hidden")
    assert scale is not None and (scale[:, OUTLIERS] >= 16).all()
    assert np.array_equal(np.delete(scale, OUTLIERS, axis=-1), np.ones_like(np.delete(scale, OUTLIERS, axis=-1)))
    assert ordinary_error(encoder_states(caches[fmt]), encoder_states(caches["bfloat16"])) <= CEILINGS[fmt]
    assert cache.channel_scale("decoder_hidden") is not None


def test_without_channel_scales_int4_flattens_the_ordinary_channels(caches: dict[str, Path]) -> None:
    # What the scales fix: the same states quantised with one scale per group of 32 lose the small channels.
    from read_cache.store.formats import dequantise, get_format, quantise

    x = encoder_states(caches["bfloat16"])
    fmt = get_format("int4")
    plain = dequantise(*quantise(x, fmt), fmt)
    channel = fit_channel_scale(x)
    scaled = dequantise(*quantise(x, fmt, channel), fmt, channel=channel)
    assert ordinary_error(plain, x) > 0.2 > CEILINGS["int4"] >= ordinary_error(scaled, x)


def test_every_tier_decodes_with_the_channel_scales(caches: dict[str, Path]) -> None:
    split = open_cache(caches["int8"])["train"]
    examples = np.concatenate([split[i].encoder_hidden for i in range(len(split))])
    for mode in TIERS:
        reader = SplitReader(split, batch_size=16, mode=mode, device="cpu")
        got = torch.cat([b["enc"] for b in reader.epoch(0)]).numpy()
        assert np.array_equal(got, examples), mode
        coded = SplitReader(split, batch_size=16, mode="stream" if mode == "device" else mode, device="cpu", coded=True)
        from read_cache.training.pools import batch_to

        got = torch.cat([batch_to(b, torch.device("cpu"))["enc"] for b in coded.epoch(0)]).numpy()
        assert np.array_equal(got, examples), mode


def test_a_transcode_keeps_the_scales_and_a_resume_reuses_them(caches: dict[str, Path], tmp_path: Path) -> None:
    moved = transcode(caches["bfloat16"], tmp_path / "int8", "int8")
    assert np.array_equal(open_cache(moved).channel_scale("encoder_hidden"), open_cache(caches["int8"]).channel_scale("encoder_hidden"))
    assert ordinary_error(encoder_states(moved), encoder_states(caches["bfloat16"])) <= CEILINGS["int8"]
