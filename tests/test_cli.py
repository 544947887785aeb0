"""The command line: train and predict end to end, and one clear error line (exit 2) for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from read_cache.build import BuildConfig, build_cache

from conftest import make_tiny_t5, one_error, run_cli



@pytest.fixture(scope="module")
def caches(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-caches")
    out = {}
    for task in ("sst2", "stsb"):
        out[task] = root / task
        build_cache(BuildConfig(model=str(tiny_t5), task=task, data_dir=glue_dir, out=out[task], progress=False))
    return out


@pytest.fixture(scope="module")
def trained(caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli-run") / "run"
    code, _, output = run_cli("train", "--cache", caches["sst2"], "--dim", 16, "--epochs", 2, "--out", run, "--no-progress")
    assert code == 0, output
    return run


def test_train_writes_a_run_and_prints_scores(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("task", "cache", "model", "rnn", "dim", "head", "lr", "trainable_parameters", "epochs_run", "best_epoch",
                "validation", "test", "examples_per_second", "wall_seconds"):
        assert key in summary, key
    assert summary["test"]["metric"] == "accuracy" and 0 <= summary["test"]["score"] <= 1


def test_predict_prints_a_label_per_text(trained: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("the film was good\n\nthe plot was dull\n")
    code, stdout, output = run_cli("predict", "--run", trained, "a lovely film", "--file", texts)
    assert code == 0, output
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)


def _edit_root(cache: Path, edit) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    edit(meta["attributes"])
    (cache / "zarr.json").write_text(json.dumps(meta))


def test_bad_train_inputs(caches: dict[str, Path], trained: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    shutil.copytree(caches["sst2"], incomplete)
    _edit_root(incomplete, lambda a: a["splits"]["test"].update(complete=False))
    newer = tmp_path / "newer"
    shutil.copytree(caches["sst2"], newer)
    _edit_root(newer, lambda a: a.update(format_version=a["format_version"] + 1))
    missing = tmp_path / "missing"
    shutil.copytree(caches["sst2"], missing)
    _edit_root(missing, lambda a: a["splits"].pop("validation"))
    shutil.rmtree(missing / "validation")
    cases = [
        (["--cache", incomplete], "incomplete"),
        (["--cache", newer], "newer"),
        (["--cache", missing], "validation"),
        (["--cache", caches["stsb"], "--head", "lm"], "--head"),
        (["--cache", caches["sst2"], "--dim", 0], "--dim"),
        (["--cache", caches["sst2"], "--out", trained], "--overwrite"),
    ]
    before = (trained / "summary.json").read_bytes()
    for args, expected in cases:
        code, _, output = run_cli("train", *args, "--epochs", 1, "--no-progress")
        assert code == 2, (args, output)
        assert expected in one_error(output), (args, output)
    assert (trained / "summary.json").read_bytes() == before  # the existing run is untouched


def test_predict_refuses_a_model_that_differs_from_the_cache(trained: Path, tmp_path: Path) -> None:
    other = make_tiny_t5(tmp_path / "other-t5", seed=1)
    code, _, output = run_cli("predict", "--run", trained, "--model", other, "a lovely film")
    assert code == 2
    assert "model" in one_error(output)


def test_train_without_any_cache_says_how_to_make_one() -> None:
    code, _, output = run_cli("train", "--epochs", 1)
    assert code == 2 and "read-cache build" in one_error(output)
