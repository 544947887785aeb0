"""Stage two end to end on tiny caches: learning, readers, repeatability, online == cached, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    HANG_GUARD_S,
    POSITIVE,
    WORDS,
    build_quietly,
    flip_byte_in_a_chunk,
    make_tiny_t5,
    make_tokenizer,
    one_line,
    write_glue,
)
from safetensors.torch import load_file

from read_cache.build import build_cache
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import open_cache
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task
from read_cache.training.reader import SplitReader, choose_modes
from read_cache.training.train import TrainConfig, evaluate_split, load_run, train
from read_cache.util.device import cpu_has_fast_bf16

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "task", "cache", "model", "rnn", "dim", "head", "lr", "trainable_parameters", "epochs_run", "best_epoch",
    "validation", "test", "examples_per_second", "wall_seconds", "meter",
}


# --------------------------------------------------------------------------------------------------
# Caches, built once per session


def write_balanced_sst2(root: Path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """SST-2 rows whose label is 'a positive word occurs', half of each class, so chance is 0.5."""
    rng = random.Random(seed)
    negative = [w for w in WORDS if w not in POSITIVE]

    def rows(n: int) -> list[str]:
        out = []
        for i in range(n):
            words = [rng.choice(negative) for _ in range(rng.randint(3, 10))]
            if i % 2:
                words[rng.randrange(len(words))] = rng.choice(sorted(POSITIVE))
            out.append(f"{' '.join(words)}\t{i % 2}")
        rng.shuffle(out)
        return out

    (root / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        (root / "SST-2" / name).write_text("sentence\tlabel\n" + "\n".join(rows(n)) + "\n")
    return root


@pytest.fixture(scope="session")
def balanced_glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_balanced_sst2(tmp_path_factory.mktemp("balanced-glue"), n_train=400, n_dev=200)


@pytest.fixture(scope="session")
def sst2_cache(tiny_t5: Path, balanced_glue: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", balanced_glue, tmp_path_factory.mktemp("sst2") / "cache")


@pytest.fixture(scope="session")
def bert_cache(glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    BertModel(config).eval().save_pretrained(folder)
    return build_quietly(folder, "sst2", glue_dir, tmp_path_factory.mktemp("bert") / "cache", limit=60)


def quick(cache: Path, out: Path, **changes) -> TrainConfig:
    """A run of seconds: a tiny RNN, one epoch."""
    return TrainConfig(**{**dict(cache=cache, out=out, dim=8, epochs=1, batch_size=32, lr=1e-2, progress=False, threads=1), **changes})


@pytest.fixture(scope="session")
def learned(sst2_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("learned") / "run"
    summary = train(TrainConfig(cache=sst2_cache, out=out, dim=16, lr=2e-2, batch_size=32, epochs=6, patience=6, progress=False, threads=1))
    return out, summary


# --------------------------------------------------------------------------------------------------
# Learning


def test_learns_what_only_the_cached_states_know(learned: tuple[Path, dict]) -> None:
    run, summary = learned
    assert summary["test_majority_baseline"]["score"] <= 0.6
    assert summary["test"]["metric"] == "accuracy"
    assert summary["test"]["score"] >= 0.8
    assert summary["validation"]["score"] >= 0.8


def test_the_run_folder_describes_itself(learned: tuple[Path, dict], sst2_cache: Path) -> None:
    run, summary = learned
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, summary["epochs_run"] + 1))
    assert max(line["validation"]["score"] for line in lines) == summary["validation"]["score"]  # best restored
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["path"] == str(sst2_cache.resolve())
    assert config["cache"]["fingerprint"] == open_cache(sst2_cache).attrs["backbone"]["fingerprint"]
    assert config["side_network"]["head"] == summary["head"] == "lm"  # T5 classification defaults to lm
    assert config["train"]["dim"] == 16
    net, _ = load_run(run)
    assert sum(p.numel() for p in net.parameters()) == summary["trainable_parameters"]
    assert summary["meter"]["wall_seconds"] > 0


@pytest.mark.parametrize(
    ("rnn", "head"),
    [("lstm", "lm"), ("rnn", "linear"), ("gru", "linear"), ("none", "linear"), ("none", "lm")],
)
def test_every_cell_and_head_trains(sst2_cache: Path, tmp_path: Path, rnn: str, head: str) -> None:
    summary = train(quick(sst2_cache, tmp_path / "run", rnn=rnn, head=head, epochs=2))
    assert summary["head"] == head and summary["rnn"] == rnn
    assert 0.0 <= summary["test"]["score"] <= 1.0
    assert (tmp_path / "run" / "side_network.safetensors").is_file()
    if rnn == "none" and head == "lm":
        assert summary["trainable_parameters"] == 0 and summary["epochs_run"] == 0  # T5's own zero-shot verbalizer


def test_stsb_regression_trains_with_a_linear_head(stsb_cache: Path, tmp_path: Path) -> None:
    summary = train(quick(stsb_cache, tmp_path / "run", epochs=2))
    assert summary["head"] == "linear"
    assert summary["test"]["metric"] == "mean_pearson_spearman"
    assert {"pearson", "spearman"} <= set(summary["test"])
    net, _ = load_run(tmp_path / "run")
    assert net.classifier.out_features == 1


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_encoder_only_caches_train(bert_cache: Path, tmp_path: Path, pooling: str) -> None:
    assert open_cache(bert_cache).geometry.cross_attention is None
    summary = train(quick(bert_cache, tmp_path / "run", pooling=pooling))
    assert summary["head"] == "linear"
    assert set(summary["parameter_breakdown"]) == {"encoder_norm", "encoder_rnn", "up", "classifier"}


def test_training_never_imports_the_backbone(sst2_cache: Path, tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from read_cache.training.train import TrainConfig, train\n"
        f"train(TrainConfig(cache={str(sst2_cache)!r}, out={str(tmp_path / 'run')!r}, dim=8, epochs=1, progress=False, threads=1))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'transformers' or m == 'read_cache.backbone.load')))\n"
    )
    env = {**os.environ, "READ_CACHE_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_run_survives_the_model_folder_being_deleted(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_t5, tmp_path / "model")
    cache = build_quietly(model, "sst2", glue_dir, tmp_path / "cache", limit=40)
    shutil.rmtree(model)
    summary = train(quick(cache, tmp_path / "run"))
    assert summary["model"] == str(model)


# --------------------------------------------------------------------------------------------------
# Readers and repeatability


def test_streaming_and_ram_readers_yield_identical_batches(sst2_cache: Path) -> None:
    split = open_cache(sst2_cache)["train"]
    options = dict(batch_size=32, shuffle=True, seed=3, block_tokens=64, shuffle_blocks=3)
    stream, ram = SplitReader(split, mode="stream", **options), SplitReader(split, mode="ram", **options)
    assert len(stream.bounds) > 2 * stream.shuffle_blocks  # several windows, batches straddling them
    orders = []
    for epoch in range(2):
        a, b = list(stream.epoch(epoch)), list(ram.epoch(epoch))
        assert len(a) == len(b) == len(stream)
        for x, y in zip(a, b):
            assert x.keys() == y.keys() == {"enc", "token_example", "cross", "dec", "label", "rows"}
            for key in x:
                assert torch.equal(x[key], y[key]), key
        rows = torch.cat([x["rows"] for x in a])
        assert sorted(rows.tolist()) == list(range(len(split)))  # every example once per epoch
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # reshuffled per epoch
    batch = a[0]
    example = split[int(batch["rows"][1])]
    assert torch.equal(batch["enc"][batch["token_example"] == 1], torch.from_numpy(example.encoder_hidden))
    assert torch.equal(batch["cross"][batch["token_example"] == 1], torch.from_numpy(example.cross_attention))
    assert torch.equal(batch["dec"][1], torch.from_numpy(example.decoder_hidden))
    assert batch["label"][1].item() == example.label

def test_the_next_epochs_first_window_is_read_ahead_without_changing_batches(sst2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = open_cache(sst2_cache)["train"]
    options = dict(batch_size=32, shuffle=True, seed=3, block_tokens=64, shuffle_blocks=3, mode="stream")
    plain, ahead = SplitReader(split, **options), SplitReader(split, **options)
    reads: list[tuple[int, int]] = []
    from read_cache.training.windows import WindowReader

    start = WindowReader.start
    monkeypatch.setattr(WindowReader, "start", lambda self, bounds: reads.extend(bounds) or start(self, bounds))
    list(ahead.epoch(0, next_epoch=1))
    ahead._early[1].result()  # the read ahead (started at the end of epoch 0) has finished
    reads.clear()
    second = list(ahead.epoch(1))
    first_window = [ahead.bounds[b] for b in ahead.windows(1)[0].blocks]
    assert sorted(reads) == sorted(set(ahead.bounds) - set(first_window))  # the first window was not read again
    for x, y in zip(second, plain.epoch(1), strict=True):
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_windows_are_queued_before_the_stream_waits_for_the_one_ahead(sst2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the stream waits for window i, windows up to i + READ_AHEAD are already queued behind it on the reading
    threads (the next epoch's first past the last): the threads never wait for the stream between windows."""
    from read_cache.training.reader import READ_AHEAD
    from read_cache.training.windows import WindowReader

    reader = SplitReader(open_cache(sst2_cache)["train"], batch_size=4, shuffle=True, seed=3, block_tokens=64, shuffle_blocks=2, coded=True)
    windows = reader.windows(0)
    started: list[list[tuple[int, int]]] = []
    waits: list[tuple[int, int]] = []  # (window waited for, windows started by then)
    start = WindowReader.start

    def spy(self: WindowReader, bounds: list[tuple[int, int]]) -> Future:
        future, k = start(self, bounds), len(started)
        started.append(bounds)
        result = future.result
        future.result = lambda *args, **kwargs: waits.append((k, len(started))) or result(*args, **kwargs)
        return future

    monkeypatch.setattr(WindowReader, "start", spy)
    assert sum(len(batch["label"]) for batch in reader.epoch(0, next_epoch=1)) == len(reader.split)
    assert len(windows) > READ_AHEAD + 1
    assert waits == [(k, min(k + 1 + READ_AHEAD, len(windows) + 1)) for k in range(len(windows))]
    assert started == [[reader.bounds[b] for b in w.blocks] for w in windows] + [[reader.bounds[b] for b in reader.windows(1)[0].blocks]]


def test_the_reader_thread_stops_with_its_consumer_and_hands_on_errors(sst2_cache: Path, tmp_path: Path) -> None:
    import threading

    reader = SplitReader(open_cache(sst2_cache)["train"], batch_size=8, shuffle=True, block_tokens=64)
    batches = reader.epoch(0)
    next(batches)
    batches.close()
    assert not any(t.name == "read-cache-reader" for t in threading.enumerate())
    damaged = shutil.copytree(sst2_cache, tmp_path / "cache")
    flip_byte_in_a_chunk(damaged, "train/encoder_hidden", 0xFF)
    with pytest.raises(ReadCacheError, match="encoder_hidden"):
        list(SplitReader(open_cache(damaged)["train"], mode="stream").epoch(0))


def test_evaluation_reads_in_order(sst2_cache: Path) -> None:
    split = open_cache(sst2_cache)["test"]
    rows = torch.cat([b["rows"] for b in SplitReader(split, batch_size=7, block_tokens=50)])
    assert rows.tolist() == list(range(len(split)))


def test_ram_is_used_only_within_the_memory_budget(sst2_cache: Path) -> None:
    cache = open_cache(sst2_cache)
    splits = ("train", "validation", "test")
    assert choose_modes(cache, splits, "auto", 2 * 10**9) == dict.fromkeys(splits, "ram")
    assert choose_modes(cache, splits, "auto", 1000) == dict.fromkeys(splits, "stream")
    with pytest.raises(ReadCacheError, match="--memory-budget"):
        choose_modes(cache, splits, "ram", 1000)


def test_seeded_runs_repeat_and_streaming_trains_the_same(sst2_cache: Path, tmp_path: Path) -> None:
    def run(name: str, **changes) -> tuple[dict, dict]:
        summary = train(quick(sst2_cache, tmp_path / name, epochs=2, block_tokens=64, shuffle_blocks=3, **changes))
        return summary, load_file(str(tmp_path / name / "side_network.safetensors"))

    first, w1 = run("a", reader="ram")
    again, w2 = run("b", reader="ram")
    streamed, w3 = run("c", reader="stream")
    other, w4 = run("d", reader="ram", seed=1)
    assert streamed["reader"]["train"] == "stream" and first["reader"]["train"] == "ram"
    for summary in (again, streamed):
        assert summary["validation"] == first["validation"] and summary["test"] == first["test"]
    for weights in (w2, w3):
        assert all(torch.equal(w1[k], weights[k]) for k in w1)
    assert not all(torch.equal(w1[k], w4[k]) for k in w1)


# --------------------------------------------------------------------------------------------------
# Online == cached


def test_online_predictions_equal_the_cached_path(learned: tuple[Path, dict], sst2_cache: Path, balanced_glue: Path) -> None:
    from read_cache.inference.predict import predict

    run, _ = learned
    texts = load_glue(get_task("sst2"), balanced_glue)["test"].texts
    online = predict(run, texts)
    net, _ = load_run(run)
    cached = evaluate_split(net, SplitReader(open_cache(sst2_cache)["test"]))
    np.testing.assert_allclose(online.logits, cached.logits, atol=1e-4, rtol=0)
    assert np.array_equal(online.label_ids, cached.predictions)
    assert online.labels[:3] == [("negative", "positive")[i] for i in cached.predictions[:3]]
    # Plain strings work for single-sentence tasks, and a different batching agrees too.
    few = predict(run, [t[0] for t in texts[:5]], batch_size=2)
    np.testing.assert_allclose(few.logits, cached.logits[:5], atol=1e-4, rtol=0)


@pytest.fixture(scope="session")
def heads_cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp("heads") / "cache", limit=40, cross_attention="heads")


@pytest.mark.parametrize("which", ["bert_cache", "heads_cache"])
def test_online_equals_cached_for_encoders_and_per_head_maps(which: str, request: pytest.FixtureRequest, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.inference.predict import predict

    cache = request.getfixturevalue(which)
    train(quick(cache, tmp_path / "run", head="linear"))
    limit = open_cache(cache).attrs["build"]["limit"]
    texts = load_glue(get_task("sst2"), glue_dir, limit)["test"].texts
    net, _ = load_run(tmp_path / "run")
    cached = evaluate_split(net, SplitReader(open_cache(cache)["test"]))
    np.testing.assert_allclose(predict(tmp_path / "run", texts).logits, cached.logits, atol=1e-4, rtol=0)


def test_predict_refuses_another_model(learned: tuple[Path, dict], tmp_path: Path) -> None:
    from read_cache.inference.predict import predict

    other = make_tiny_t5(tmp_path / "other", seed=1)
    with pytest.raises(ReadCacheError, match="weights") as e:
        predict(learned[0], ["a good film"], model=str(other))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix


def edited_copy(cache: Path, dest: Path, edit) -> Path:
    shutil.copytree(cache, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    edit(meta["attributes"])
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest


def test_refuses_an_incomplete_cache(sst2_cache: Path, tmp_path: Path) -> None:
    cache = edited_copy(sst2_cache, tmp_path / "cache", lambda a: a["splits"]["validation"].update(complete=False))
    with pytest.raises(ReadCacheError, match="incomplete") as e:
        train(quick(cache, tmp_path / "run"))
    assert "read-cache build" in one_line(e)
    assert not (tmp_path / "run").exists()


def test_refuses_a_newer_format(sst2_cache: Path, tmp_path: Path) -> None:
    cache = edited_copy(sst2_cache, tmp_path / "cache", lambda a: a.update(format_version=99))
    with pytest.raises(ReadCacheError, match="newer") as e:
        train(quick(cache, tmp_path / "run"))
    one_line(e)


def test_refuses_a_missing_split(sst2_cache: Path, tmp_path: Path) -> None:
    cache = edited_copy(sst2_cache, tmp_path / "cache", lambda a: a["splits"].pop("test"))
    with pytest.raises(ReadCacheError, match="test") as e:
        train(quick(cache, tmp_path / "run"))
    one_line(e)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [({"dim": 0}, "--dim 0"), ({"lr": 0.0}, "--lr"), ({"lr": -1e-3}, "--lr"), ({"epochs": 0}, "--epochs 0"), ({"rnn": "mamba"}, "--rnn")],
)
def test_refuses_bad_flags(sst2_cache: Path, tmp_path: Path, changes: dict, flag: str) -> None:
    with pytest.raises(ReadCacheError, match=flag) as e:
        train(quick(sst2_cache, tmp_path / "run", **changes))
    one_line(e)


def test_refuses_a_head_the_task_cannot_use(stsb_cache: Path, bert_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="--head linear") as e:
        train(quick(stsb_cache, tmp_path / "a", head="lm"))
    assert "regression" in one_line(e)
    with pytest.raises(ReadCacheError, match="--head linear") as e:
        train(quick(bert_cache, tmp_path / "b", head="lm"))
    assert "encoder-only" in one_line(e)


def test_refuses_an_existing_run_folder_unless_overwrite(sst2_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ReadCacheError) as e:
        train(quick(sst2_cache, out))
    assert one_line(e) == f"--out {out} exists; pass --overwrite or choose another --out"
    train(quick(sst2_cache, out, overwrite=True))
    assert (out / "summary.json").is_file() and (out / "notes.txt").read_text() == "mine"


def test_default_cache_is_the_last_one_built(tiny_t5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ReadCacheError, match="--cache"):
        train(quick(None, tmp_path / "run"))
    glue = write_glue(tmp_path / "glue", n_train=30, n_dev=20)
    build_cache(BuildConfig(model=str(tiny_t5), task="sst2", data_dir=glue, out=tmp_path / "cache", progress=False))
    assert train(quick(None, tmp_path / "run"))["cache"] == str((tmp_path / "cache").resolve())


@pytest.mark.skipif(cpu_has_fast_bf16(), reason="this CPU runs bf16 natively")
def test_refuses_emulated_bf16_on_the_cpu(sst2_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="--dtype bf16") as e:
        train(quick(sst2_cache, tmp_path / "run", dtype="bf16", device="cpu"))
    one_line(e)
