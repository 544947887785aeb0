"""The command line: train and predict end to end, and one clear error line (exit 2) for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, make_tiny_t5, one_error, run_cli

from read_cache.build import build_cache
from read_cache.config import BuildConfig


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


# --------------------------------------------------------------------------------------------------
# What a new user hit (issue 14)


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    code, stdout, _ = run_cli("--version")
    assert code == 0 and stdout.strip() == f"read-cache {version('read-cache')}"


def test_flag_errors_come_before_torch_is_imported() -> None:
    """A rejected flag must not pay for importing torch/transformers (seconds): checked in a fresh interpreter."""
    import resource
    import subprocess
    import sys

    probe = (
        "import sys\nfrom read_cache import cli\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    for argv in (["train", "--dim", "0"], ["build", "--model", "m", "--task", "sst2", "--dtype", "bf17"], ["sweep", "--out", "x", "--rnn", "mlp"]):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {['read-cache', *argv]!r}\n{probe}"], capture_output=True, text=True, timeout=HANG_GUARD_S)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert done.stdout.split() == ["2", "False", "False"], (argv, done.stdout, done.stderr)
        assert done.stderr.count("error:") == 1, done.stderr
        # CPU seconds, not wall: a loaded machine stretches the wall clock, not the work (~1 s at load 20; torch alone costs 3).
        assert cpu < 2.5, (argv, cpu)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(trained: Path, tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--out", tmp_path / "c", "--device", "cuda")
    assert code == 2 and "CUDA" in one_error(output) and not (tmp_path / "c").exists()
    code, _, output = run_cli("predict", "--run", trained, "--device", "cuda", "a lovely film")
    assert code == 2 and "CUDA" in one_error(output)


def test_predict_refuses_empty_text_and_non_utf8_files(trained: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("predict", "--run", trained, "")
    assert code == 2 and "empty" in one_error(output)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un film tr\xe8s r\xe9ussi\n".encode("latin-1"))
    code, _, output = run_cli("predict", "--run", trained, "--file", latin1)
    assert code == 2 and "UTF-8" in one_error(output)


def test_predict_prints_probabilities_and_json(trained: Path) -> None:
    code, stdout, output = run_cli("predict", "--run", trained, "a lovely film", "the plot was dull")
    assert code == 0, output
    for line in stdout.strip().splitlines():
        label, probability, _ = line.split("\t")
        assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1.0
    code, stdout, output = run_cli("predict", "--run", trained, "--json", "a lovely film")
    assert code == 0, output
    row = json.loads(stdout)
    assert row["text"] == "a lovely film" and set(row["probabilities"]) == {"negative", "positive"}
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    assert row["probabilities"][row["label"]] == max(row["probabilities"].values())


@pytest.mark.parametrize("damaged", ["train/zarr.json", "train/encoder_hidden/zarr.json"])
def test_damaged_metadata_is_an_error_naming_the_file(caches: dict[str, Path], tmp_path: Path, damaged: str) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(caches["sst2"], copy)
    (copy / damaged).write_text('{"zarr_format": 3, "node_')
    for args in (["inspect", copy], ["train", "--cache", copy, "--epochs", 1, "--no-progress"]):
        code, _, output = run_cli(*args)
        assert code == 2, output
        assert damaged in one_error(output) and "damaged" in one_error(output), output


def test_unreachable_hub_names_every_input_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, output = run_cli("build", "--model", "google-t5/t5-small", "--task", "sst2", "--out", tmp_path / "c")
    assert code == 2
    line = one_error(output)
    assert "--model google-t5/t5-small" in line and "--data-dir" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "c").exists()


def test_build_next_command_stands_alone_and_overwrite_rebuilds(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    code, stdout, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--out", out, "--limit", 10, "--no-progress")
    assert code == 0, output
    assert f"  read-cache train --cache {out}" in stdout.splitlines()  # whole, on a line of its own
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "cola", "--data-dir", glue_dir, "--out", out, "--limit", 10, "--no-progress")
    assert code == 2 and "--out" in one_error(output)  # another task: refused without --overwrite
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "cola", "--data-dir", glue_dir, "--out", out, "--limit", 10, "--no-progress", "--overwrite")
    assert code == 0, output
    import read_cache

    assert read_cache.open_cache(out).task == "cola"


def test_caches_lists_and_removes(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache import paths

    root = paths.cache_home() / "caches"
    for task in ("sst2", "cola"):
        code, _, output = run_cli("build", "--model", tiny_t5, "--task", task, "--data-dir", glue_dir, "--limit", 10, "--no-progress")
        assert code == 0, output
    code, stdout, output = run_cli("caches", "--json")
    assert code == 0, output
    rows = json.loads(stdout)
    assert sorted(r["task"] for r in rows) == ["cola", "sst2"] and all(r["complete"] and r["disk_bytes"] > 0 for r in rows)
    assert all(Path(r["path"]).is_relative_to(root) for r in rows)
    not_a_cache = tmp_path / "notes"
    not_a_cache.mkdir()
    code, _, output = run_cli("caches", "--rm", not_a_cache)
    assert code == 2 and "not a read-cache cache" in one_error(output) and not_a_cache.is_dir()
    cola = next(Path(r["path"]) for r in rows if r["task"] == "cola")
    assert paths.last_cache() == cola.resolve()
    code, _, output = run_cli("caches", "--rm", cola)
    assert code == 0, output
    assert not cola.exists() and paths.last_cache() is None
    code, stdout, _ = run_cli("caches", "--json")
    assert [r["task"] for r in json.loads(stdout)] == ["sst2"]


def test_build_progress_moves_per_batch_without_a_terminal(tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from read_cache.build.progress import BuildProgress

    monkeypatch.setattr(BuildProgress, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="read_cache.build")
    out = tmp_path / "cache"
    build_cache(BuildConfig(model=str(tiny_t5), task="sst2", data_dir=glue_dir, out=out, batch_size=8, progress=True))
    counts = [int(r.getMessage().split()[1].split("/")[0].replace(",", "")) for r in caplog.records if "examples computed" in r.getMessage() and r.getMessage().startswith("train")]
    assert len(counts) >= 120 // 8 and counts == sorted(counts) and counts[-1] == 120  # one line per batch of 8, not per unit


def test_open_cache_expands_the_home_folder(caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import read_cache

    home = tmp_path / "home"
    shutil.copytree(caches["sst2"], home / "caches" / "sst2")
    monkeypatch.setenv("HOME", str(home))
    assert len(read_cache.open_cache("~/caches/sst2")["train"]) > 0
