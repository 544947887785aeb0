"""The sweep on tiny caches: each configuration equals a lone run, one read per epoch, the report, the search, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_quietly, one_error, run_cli
from safetensors.torch import load_file

from read_cache.config import SweepConfig, Trial, parse_list, parse_range
from read_cache.store import open_cache
from read_cache.training import reader as reader_module
from read_cache.training.runs import REPORTS
from read_cache.training.sweep import sweep
from read_cache.training.train import ARTIFACTS, TrainConfig, load_run, train


@pytest.fixture(scope="module")
def sst2_cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp("sweep-sst2") / "cache")


def shared(cache: Path | None, **changes) -> TrainConfig:
    """What every configuration of a test sweep shares: small batches, few epochs, one thread."""
    return TrainConfig(**{**dict(cache=cache, epochs=4, patience=2, batch_size=32, progress=False, threads=1), **changes})


@pytest.fixture(scope="module")
def grid(sst2_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepConfig, dict]:
    # A learning rate of 1e-7 changes no prediction: its validation score never improves, so with
    # patience 2 it stops after epoch 3 while lr 2e-2 keeps improving; 'none' + 'lm' has nothing to train.
    cfg = SweepConfig(
        out=tmp_path_factory.mktemp("grid") / "sweep", rnn=("gru/16", "lstm/8", "none"), lr=(2e-2, 1e-7), head=("lm", "linear"),
        shared=shared(sst2_cache),
    )
    return cfg, sweep(cfg)


# --------------------------------------------------------------------------------------------------
# Equal to lone runs


def test_each_configuration_equals_a_lone_run(grid: tuple[SweepConfig, dict], tmp_path: Path) -> None:
    cfg, report = grid
    entries = report["configs"]
    assert len(entries) == 12  # (gru/16, lstm/8, none) x (lm, linear) x (2e-2, 1e-7)
    epochs = {e["name"]: e["epochs_run"] for e in entries}
    assert min(v for v in epochs.values() if v) < max(epochs.values()) == cfg.shared.epochs  # some stop before others
    for entry in entries:
        alone = train(dataclasses.replace(cfg.shared, rnn=entry["rnn"], dim=entry["dim"], lr=entry["lr"], head=entry["head"], out=tmp_path / entry["name"]))
        for key in ("validation", "test", "epochs_run", "best_epoch", "trainable_parameters"):
            assert alone[key] == entry[key], (entry["name"], key)
        mine = load_file(str(Path(entry["run_dir"]) / "side_network.safetensors"))
        theirs = load_file(str(tmp_path / entry["name"] / "side_network.safetensors"))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), entry["name"]


def test_each_batch_is_decoded_once_per_epoch(sst2_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    gather = reader_module.Pool.gather
    monkeypatch.setattr(reader_module.Pool, "gather", lambda pool, positions, *a: decoded.append(len(positions)) or gather(pool, positions, *a))
    epochs = 3
    cfg = SweepConfig(out=tmp_path / "sweep", rnn=("gru/8", "lstm/8"), lr=(1e-2, 3e-3), shared=shared(sst2_cache, epochs=epochs, patience=epochs))
    report = sweep(cfg)
    assert report["configurations"] == 4 and report["epochs_trained"] == 4 * epochs
    cache = open_cache(sst2_cache)
    per_epoch = len(cache["train"]) + len(cache["validation"])
    assert sum(decoded) == epochs * per_epoch + len(cache["test"])  # not 4x: one decode feeds every network


# --------------------------------------------------------------------------------------------------
# What it writes


def test_the_report_selects_by_validation_and_reports_that_test_score(grid: tuple[SweepConfig, dict]) -> None:
    cfg, report = grid
    assert json.loads((Path(cfg.out) / "sweep.json").read_text()) == json.loads(json.dumps(report))
    for entry in report["configs"]:
        assert {"rnn", "dim", "lr", "head", "validation", "test", "trainable_parameters", "epochs_run"} <= set(entry)
        assert entry["ended"] in ("early stop", "last epoch", "nothing to train")
        assert len(entry["validation_curve"]) == entry["epochs_run"]
    best = report["best"]
    assert best["validation"]["score"] == max(e["validation"]["score"] for e in report["configs"])
    assert best == next(e for e in report["configs"] if e["name"] == best["name"])  # its own test score, not the best test
    assert (Path(cfg.out) / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_every_configuration_leaves_a_run_folder_predict_accepts(grid: tuple[SweepConfig, dict]) -> None:
    from read_cache.inference.predict import predict

    _, report = grid
    for entry in report["configs"]:
        run = Path(entry["run_dir"])
        assert all((run / name).is_file() for name in ARTIFACTS if name not in REPORTS), run  # reports only with --report-to
        summary = json.loads((run / "summary.json").read_text())
        assert summary["validation"] == entry["validation"] and summary["run_dir"] == str(run)
        assert len((run / "metrics.jsonl").read_text().splitlines()) == entry["epochs_run"]
        config = json.loads((run / "config.json").read_text())["train"]
        assert (config["rnn"], config["dim"], config["lr"]) == (entry["rnn"], entry["dim"], entry["lr"])
        net, _ = load_run(run)
        assert sum(p.numel() for p in net.parameters()) == entry["trainable_parameters"]
    result = predict(report["best"]["run_dir"], ["the film was good", "the plot was dull"])
    assert all(label in ("negative", "positive") for label in result.labels)


# --------------------------------------------------------------------------------------------------
# The learning-rate search


def test_trials_draw_learning_rates_log_uniformly(tmp_path: Path) -> None:
    cfg = SweepConfig(out=tmp_path, rnn=("gru/256", "gru/128", "lstm/128"), trials=300, lr_range=(1e-6, 3e-3))
    trials = cfg.configurations()
    assert len(trials) == 300
    assert [(t.rnn, t.dim) for t in trials[:4]] == [("gru", 256), ("gru", 128), ("lstm", 128), ("gru", 256)]  # in turn
    logs = [math.log10(t.lr) for t in trials]
    assert all(-6 <= x <= math.log10(3e-3) for x in logs)
    below = sum(x < (-6 + math.log10(3e-3)) / 2 for x in logs)
    assert 100 < below < 200  # log-uniform: half the draws below the range's geometric middle
    assert cfg.configurations() == trials  # seeded
    other = SweepConfig(out=tmp_path, rnn=cfg.rnn, trials=300, shared=TrainConfig(seed=1))
    assert other.configurations() != trials


def test_the_grid_crosses_plain_rnns_with_dims_and_keeps_paired_sizes(tmp_path: Path) -> None:
    cfg = SweepConfig(out=tmp_path, rnn=("gru", "lstm/128"), dim=(128, 256), lr=(1e-4, 1e-3), head=("lm", "linear"))
    archs = {(t.rnn, t.dim) for t in cfg.configurations()}
    assert archs == {("gru", 128), ("gru", 256), ("lstm", 128)}
    assert len(cfg.configurations()) == 3 * 2 * 2
    assert Trial("gru", 128, 1e-4, "linear") in cfg.configurations()


def test_successive_halving_trains_fewer_epochs(sst2_cache: Path, tmp_path: Path) -> None:
    cfg = SweepConfig(
        out=tmp_path / "sweep", rnn=("gru/8", "lstm/8"), trials=6, lr_range=(1e-4, 5e-2), search="halving", eta=2,
        shared=shared(sst2_cache, epochs=4, patience=4),
    )
    report = sweep(cfg)
    entries = report["configs"]
    # Rungs after epochs 1 and 2: 6 -> 3 -> 2 configurations, so 6 + 3 + 2 x 2 epochs instead of 24.
    assert sorted(e["epochs_run"] for e in entries) == [1, 1, 1, 2, 4, 4]
    assert report["epochs_trained"] == 13
    assert sum(e["ended"] == "halved" for e in entries) == 4
    for rung, culled_at in ((1, 1), (2, 2)):
        culled = [max(e["validation_curve"][:rung]) for e in entries if e["epochs_run"] == culled_at]
        kept = [max(e["validation_curve"][:rung]) for e in entries if e["epochs_run"] > culled_at]
        assert max(culled) <= min(kept)


# --------------------------------------------------------------------------------------------------
# The command line


def test_the_command_prints_a_ranked_table(sst2_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code, stdout, output = run_cli(
        "sweep", "--cache", sst2_cache, "--rnn", "gru/8", "--lr", "1e-2,1e-3", "--epochs", 1, "--batch-size", 32,
        "--threads", 1, "--out", out, "--no-progress",
    )
    assert code == 0, output
    report = json.loads((out / "sweep.json").read_text())
    assert report["configurations"] == 2
    assert f"selected {report['best']['name']}" in stdout and "ranked by validation accuracy" in stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rnn", ""], "--rnn is empty"),
        (["--lr", ","], "--lr is empty"),
        (["--dim", "8,,16"], "empty entry"),
        (["--dim", "8,abc"], "whole numbers"),
        (["--lr", "1e-3,fast"], "--lr '1e-3,fast' is not a comma-separated list of numbers"),
        (["--trials", 3, "--lr-range", "1e-3"], "--lr-range '1e-3' is not LOW:HIGH"),
        (["--trials", 3, "--lr-range", "3e-3:1e-6"], "0 < LOW < HIGH"),
        (["--trials", 3, "--lr-range", "0:1e-3"], "0 < LOW < HIGH"),
        (["--lr", "1e-3,0"], "--lr 0.0 must be a positive"),
        (["--lr", "-1e-3"], "--lr -0.001 must be a positive"),
        (["--lr", "1e-3", "--trials", 4], "not both"),
        (["--trials", 0], "--trials 0"),
        (["--head", "lm,mlp"], "--head 'mlp' is not one of"),
        (["--rnn", "gru,mamba"], "--rnn 'mamba' is not one of"),
        (["--rnn", "gru/big"], "needs a positive size"),
        (["--dim", 0], "--dim 0"),
        (["--search", "bayes"], "--search 'bayes'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sst2_cache: Path, tmp_path: Path, args: list, expected: str) -> None:
    out = tmp_path / "sweep"
    code, _, output = run_cli("sweep", "--cache", sst2_cache, "--out", out, "--epochs", 1, "--no-progress", *args)
    assert code == 2, output
    assert expected in one_error(output), output
    assert not out.exists()  # refused before anything was written


def test_refuses_a_head_the_task_cannot_use_and_an_existing_out(stsb_cache: Path, sst2_cache: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("sweep", "--cache", stsb_cache, "--head", "linear,lm", "--out", tmp_path / "a", "--no-progress")
    assert code == 2 and "--head linear" in one_error(output) and "regression" in one_error(output)
    assert not (tmp_path / "a").exists()
    taken = tmp_path / "b"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, output = run_cli("sweep", "--cache", sst2_cache, "--out", taken, "--no-progress")
    assert code == 2 and "--overwrite" in one_error(output)


def test_list_and_range_parsing() -> None:
    assert parse_list("--dim", " 128, 256 ", int) == (128, 256)
    assert parse_list("--head", "lm", str) == ("lm",)
    assert parse_list("--lr", "", float) == ()
    assert parse_range("--lr-range", "1e-6:3e-3") == (1e-6, 3e-3)
