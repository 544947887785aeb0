"""Stage one: the cache equals a fresh forward pass, survives crashes, and refuses bad input clearly."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, write_glue
from typer.testing import CliRunner

import read_cache
from read_cache import store
from read_cache.build import build_cache
from read_cache.cli import app
from read_cache.config import BuildConfig
from read_cache.errors import CacheCorruptError, ReadCacheError

SMALL_CHUNKS = 0.003  # MiB: 16-token chunks, so a few hundred examples make many units


def config(model: Path, glue: Path, out: Path, **kw) -> BuildConfig:
    kw.setdefault("dtype", "fp32")  # the same math as the fp32 reference forward passes, whatever this CPU's default
    kw.setdefault("float_dtype", "bfloat16")  # this file's tests compare within bfloat16's rounding; test_storage covers the others
    return BuildConfig(model=str(model), task=kw.pop("task", "sst2"), data_dir=glue, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def built(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "cache"
    build_cache(config(tiny_t5, glue_dir, out, batch_size=8))
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, for byte-for-byte comparisons."""
    cache = read_cache.open_cache(path)
    return {f"{s}/{name}": cache[s].array(name)[...] for s in cache.splits for name in cache[s].array_names()}


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            digest.update(p.name.encode() + p.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# What is cached


def test_hf_output_layout_matches_design(tiny_t5: Path) -> None:
    """DESIGN's facts about transformers' outputs, checked rather than trusted."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5, attn_implementation="eager").eval()
    ids = AutoTokenizer.from_pretrained(tiny_t5)(["the film was good"], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long), output_hidden_states=True, output_attentions=True)
    cfg = model.config
    assert len(out.encoder_hidden_states) == cfg.num_layers + 1
    assert len(out.decoder_hidden_states) == cfg.num_decoder_layers + 1
    assert len(out.cross_attentions) == cfg.num_decoder_layers
    assert out.cross_attentions[0].shape == (1, cfg.num_heads, 1, ids.shape[1])
    # The last encoder entry is after the final layer norm: it is what cross-attention reads.
    assert torch.allclose(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)


def test_cache_equals_fresh_forward_pass(built: Path, tiny_t5: Path, glue_dir: Path) -> None:
    """Layer by layer and token by token, one example at a time, within bfloat16's rounding."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from read_cache.tasks.data import load_glue
    from read_cache.tasks.specs import get_task

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    task = get_task("sst2")
    data = load_glue(task, glue_dir)
    cache = read_cache.open_cache(built)
    for split in ("train", "test"):
        for i in (0, 5, len(data[split]) - 1):
            ids = tokenizer(task.t5_input(data[split].texts[i]), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model(input_ids=ids, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long), output_hidden_states=True, output_attentions=True)
            ex = cache[split][i]
            assert ex.input_ids.tolist() == ids[0].tolist()
            assert ex.label == data[split].labels[i] and ex.index == data[split].index[i]
            for layer in range(model.config.num_layers):
                fresh = out.encoder_hidden_states[layer + 1][0].numpy()
                np.testing.assert_allclose(ex.encoder_hidden[:, layer], fresh, rtol=2**-8, atol=1e-6)
            for layer in range(model.config.num_decoder_layers):
                np.testing.assert_allclose(ex.decoder_hidden[layer], out.decoder_hidden_states[layer + 1][0, 0].numpy(), rtol=2**-8, atol=1e-6)
                heads_mean = out.cross_attentions[layer][0, :, 0, :].mean(0).numpy()
                np.testing.assert_allclose(ex.cross_attention[:, layer], heads_mean, rtol=2**-8, atol=1e-6)


def test_ragged_offsets_round_trip(built: Path, tiny_t5: Path, glue_dir: Path) -> None:
    from transformers import AutoTokenizer

    from read_cache.tasks.data import load_glue
    from read_cache.tasks.specs import get_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    task = get_task("sst2")
    texts = load_glue(task, glue_dir)["train"].texts
    split = read_cache.open_cache(built)["train"]
    lengths = [len(tokenizer(task.t5_input(t))["input_ids"]) for t in texts]
    assert split.offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    block = split.read_block(3, 9)
    assert block.encoder_hidden.shape[0] == sum(lengths[3:9]) and block.offsets.tolist() == [0, *np.cumsum(lengths[3:9]).tolist()]
    ids = split.array("input_ids")[...]
    for i in (0, 7, len(split) - 1):
        assert ids[split.offsets[i] : split.offsets[i + 1]].tolist() == tokenizer(task.t5_input(texts[i]))["input_ids"]


def test_heads_mode_and_float16(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    build_cache(config(tiny_t5, glue_dir, tmp_path / "c", cross_attention="heads", float_dtype="float16", limit=10))
    cache = read_cache.open_cache(tmp_path / "c")
    ex = cache["validation"][0]
    assert ex.cross_attention.shape == (len(ex.input_ids), 2, 4)
    np.testing.assert_allclose(ex.cross_attention.sum(0), 1.0, atol=2e-3)  # each head's weights sum to one over tokens
    assert cache["validation"].array("encoder_hidden").dtype == np.float16


def test_the_channel_fit_computes_train_s_first_examples_for_the_first_unit(tiny_t5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compact build fits its channel scales on train's first examples; the first unit takes those states as
    they are instead of computing them again, and the cache is bit for bit the one that recomputes them."""
    import read_cache.build as build_module
    from read_cache.build import units
    from read_cache.store.formats import CHANNEL_SAMPLE_EXAMPLES

    glue = write_glue(tmp_path / "glue", n_train=400)
    forwarded: list[int] = []
    forward_batch, fit = units.forward_batch, build_module.fit_channel_scales

    def counted(backbone, ids, batch, *args):  # noqa: ANN001, ANN202
        forwarded.append(len(batch))
        return forward_batch(backbone, ids, batch, *args)

    monkeypatch.setattr(units, "forward_batch", counted)
    build_cache(config(tiny_t5, glue, tmp_path / "once", float_dtype="int8", batch_size=8))
    once = sum(forwarded)
    forwarded.clear()
    monkeypatch.setattr(build_module, "fit_channel_scales", lambda backbone, tokenized, cfg, ahead: fit(backbone, tokenized, cfg, {}))
    build_cache(config(tiny_t5, glue, tmp_path / "twice", float_dtype="int8", batch_size=8))
    assert len(read_cache.open_cache(tmp_path / "once")["train"]) > CHANNEL_SAMPLE_EXAMPLES
    assert sum(forwarded) - once == CHANNEL_SAMPLE_EXAMPLES
    once_arrays, twice_arrays = arrays(tmp_path / "once"), arrays(tmp_path / "twice")
    assert once_arrays.keys() == twice_arrays.keys()
    for name, values in once_arrays.items():
        assert np.array_equal(values, twice_arrays[name]), name


def test_only_the_unit_the_channel_fit_comes_from_batches_its_sample_apart(tiny_t5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample batched apart is padded to its longest example: train's first unit of a compact cache does it (its
    batches must be the channel fit's), every other unit, and every unit of a 16-bit cache, batches by length alone."""
    from read_cache.build import units

    glue = write_glue(tmp_path / "glue", n_train=400)
    unit_batches, apart = units.unit_batches, []
    monkeypatch.setattr(units, "unit_batches", lambda lengths, fitted, size: apart.append(fitted) or unit_batches(lengths, fitted, size))
    for dtype, batched_apart in (("int8", 2), ("bfloat16", 0)):  # int8: the fit's sample, then train's first unit
        apart.clear()
        build_cache(config(tiny_t5, glue, tmp_path / dtype, float_dtype=dtype, batch_size=8))
        cache = read_cache.open_cache(tmp_path / dtype)
        n_units = sum(cache[split].array("units_done").shape[0] for split in ("train", "validation", "test"))
        assert len(apart) == n_units + (dtype == "int8")  # every unit, and the fit
        assert sum(apart) == batched_apart, dtype


def test_the_channel_fit_sample_is_batched_finely_so_it_pads_little() -> None:
    """The sample is the unit's first examples, of every length: cut into batches of the build's size, each would
    be padded to its longest example; a quarter of that size pads it under half as much."""
    from read_cache.backbone.inputs import length_batches
    from read_cache.build.units import unit_batches
    from read_cache.store.formats import CHANNEL_SAMPLE_EXAMPLES as head

    lengths = np.random.default_rng(0).integers(4, 64, size=1000)
    batches = unit_batches(lengths, True, 64)
    sample = [b for b in batches if b.max() < head]
    assert sorted(np.concatenate(sample).tolist()) == list(range(head)) and max(len(b) for b in sample) == 16
    assert all(b.min() >= head for b in batches if b.max() >= head)  # the rest of the unit batches by length alone

    def excess(batches: list[np.ndarray]) -> int:
        return sum(len(b) * int(lengths[b].max()) - int(lengths[b].sum()) for b in batches)

    assert excess(sample) < excess(length_batches(lengths[:head], 64)) / 2


def test_units_cover_every_chunk_exactly_once() -> None:
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, size=1000))])
    units = store.plan_units(offsets, unit_examples=64, token_chunk=16)
    assert units[0].tokens[0] == 0 and units[-1].tokens[1] == offsets[-1]
    for a, b in zip(units, units[1:]):
        assert a.tokens[1] == b.tokens[0] and b.tokens[0] % 16 == 0 and a.examples[1] == b.examples[0]
        c0, c1 = b.compute
        assert offsets[c0] <= b.tokens[0] and offsets[c1] >= b.tokens[1]  # computes every token it writes


def test_bfloat16_encoding_matches_torch() -> None:
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 300
    ours = store.encode_floats(values, "bfloat16")
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(store.decode_floats(ours, "bfloat16"), values, rtol=2**-8)


def test_readable_with_plain_zarr(built: Path) -> None:
    """docs/cache-format.md's recipe works without this package's reader."""
    import zarr

    root = zarr.open_group(str(built), mode="r")
    assert root.attrs["format_version"] == store.FORMAT_VERSION and root.attrs["splits"]["train"]["complete"]
    train = root["train"]
    offsets = train["offsets"][...]
    i = 4
    bits = train["encoder_hidden"][offsets[i] : offsets[i + 1]]
    states = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(states, read_cache.open_cache(built)["train"][i].encoder_hidden)


# --------------------------------------------------------------------------------------------------
# Crash safety


@pytest.fixture(scope="module")
def crash_setup(tiny_t5: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    glue = write_glue(root / "glue", n_train=300, n_dev=60, seed=3)
    reference = root / "reference"
    build_cache(config(tiny_t5, glue, reference, chunk_mb=SMALL_CHUNKS, batch_size=8))
    assert read_cache.open_cache(reference)["train"].attrs["n_units"] >= 4
    return tiny_t5, glue, reference


CRASHING_BUILD = """
import os, signal, sys
from pathlib import Path
from read_cache import store
from read_cache.config import BuildConfig
from read_cache.build import build_cache

crash_at, mode = int(sys.argv[1]), sys.argv[2]
original = store.CacheWriter.write_unit
calls = 0

def write_unit(self, split, unit, tokens, examples):
    global calls
    calls += 1
    if calls == crash_at:
        if mode == "torn":  # half the unit's arrays reach disk, then the power goes
            self.group[split]["encoder_hidden"][unit.tokens[0]:unit.tokens[1]] = tokens["encoder_hidden"]
            Path(self.path, split, "encoder_hidden", "c", "junk.partial").write_bytes(b"half a chunk")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, split, unit, tokens, examples)

store.CacheWriter.write_unit = write_unit
build_cache(BuildConfig(model=sys.argv[3], task="sst2", data_dir=Path(sys.argv[4]), out=Path(sys.argv[5]),
                        chunk_mb=float(sys.argv[6]), batch_size=8, dtype="fp32", float_dtype="bfloat16", progress=False))
"""


@pytest.mark.parametrize(("crash_at", "mode"), [(1, "clean"), (3, "torn"), (6, "clean"), (9, "torn")])
def test_kill_9_then_resume_gives_identical_arrays(crash_setup, tmp_path: Path, crash_at: int, mode: str) -> None:
    model, glue, reference = crash_setup
    out = tmp_path / "cache"
    args = [str(crash_at), mode, str(model), str(glue), str(out), str(SMALL_CHUNKS)]
    proc = subprocess.run([sys.executable, "-c", CRASHING_BUILD, *args], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with pytest.raises(ReadCacheError, match="incomplete"):
        read_cache.open_cache(out).require_complete()
    build_cache(config(model, glue, out, chunk_mb=SMALL_CHUNKS, batch_size=8))  # the same command again
    ours, theirs = arrays(out), arrays(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert np.array_equal(ours[name], theirs[name]), name
    assert not list(out.rglob("*.partial"))
    read_cache.open_cache(out).require_complete()


def test_kill_9_from_outside_at_a_random_moment(crash_setup, tmp_path: Path) -> None:
    """A real SIGKILL from another process, wherever the build happens to be."""
    model, glue, reference = crash_setup
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "read_cache", "build", "--model", str(model), "--task", "sst2", "--data-dir", str(glue),
           "--out", str(out), "--chunk-mb", str(SMALL_CHUNKS), "--batch-size", "8", "--dtype", "fp32", "--store-dtype", "bfloat16", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = out / "train" / "units_done" / "c"
    deadline = time.time() + HANG_GUARD_S  # a hang guard: under load the first durable unit may take long to come
    while time.time() < deadline and not (flags.is_dir() and any(flags.iterdir())) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True, timeout=HANG_GUARD_S)
    ours, theirs = arrays(out), arrays(reference)
    for name in theirs:
        assert np.array_equal(ours[name], theirs[name]), name


def test_disk_full_midway_resumes_once_space_is_freed(crash_setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, glue, reference = crash_setup
    out = tmp_path / "cache"
    original = store.CacheWriter.write_unit
    calls = []

    def full_disk(self, split, unit, tokens, examples):
        calls.append(unit)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, split, unit, tokens, examples)

    monkeypatch.setattr(store.CacheWriter, "write_unit", full_disk)
    with pytest.raises(ReadCacheError, match="disk filled up"):
        build_cache(config(model, glue, out, chunk_mb=SMALL_CHUNKS, batch_size=8))
    monkeypatch.setattr(store.CacheWriter, "write_unit", original)
    build_cache(config(model, glue, out, chunk_mb=SMALL_CHUNKS, batch_size=8))
    ours, theirs = arrays(out), arrays(reference)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_second_build_refused_while_one_runs(built: Path, tiny_t5: Path, glue_dir: Path) -> None:
    before = tree_digest(built)
    with store.BuildLock(built):
        with pytest.raises(ReadCacheError, match="another build is writing"):
            build_cache(config(tiny_t5, glue_dir, built, batch_size=8))
    assert tree_digest(built) == before


def test_two_builds_of_a_new_cache_cannot_both_write(tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race a new user hit: the first build creates the cache while holding the lock; the second must be refused."""
    import threading

    from read_cache import build as build_module

    out = tmp_path / "fresh"
    created, release = threading.Event(), threading.Event()
    original = build_module.build_split

    def paused_build_split(*args, **kwargs):
        created.set()  # the cache exists now; hold the first build here until the second has tried
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "build_split", paused_build_split)
    errors: list[BaseException] = []
    first = threading.Thread(target=lambda: _capture(errors, lambda: build_cache(config(tiny_t5, glue_dir, out, batch_size=8))))
    first.start()
    try:
        assert created.wait(60), "the first build never reached its splits"
        monkeypatch.setattr(build_module, "build_split", original)
        with pytest.raises(ReadCacheError, match="another build is writing"):
            build_cache(config(tiny_t5, glue_dir, out, batch_size=8))
    finally:
        release.set()
        first.join()
    assert not errors, errors
    assert read_cache.open_cache(out)["train"].complete


def _capture(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_rebuilding_a_complete_cache_changes_nothing(built: Path, tiny_t5: Path, glue_dir: Path) -> None:
    before = tree_digest(built)
    report = build_cache(config(tiny_t5, glue_dir, built, batch_size=8))
    assert all(s.units_written == 0 for s in report.splits)
    assert tree_digest(built) == before


def test_flipped_byte_is_an_error_naming_the_array(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    chunk = copy / "train" / "encoder_hidden" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="train/encoder_hidden"):
        read_cache.open_cache(copy)["train"][0]
    chunk.write_bytes(bytes(data[:10]))  # truncated
    with pytest.raises(CacheCorruptError, match="train/encoder_hidden"):
        read_cache.open_cache(copy)["train"].read_block(0, 5)


def test_disk_estimate_refuses_unless_forced(tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import read_cache.build as build_module

    monkeypatch.setattr(build_module, "free_bytes", lambda path: 1000)
    with pytest.raises(ReadCacheError, match="free"):
        build_cache(config(tiny_t5, glue_dir, tmp_path / "c", limit=5))
    build_cache(config(tiny_t5, glue_dir, tmp_path / "c", limit=5, force=True))


def test_default_location_and_last_cache(tiny_t5: Path, glue_dir: Path) -> None:
    from read_cache import paths

    report = build_cache(BuildConfig(model=str(tiny_t5), task="sst2", data_dir=glue_dir, limit=5, progress=False))
    assert report.path == paths.default_cache_path(str(tiny_t5), "sst2")
    assert paths.last_cache() == report.path.resolve()


# --------------------------------------------------------------------------------------------------
# The command line


runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    """Exit code and what the user sees (stdout and stderr together)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_build_then_inspect_json(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    code, output = cli("build", "--model", str(tiny_t5), "--task", "stsb", "--data-dir", str(glue_dir), "--out", str(tmp_path / "c"), "--no-progress")
    assert code == 0, output
    result = runner.invoke(app, ["inspect", "--json"])  # no path: the last cache built
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["task"] == "stsb" and info["splits"]["train"]["complete"]
    assert info["splits"]["train"]["shapes"]["encoder_hidden"] == [info["splits"]["train"]["tokens"], 3, 32]
    assert info["splits"]["train"]["disk_bytes"] > 0 and info["float_dtype"] == "int8"  # the default


def test_python_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "read_cache", "--help"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and "build" in proc.stdout


def _bad_glue(root: Path, case: str) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    good = "sentence\tlabel\nthe film was good\t1\nthe plot was dull\t0\n"
    files = {
        "missing_split": {"train.tsv": good},
        "missing_column": {"train.tsv": good, "dev.tsv": "text\tlabel\nthe film\t1\n"},
        "empty_split": {"train.tsv": good, "dev.tsv": "sentence\tlabel\n"},
        "label_out_of_range": {"train.tsv": good + "a good film\t7\n", "dev.tsv": good},
    }[case]
    for name, text in files.items():
        (folder / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_task", "unknown task"),
        ("unreachable_model", "hub cannot be reached"),
        ("not_a_model_folder", "config.json"),
        ("missing_split", "dev"),
        ("missing_column", "sentence"),
        ("empty_split", "empty"),
        ("label_out_of_range", "7"),
        ("limit_zero", "--limit"),
        ("out_is_a_file", "is a file"),
        ("other_task_at_out", "already holds a cache"),
        ("newer_format", "newer"),
    ],
)
def test_bad_input_gives_one_line_error(case: str, expected: str, built: Path, tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, model, data, task, extra = tmp_path / "out", str(tiny_t5), glue_dir, "sst2", []
    guarded = built  # an existing cache that must come out of every failure untouched
    if case == "unknown_task":
        task = "squad"
    elif case == "unreachable_model":
        model = "no-such-org/no-such-model"
    elif case == "not_a_model_folder":
        (tmp_path / "empty-folder").mkdir()
        model = str(tmp_path / "empty-folder")
    elif case in ("missing_split", "missing_column", "empty_split", "label_out_of_range"):
        data = _bad_glue(tmp_path / "bad-glue", case)
    elif case == "limit_zero":
        extra = ["--limit", "0"]
    elif case == "out_is_a_file":
        out.write_text("not a folder")
    elif case == "other_task_at_out":
        out, task = built, "cola"
    elif case == "newer_format":
        out = tmp_path / "newer"
        shutil.copytree(built, out)
        meta = json.loads((out / "zarr.json").read_text())
        meta["attributes"]["format_version"] = store.FORMAT_VERSION + 1
        (out / "zarr.json").write_text(json.dumps(meta))
        guarded = out
    before = tree_digest(guarded)
    code, output = cli("build", "--model", model, "--task", task, "--data-dir", str(data), "--out", str(out), "--no-progress", *extra)
    assert code == 2, output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], output
    assert tree_digest(guarded) == before
    if case == "newer_format":
        code, output = cli("inspect", str(out))
        assert code == 2 and "newer" in output


def test_long_inputs_are_truncated_and_counted(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    report = build_cache(config(tiny_t5, glue_dir, tmp_path / "c", max_length=8, limit=20))
    cache = read_cache.open_cache(tmp_path / "c")
    for split in report.splits:
        lengths = np.diff(cache[split.split].offsets)
        assert lengths.max() <= 8
        assert split.truncated == cache.split_status(split.split)["truncated"] > 0
    assert cache["train"][0].input_ids[-1] == 1  # truncation keeps the closing </s>


def test_a_splits_last_units_are_written_while_the_next_split_computes(tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from read_cache import build as build_module

    durable: dict[str, int] = {}
    write_unit, build_split = store.CacheWriter.write_unit, build_module.build_split
    validation_started, stuck = threading.Event(), []

    def slow_write(self, split, unit, tokens, examples):
        # A slow disk, made deterministic: train's last unit is written only once validation's forward pass has
        # begun. A build that waited for train's writes first would never begin it (caught by the hang guard).
        if split == "train" and unit.index == self.group[split].attrs["n_units"] - 1 and not validation_started.wait(HANG_GUARD_S):
            stuck.append(unit.index)
        write_unit(self, split, unit, tokens, examples)
        durable[split] = durable.get(split, 0) + 1

    train_durable_when_validation_started: list[int] = []

    def traced_build_split(writer, backbone, split, *args, **kwargs):
        if split == "validation":
            train_durable_when_validation_started.append(durable.get("train", 0))
            validation_started.set()
        return build_split(writer, backbone, split, *args, **kwargs)

    monkeypatch.setattr(store.CacheWriter, "write_unit", slow_write)
    monkeypatch.setattr(build_module, "build_split", traced_build_split)
    report = build_cache(config(tiny_t5, glue_dir, tmp_path / "cache", batch_size=8))
    train_units = next(s for s in report.splits if s.split == "train").units_written
    assert train_units >= 1 and durable["train"] == train_units and stuck == []
    assert train_durable_when_validation_started[0] < train_units  # validation computed while train was still being written
    assert all(read_cache.open_cache(tmp_path / "cache")[s].complete for s in ("train", "validation", "test"))


def test_a_failure_in_the_next_split_leaves_the_last_one_durable_and_no_writer_running(
    tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from read_cache import build as build_module
    from read_cache.build import splits

    compute_unit, build_split = splits.compute_unit, build_module.build_split
    current: list[str] = []

    def failing_on_validation(*args, **kwargs):
        if current[-1] == "validation":
            raise RuntimeError("the backbone failed")
        return compute_unit(*args, **kwargs)

    def tracked_build_split(writer, backbone, split, *args, **kwargs):
        current.append(split)
        return build_split(writer, backbone, split, *args, **kwargs)

    monkeypatch.setattr(build_module, "build_split", tracked_build_split)
    monkeypatch.setattr(splits, "compute_unit", failing_on_validation)
    with pytest.raises(RuntimeError, match="the backbone failed"):
        build_cache(config(tiny_t5, glue_dir, tmp_path / "cache", batch_size=8))
    assert not [t for t in threading.enumerate() if t.name.startswith("read-cache-writer")]
    train = read_cache.open_cache(tmp_path / "cache")["train"]
    assert train.array("units_done")[...].all()  # every computed unit was written before the error surfaced
    monkeypatch.undo()
    report = build_cache(config(tiny_t5, glue_dir, tmp_path / "cache", batch_size=8))
    assert next(s for s in report.splits if s.split == "train").units_written == 0  # resumed, nothing recomputed
    assert all(read_cache.open_cache(tmp_path / "cache")[s].complete for s in ("train", "validation", "test"))
