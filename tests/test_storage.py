"""Compact store formats (fp8, int8, int4), their measured error, the parallel reader and --dry-run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    HANG_GUARD_S,
    build_quietly,
    cache_files,
    flip_byte_in_a_chunk,
    one_error,
    run_cli,
    write_glue,
)

import read_cache
from read_cache.errors import CacheCorruptError, ReadCacheError
from read_cache.store import FORMAT_VERSION
from read_cache.store import formats as F
from read_cache.store.formats import (
    COMPACT_DTYPES,
    STORE_DTYPES,
    ErrorStats,
    dequantise,
    dequantise_torch,
    get_format,
    quantise,
    quantise_torch,
    to_torch_codes,
)
from read_cache.training.reader import CodedBatch, SplitReader, WindowBatch, batch_to

SMALL_CHUNKS = 0.01  # MiB: several units even for a tiny split


def states(seed: int = 0, outliers: bool = False, rows: int = 200, layers: int = 3, d: int = 64) -> np.ndarray:
    """Gaussian rows of varied scale; with `outliers`, 3 channels 100x larger than the rest (as in pretrained T5)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, layers, d)).astype(np.float32) * rng.uniform(0.01, 30, (rows, layers, 1)).astype(np.float32)
    if outliers:
        x[..., [3, 17, 40]] *= 100
    return x


# --------------------------------------------------------------------------------------------------
# The formats themselves


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("name", STORE_DTYPES)
def test_round_trip_error_is_within_the_documented_bound(name: str, outliers: bool) -> None:
    fmt = get_format(name)
    x = states(outliers=outliers)
    codes, scale = quantise(x, fmt)
    assert codes.dtype == np.dtype(fmt.code_dtype) and codes.shape[-1] == fmt.code_width(x.shape[-1])
    stats = ErrorStats.empty(x.shape[1])
    stats.add(x, dequantise(codes, scale, fmt))
    assert max(stats.rel_rms) <= fmt.ceiling_rms and max(stats.worst_row) <= fmt.ceiling_row, stats.to_dict()
    assert max(stats.rel_rms) > 0  # a real rounding, not a copy
    if outliers and name in ("int8", "int4"):
        # A shared scale per row (group) leaves the small channels a few steps: the build refuses such states.
        with pytest.raises(ReadCacheError, match="channel-weighted"):
            stats.check(fmt, "encoder_hidden")
    else:
        stats.check(fmt, "encoder_hidden")
    if name == "int8":  # the per-value bound: half a step of the row's absmax / 127
        step = np.abs(x).max(-1, keepdims=True) / 127
        assert np.all(np.abs(dequantise(codes, scale, fmt) - x) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("name", STORE_DTYPES)
def test_torch_and_numpy_agree_bit_for_bit(name: str) -> None:
    """The build quantises in torch, plain-zarr readers decode with numpy, the GPU reader decodes in torch."""
    fmt = get_format(name)
    x = states(seed=1, outliers=True)
    x[0, 0, :6] = [448.0, 1.0625, -1.1875, 0.0, -0.0, 1e-12]  # fp8 ties (after scaling by 1) and zeros
    x[1, 0] = 0.0  # an all-zero row: scale 0, codes 0
    codes, scale = quantise(x, fmt)
    codes_t, scale_t = quantise_torch(torch.from_numpy(x), fmt)
    assert np.array_equal(codes, codes_t) and (scale is None or np.array_equal(scale, scale_t))
    on_torch = dequantise_torch(to_torch_codes(codes), None if scale is None else torch.from_numpy(scale), fmt).numpy()
    assert np.array_equal(dequantise(codes, scale, fmt), on_torch)
    assert not np.isnan(on_torch).any() and np.all(dequantise(codes, scale, fmt)[1, 0] == 0)
    # As the build calls it: with channel scales, and on the bfloat16 states an autocast forward gives.
    channel = np.ones(x.shape[1:], np.float32)
    channel[:, :3] = 64.0
    for given in (torch.from_numpy(x), torch.from_numpy(x).to(torch.bfloat16)):
        reference = given.float().numpy().copy()
        for ch in (None, channel):
            codes, scale = quantise(reference, fmt, ch)
            codes_t, scale_t = quantise_torch(given, fmt, ch)
            assert np.array_equal(codes, codes_t) and (scale is None or np.array_equal(scale, scale_t))
        assert np.array_equal(given.float().numpy(), reference)  # the caller's states are left as they were
        # Scales of 1 (every channel of a model without outliers, MiniLM's among them) give the codes of no scales.
        plain, ones = quantise_torch(given, fmt), quantise_torch(given, fmt, np.ones_like(channel))
        assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(plain, ones))


def test_fp8_codes_are_torchs_float8_e4m3fn() -> None:
    y = np.concatenate([np.linspace(-448, 448, 20001), np.float32(F.FP8_VALUES[:0x7F]) * 1.0001, [2.0**-9, 2.0**-10 * 3]]).astype(np.float32)
    ours = F.fp8_encode(y)
    theirs = torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(F.FP8_VALUES[ours], torch.from_numpy(y).to(torch.float8_e4m3fn).float().numpy())


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    fmt = get_format("int4")
    x = np.zeros((1, 1, 64), np.float32)
    x[0, 0, 0], x[0, 0, 1] = 7.0, -7.0  # absmax 7 -> scale 1: codes 15 and 1
    codes, scale = quantise(x, fmt)
    assert codes.shape == (1, 1, 32) and scale.shape == (1, 1, 2) and scale.dtype == np.float16
    assert codes[0, 0, 0] == 15 | (1 << 4) and codes[0, 0, 1] == 8 | (8 << 4)


def test_error_stats_see_outlier_damage_that_row_norms_hide() -> None:
    """int8 per row: with 100x channels, the row error stays small while the small channels lose their bits."""
    fmt = get_format("int8")
    x = states(outliers=True)
    stats = ErrorStats.empty(x.shape[1])
    stats.add(x, dequantise(*quantise(x, fmt), fmt))
    stats.close_unit()
    assert max(stats.rel_rms) < 0.05 and min(stats.channel_rel_rms) > 5 * max(stats.rel_rms)


def test_error_sums_are_their_definitions_and_leave_the_inputs_alone() -> None:
    """The build's error sample (what `inspect` shows and the ceilings check) is these formulas' sums, per layer and
    per channel, and measuring it changes neither input (float32 from the build, float64 from a caller)."""
    x = states(seed=3).astype(np.float64)
    approx = (x + np.random.default_rng(4).standard_normal(x.shape) * 0.05).astype(np.float32)
    kept_x, kept_approx = x.copy(), approx.copy()
    stats = ErrorStats.empty(x.shape[1])
    stats.add(x, approx)
    diff2, ref2 = (x - approx.astype(np.float64)) ** 2, x**2
    np.testing.assert_allclose(stats.err2, diff2.sum((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.ref2, ref2.sum((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.worst_row, np.sqrt(diff2.sum(-1) / ref2.sum(-1)).max(0), rtol=1e-12)
    np.testing.assert_allclose(stats.close_unit(), np.sqrt((diff2.sum(0) / ref2.sum(0)).mean(-1)), rtol=1e-12)
    assert np.array_equal(x, kept_x) and np.array_equal(approx, kept_approx)


# --------------------------------------------------------------------------------------------------
# Caches in the compact formats


@pytest.fixture(scope="module")
def caches(tiny_t5: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    glue = write_glue(root / "glue", n_train=80, n_dev=30, seed=5)
    return {fmt: build_quietly(tiny_t5, "sst2", glue, root / fmt, float_dtype=fmt, batch_size=8) for fmt in ("bfloat16", *COMPACT_DTYPES)} | {"glue": glue}


@pytest.mark.parametrize("name", COMPACT_DTYPES)
def test_compact_cache_equals_the_bfloat16_one_within_the_bound(caches: dict[str, Path], name: str) -> None:
    """Both caches hold the same forward pass (test_build checks bfloat16 against a fresh one)."""
    fmt = get_format(name)
    ours, reference = read_cache.open_cache(caches[name]), read_cache.open_cache(caches["bfloat16"])
    assert ours.attrs["format_version"] == FORMAT_VERSION and ours.geometry.float_dtype == name
    bf16 = get_format("bfloat16")
    for split in ("train", "test"):
        for i in (0, len(ours[split]) - 1):
            a, b = ours[split][i], reference[split][i]
            assert a.encoder_hidden.dtype == np.float32
            for got, want in ((a.encoder_hidden, b.encoder_hidden), (a.decoder_hidden[None], b.decoder_hidden[None])):
                rel = np.sqrt(((got - want) ** 2).sum(-1) / (want**2).sum(-1))
                assert rel.max() <= fmt.ceiling_row + bf16.ceiling_row
            np.testing.assert_array_equal(a.cross_attention, b.cross_attention)  # cross-attention stays bfloat16
    recorded = ours.split_status("train")["reconstruction_error"]
    assert set(recorded) == {"encoder_hidden", "decoder_hidden"}
    assert 0 < max(recorded["encoder_hidden"]["rel_rms"]) <= fmt.ceiling_rms
    assert len(recorded["encoder_hidden"]["rel_rms"]) == ours.geometry.n_encoder_layers


def test_compact_caches_are_smaller(caches: dict[str, Path]) -> None:
    size = {name: read_cache.open_cache(caches[name]).disk_bytes("train") for name in ("bfloat16", *COMPACT_DTYPES)}
    assert size["int4"] < size["int8"] < size["bfloat16"] and size["fp8"] < size["bfloat16"]


@pytest.mark.parametrize("name", COMPACT_DTYPES)
def test_plain_zarr_read_following_the_docs(caches: dict[str, Path], name: str) -> None:
    """The recipe in docs/cache-format.md, with zarr and numpy only, gives open_cache's floats."""
    import zarr

    root = zarr.open_group(str(caches[name]), mode="r")
    train = root["train"]
    offsets = train["offsets"][:]
    i = 3
    tokens = slice(offsets[i], offsets[i + 1])
    codes, scale = train["encoder_hidden"][tokens], train["encoder_hidden_scale"][tokens]
    fmt = train["encoder_hidden"].attrs["float_dtype"]
    if fmt == "int8":
        values = codes.astype(np.float32) * scale[..., None]
    elif fmt == "fp8":
        c = codes.astype(np.int32)
        exp, man = (c >> 3) & 15, (c & 7).astype(np.float32)
        mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0)).astype(np.float32)
        values = np.where(c & 0x80, -mag, mag) * scale[..., None]
    else:  # int4: low nibble first, code - 8, one float16 scale per values_per_scale values
        g = train["encoder_hidden"].attrs["values_per_scale"]
        q = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1).astype(np.float32) - 8
        values = (q.reshape(*q.shape[:-1], -1, g) * scale.astype(np.float32)[..., None]).reshape(q.shape)
    np.testing.assert_array_equal(values, read_cache.open_cache(caches[name])["train"][i].encoder_hidden)


def array_codecs(path: Path, array: str) -> list[str]:
    meta = json.loads((path / "train" / array / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"]]


def test_codes_are_stored_raw_with_a_checksum_and_zstd_on_request(caches: dict[str, Path], tiny_t5: Path, tmp_path: Path) -> None:
    """--codec auto: 8-/4-bit codes and their scales raw + crc32c, 16-bit floats blosc-zstd; --codec zstd: smaller, same values."""
    for name in COMPACT_DTYPES:
        assert array_codecs(caches[name], "encoder_hidden") == ["bytes", "crc32c"]
        assert array_codecs(caches[name], "encoder_hidden_scale") == ["bytes", "crc32c"]
        assert read_cache.open_cache(caches[name]).geometry.codec == "none"
    assert array_codecs(caches["bfloat16"], "encoder_hidden") == ["bytes", "blosc", "crc32c"]
    zstd = build_quietly(tiny_t5, "sst2", caches["glue"], tmp_path / "zstd", float_dtype="int8", codec="zstd", batch_size=8)
    assert array_codecs(zstd, "encoder_hidden") == ["bytes", "blosc", "crc32c"]
    raw, packed = read_cache.open_cache(caches["int8"]), read_cache.open_cache(zstd)
    assert packed.attrs["build"]["codec"] == "zstd" and packed.disk_bytes("train") < raw.disk_bytes("train")
    np.testing.assert_array_equal(packed["train"][4].encoder_hidden, raw["train"][4].encoder_hidden)


def test_a_raw_bfloat16_cache_streams_directly_with_the_same_batches(caches: dict[str, Path], tmp_path: Path) -> None:
    """`--codec none` on a 16-bit cache (docs/storage.md: what to stream): its arrays take the direct engine, and
    its streams, landed on the host or staged to a device, give the zstd cache's batches."""
    from read_cache.store.direct import direct_arrays
    from read_cache.store.transcode import transcode

    raw = transcode(caches["bfloat16"], tmp_path / "raw", "bfloat16", "none")
    assert array_codecs(raw, "encoder_hidden") == ["bytes", "crc32c"]
    split, packed = read_cache.open_cache(raw)["train"], read_cache.open_cache(caches["bfloat16"])["train"]
    assert "encoder_hidden" in direct_arrays(split, ("encoder_hidden",)) and not direct_arrays(packed, ("encoder_hidden",))
    reference = _batches(SplitReader(packed, batch_size=16, mode="stream"))
    for reader in (SplitReader(split, batch_size=16, mode="stream"), SplitReader(split, batch_size=16, mode="stream", coded=True, stage=True)):
        theirs = [batch_to(b, torch.device("cpu")) for b in reader.epoch(1)]
        assert len(theirs) == len(reference)
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(reference, theirs))


def test_version_2_caches_still_open_and_resume(caches: dict[str, Path], tiny_t5: Path, tmp_path: Path) -> None:
    """A format-2 int8 cache (blosc-zstd codes, no codec recorded) reads the same values, and `build` resumes it."""
    old = build_quietly(tiny_t5, "sst2", caches["glue"], tmp_path / "v2", float_dtype="int8", codec="zstd", batch_size=8)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 2
    meta["attributes"]["geometry"].pop("codec")
    meta["attributes"]["build"].pop("codec")
    (old / "zarr.json").write_text(json.dumps(meta))
    ours, reference = read_cache.open_cache(old), read_cache.open_cache(caches["int8"])
    assert ours.attrs["format_version"] == 2
    np.testing.assert_array_equal(ours["train"][2].encoder_hidden, reference["train"][2].encoder_hidden)
    chunks = lambda: {k: v for k, v in cache_files(old).items() if not k.endswith("zarr.json")}  # noqa: E731
    before = chunks()
    build_quietly(tiny_t5, "sst2", caches["glue"], old, float_dtype="int8", batch_size=8)  # --codec auto: the cache's own
    assert chunks() == before


def test_version_1_caches_still_open(caches: dict[str, Path], tmp_path: Path) -> None:
    """A bfloat16 cache written by format 1 (same arrays, version 1, no error record) reads unchanged."""
    old = tmp_path / "v1"
    shutil.copytree(caches["bfloat16"], old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    for status in meta["attributes"]["splits"].values():
        status.pop("reconstruction_error", None)
    (old / "zarr.json").write_text(json.dumps(meta))
    ours, reference = read_cache.open_cache(old), read_cache.open_cache(caches["bfloat16"])
    assert ours.attrs["format_version"] == 1
    np.testing.assert_array_equal(ours["train"][2].encoder_hidden, reference["train"][2].encoder_hidden)
    batch = next(iter(SplitReader(ours["train"], batch_size=8)))
    assert batch["enc"].dtype == torch.float32


def test_corrupt_scale_chunk_is_an_error_naming_the_array(caches: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(caches["int8"], copy)
    flip_byte_in_a_chunk(copy, "train/encoder_hidden_scale", 0x20)
    with pytest.raises(CacheCorruptError, match="train/encoder_hidden_scale"):
        read_cache.open_cache(copy)["train"].read_block(0, len(read_cache.open_cache(copy)["train"]))
    code, _, output = run_cli("train", "--cache", copy, "--epochs", "1", "--reader", "ram", "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "encoder_hidden_scale" in one_error(output)


def test_a_format_beyond_its_ceiling_stops_the_build(tiny_t5: Path, caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = dataclasses.replace(F.FORMATS["int8"], ceiling_rms=1e-6)
    monkeypatch.setitem(F.FORMATS, "int8", strict)
    with pytest.raises(ReadCacheError, match="above its ceiling"):
        build_quietly(tiny_t5, "sst2", caches["glue"], tmp_path / "c", float_dtype="int8", limit=20)
    with pytest.raises(ReadCacheError, match="incomplete"):
        read_cache.open_cache(tmp_path / "c").require_complete()


# --------------------------------------------------------------------------------------------------
# Crash safety and bad inputs


CRASHING_BUILD = """
import os, signal, sys
from pathlib import Path
from read_cache import store
from read_cache.config import BuildConfig
from read_cache.build import build_cache
original, calls = store.CacheWriter.write_unit, [0]
def write_unit(self, *args):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
store.CacheWriter.write_unit = write_unit
build_cache(BuildConfig(model=sys.argv[1], task="sst2", data_dir=Path(sys.argv[2]), out=Path(sys.argv[3]),
                        chunk_mb=float(sys.argv[4]), batch_size=8, float_dtype="int4", dtype="fp32", progress=False))
"""


def test_kill_9_then_resume_an_int4_build_is_byte_identical(tiny_t5: Path, caches: dict[str, Path], tmp_path: Path) -> None:
    glue = caches["glue"]
    reference = build_quietly(tiny_t5, "sst2", glue, tmp_path / "reference", float_dtype="int4", batch_size=8, chunk_mb=SMALL_CHUNKS)
    out = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", CRASHING_BUILD, str(tiny_t5), str(glue), str(out), str(SMALL_CHUNKS)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    build_quietly(tiny_t5, "sst2", glue, out, float_dtype="int4", batch_size=8, chunk_mb=SMALL_CHUNKS)
    ours, theirs = read_cache.open_cache(out), read_cache.open_cache(reference)
    for split in ("train", "validation", "test"):
        for name in theirs[split].array_names():
            assert np.array_equal(ours[split].array(name)[...], theirs[split].array(name)[...]), (split, name)


def test_bad_store_inputs_are_one_line_errors(tiny_t5: Path, caches: dict[str, Path]) -> None:
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--store-dtype", "int3", "--no-progress")
    assert code == 2 and "int3" in one_error(output) and "int4" in one_error(output)
    before = cache_files(caches["bfloat16"])
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", caches["glue"], "--out", caches["bfloat16"], "--batch-size", "8", "--store-dtype", "int8", "--no-progress")
    assert code == 2 and "--store-dtype bfloat16" in one_error(output)
    assert cache_files(caches["bfloat16"]) == before
    code, _, output = run_cli("train", "--cache", caches["int8"], "--reader-workers", "0", "--no-progress")
    assert code == 2 and "--reader-workers" in one_error(output)


def test_split_status_updates_from_two_threads_are_never_lost(tmp_path: Path) -> None:
    # The build marks a split complete on the main thread while the writer thread records the next split's
    # progress: both rewrite the root's one `splits` attribute. Unserialised, one thread's read-modify-write
    # overwrote the other's now and then (a finished build once left train "incomplete" on CI).
    import threading

    from read_cache.store.layout import Geometry
    from read_cache.store.writer import CacheWriter

    writer = CacheWriter.create(tmp_path / "cache", Geometry(1, 0, 8, 1, None, "bfloat16", False), {}, None)
    rounds, start, lost = 300, threading.Barrier(2), []

    def record(split: str) -> None:
        start.wait()
        for i in range(rounds):
            if writer.split_status(split).get("examples_written", 0) != i:  # the other thread wrote over it
                lost.append((split, i))
            writer.update_split_status(split, {"examples_written": i + 1})

    threads = [threading.Thread(target=record, args=(split,)) for split in ("train", "validation")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not lost
    on_disk = json.loads((tmp_path / "cache" / "zarr.json").read_text())["attributes"]["splits"]
    assert {s: v["examples_written"] for s, v in on_disk.items()} == {"train": rounds, "validation": rounds}


# --------------------------------------------------------------------------------------------------
# The reader


def _batches(reader: SplitReader, epoch: int = 1) -> list[dict]:
    return [dict(b) for b in reader.epoch(epoch)]


@pytest.mark.parametrize("name", ["bfloat16", "int4"])
def test_workers_stream_and_ram_give_the_same_batches(caches: dict[str, Path], name: str) -> None:
    split = read_cache.open_cache(caches[name])["train"]
    kw = dict(batch_size=7, shuffle=True, seed=3, block_tokens=64, shuffle_blocks=2)
    one = _batches(SplitReader(split, mode="stream", workers=1, **kw))
    for other in (SplitReader(split, mode="stream", workers=3, **kw), SplitReader(split, mode="ram", workers=2, **kw)):
        theirs = _batches(other)
        assert len(theirs) == len(one)
        for a, b in zip(one, theirs):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one[0]["enc"].dtype == torch.float32
    # Stopping early leaves no thread behind and a new epoch starts cleanly.
    reader = SplitReader(split, mode="stream", workers=3, **kw)
    next(iter(reader.epoch(0)))
    assert len(_batches(reader, 0)) == len(one)


@pytest.mark.parametrize("name", ["bfloat16", "fp8", "int8", "int4"])
def test_device_decoding_equals_host_decoding(caches: dict[str, Path], name: str) -> None:
    """The CUDA paths (codes shipped, gathered or not, dequantised in torch by batch_to), run on the CPU."""
    split = read_cache.open_cache(caches[name])["train"]
    host = list(SplitReader(split, batch_size=16).epoch(0))
    for mode, form, stage in (("stream", WindowBatch, False), ("stream", WindowBatch, True), ("ram", CodedBatch, False)):
        device = SplitReader(split, batch_size=16, mode=mode, coded=True, stage=stage)  # staged: every format, 16-bit via zarr
        for a, coded in zip(host, device.epoch(0), strict=True):
            assert isinstance(coded, form) and (form is WindowBatch or coded["enc"].dtype != torch.float32)
            b = batch_to(coded, torch.device("cpu"))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (mode, key)


def test_train_from_a_compact_cache_with_workers(caches: dict[str, Path], tmp_path: Path) -> None:
    code, _, output = run_cli("train", "--cache", caches["int8"], "--epochs", "1", "--dim", "8", "--reader", "stream", "--reader-workers", "2", "--out", tmp_path / "run", "--no-progress")
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 1


# --------------------------------------------------------------------------------------------------
# Size before cost


def test_dry_run_tokenises_without_weights(tiny_t5: Path, caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run must not load weights")

    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "from_pretrained", no_weights)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_weights)
    out = tmp_path / "never"
    code, stdout, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", caches["glue"], "--out", out, "--dry-run", "--store-dtype", "int8")
    assert code == 0, output
    reference = read_cache.open_cache(caches["bfloat16"])
    for split in ("train", "validation", "test"):
        line = next(line for line in stdout.splitlines() if line.startswith(split))
        assert f"{len(reference[split]):,}" in line and f"{reference[split].n_tokens:,}" in line
    for fmt in STORE_DTYPES:
        assert any(line.startswith(fmt) for line in stdout.splitlines()), fmt
    assert "<- this build" in next(line for line in stdout.splitlines() if line.startswith("int8"))
    assert not out.exists()


def test_projection_is_close_to_what_a_build_writes(caches: dict[str, Path]) -> None:
    """The projected bytes use measured bytes per value; on tiny random states they land within 2x."""
    for name in ("bfloat16", "int8", "int4"):
        cache = read_cache.open_cache(caches[name])
        split = cache["train"]
        projected = cache.geometry.projected_disk_bytes(split.n_tokens, len(split))
        assert 0.5 < cache.disk_bytes("train") / projected < 2.0, name
