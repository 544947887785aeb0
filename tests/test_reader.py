"""The reader's tiers (stream, ram, device on cpu) yield the same batches, train the same weights, hold batches safely, and name damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_quietly, flip_byte_in_a_chunk, one_error, run_cli
from safetensors.torch import load_file

from read_cache.errors import CacheCorruptError
from read_cache.store import open_cache
from read_cache.training import train as train_module
from read_cache.training.reader import TIERS, SplitReader, choose_modes
from read_cache.training.train import TrainConfig, train

OPTIONS = dict(batch_size=16, seed=3, block_tokens=64, shuffle_blocks=2)


@pytest.fixture(scope="module", params=["bfloat16", "int4"])
def cache(request: pytest.FixtureRequest, tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-bit and a compact (4-bit codes + scales) cache."""
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp(request.param) / "cache", float_dtype=request.param)


def reader(cache: Path, mode: str, **changes) -> SplitReader:
    return SplitReader(open_cache(cache)["train"], mode=mode, device="cpu", **{**OPTIONS, **changes})


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_tier_yields_the_same_float32_batches_in_order(cache: Path, shuffle: bool) -> None:
    readers = {mode: reader(cache, mode, shuffle=shuffle) for mode in TIERS}
    assert len(readers["stream"].bounds) > 2 * readers["stream"].shuffle_blocks  # several windows
    for epoch in range(2):
        batches = {mode: list(r.epoch(epoch)) for mode, r in readers.items()}
        assert batches["stream"][0]["enc"].dtype == torch.float32
        assert_same(batches["stream"], batches["ram"])
        assert_same(batches["stream"], batches["device"])


def test_a_held_batch_is_never_overwritten(cache: Path) -> None:
    # A prefetch queue, evaluation or a DataLoader may keep batches: holding a whole epoch must not see any change.
    for mode in TIERS:
        held = list(reader(cache, mode, shuffle=True).epoch(0))
        assert_same(held, list(reader(cache, "ram", shuffle=True).epoch(0)))


def test_every_tier_trains_the_same_weights(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    choose = train_module.choose_modes

    def run(mode: str) -> dict:
        # The CLI asks for CUDA for --reader device; the library's tier runs on any device, so pick it here.
        pick = (lambda c, s, *a, **k: dict.fromkeys(s, "device")) if mode == "device" else choose
        monkeypatch.setattr(train_module, "choose_modes", pick)
        out = tmp_path / mode
        cfg = TrainConfig(cache=cache, out=out, dim=8, epochs=2, batch_size=16, lr=1e-2, progress=False, threads=1,
                          reader=mode if mode != "device" else "auto", block_tokens=64, shuffle_blocks=2)
        summary = train(cfg)
        assert set(summary["reader"].values()) == {mode}
        return load_file(str(out / "side_network.safetensors"))

    weights = {mode: run(mode) for mode in TIERS}
    for mode in ("ram", "device"):
        assert all(torch.equal(weights["stream"][k], weights[mode][k]) for k in weights["stream"])


@pytest.mark.parametrize("mode", TIERS)
def test_a_flipped_byte_is_named_in_every_tier(cache: Path, tmp_path: Path, mode: str) -> None:
    damaged = shutil.copytree(cache, tmp_path / "cache")
    flip_byte_in_a_chunk(damaged, "train/encoder_hidden", 0xFF)
    with pytest.raises(CacheCorruptError, match="encoder_hidden"):
        list(reader(damaged, mode, shuffle=True).epoch(0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_reader_device_without_cuda_is_one_line(cache: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("train", "--cache", cache, "--out", tmp_path / "run", "--reader", "device", "--epochs", "1", "--no-progress")
    assert code == 2
    assert "--reader device needs a CUDA GPU" in one_error(output) and "--reader ram" in one_error(output)


def test_auto_picks_ram_without_a_gpu_and_device_insists_on_its_budget(cache: Path) -> None:
    c = open_cache(cache)
    splits = ("train", "validation", "test")
    assert choose_modes(c, splits, "auto", 2 * 10**9, "cpu") == dict.fromkeys(splits, "ram")
    with pytest.raises(Exception, match="CUDA"):
        choose_modes(c, splits, "device", 2 * 10**9, "cpu")
