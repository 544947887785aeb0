"""--report-to (TensorBoard events read back, W&B offline when installed, bad input) and RUN/curves.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_error, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from read_cache import kinds
from read_cache.config import SweepConfig, TrainConfig, record
from read_cache.training import runs
from read_cache.training.report import TENSORBOARD, open_reporter
from read_cache.training.sweep import sweep
from read_cache.training.train import train


def run_train(cache: Path, out: Path, **options) -> dict:
    options = {"dim": 8, "epochs": 3, "patience": 3, "batch_size": 16, **options}
    return train(TrainConfig(cache=cache, out=out, progress=False, **options))


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_values(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def logged_config(accumulator: EventAccumulator) -> str:
    return accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def reported(stsb_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reported") / "run"
    return out, run_train(stsb_cache, out, report_to=("tensorboard",))


def test_tensorboard_holds_every_epochs_numbers_and_the_config(reported: tuple[Path, dict]) -> None:
    out, summary = reported
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tb = events(out / TENSORBOARD)
    metric = history[0]["validation"]["metric"]
    assert scalar_values(tb, "train/loss") == [(r["epoch"], pytest.approx(r["loss"])) for r in history]
    assert scalar_values(tb, f"validation/{metric}") == [(r["epoch"], pytest.approx(r["validation"]["score"])) for r in history]
    assert scalar_values(tb, "train/examples_per_second") == [(r["epoch"], pytest.approx(r["examples_per_second"], rel=1e-6)) for r in history]
    assert scalar_values(tb, f"test/{summary['test']['metric']}") == [(summary["best_epoch"], pytest.approx(summary["test"]["score"]))]
    config = logged_config(tb)
    assert json.loads(config.replace("\n    ", "\n")) == json.loads((out / "config.json").read_text())


def test_train_writes_curves_png(reported: tuple[Path, dict]) -> None:
    out, _ = reported
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_reporter_by_default_and_report_to_is_not_part_of_a_runs_identity(stsb_cache: Path, tmp_path: Path) -> None:
    assert TrainConfig().report_to == ("none",)
    run_train(stsb_cache, tmp_path / "plain", epochs=1)
    assert not (tmp_path / "plain" / TENSORBOARD).exists() and (tmp_path / "plain" / "curves.png").is_file()
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    reporting = json.loads(json.dumps(plain))
    reporting["train"]["report_to"] = ["tensorboard", "wandb"]
    assert runs.differences(plain, reporting) == []  # an interrupted run resumes whatever it reports to


def test_overwrite_replaces_the_runs_reports_too(stsb_cache: Path, tmp_path: Path) -> None:
    """--overwrite deletes the old run's tensorboard/ and wandb/ with its other files: old events beside the new
    ones would show two runs as one curve. What else the user keeps in the folder stays."""
    out = tmp_path / "run"
    run_train(stsb_cache, out, epochs=2, report_to=("tensorboard",))
    (out / runs.WANDB / "offline-run-old").mkdir(parents=True)  # as an earlier --report-to wandb leaves it
    (out / "notes.txt").write_text("mine")
    run_train(stsb_cache, out, epochs=1, report_to=("tensorboard",), overwrite=True)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and len(list((out / TENSORBOARD).iterdir())) == 1  # the new run's events alone
    assert scalar_values(events(out / TENSORBOARD), "train/loss") == [(history[0]["epoch"], pytest.approx(history[0]["loss"]))]
    assert not (out / runs.WANDB).exists() and (out / "notes.txt").read_text() == "mine"


def test_the_config_logged_is_the_masked_record(tmp_path: Path) -> None:
    cfg = TrainConfig(cache="s3://bucket/cache", storage_options={"secret_access_key": "hunter2"}, report_to=("tensorboard",))
    reporter = open_reporter(cfg.report_to, tmp_path, {"train": record(cfg)}, "secret")
    reporter.close()
    text = logged_config(events(tmp_path / TENSORBOARD))
    assert "s3://bucket/cache" in text and "hunter2" not in text


def test_a_sweep_reports_one_run_per_configuration(stsb_cache: Path, tmp_path: Path) -> None:
    shared = TrainConfig(cache=stsb_cache, epochs=2, batch_size=16, progress=False, report_to=("tensorboard",))
    report = sweep(SweepConfig(out=tmp_path / "sweep", rnn=("gru",), dim=(4, 8), shared=shared))
    for entry in report["configs"]:
        run = Path(entry["run_dir"])
        assert len(scalar_values(events(run / TENSORBOARD), "train/loss")) == entry["epochs_run"]
        assert (run / "curves.png").is_file()


@pytest.mark.skipif(not kinds.installed("wandb"), reason="wandb is not installed (the `wandb` extra)")
def test_wandb_offline_keeps_the_run_in_the_run_folder(stsb_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_train(stsb_cache, tmp_path / "run", epochs=1, report_to=("wandb",))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("command", [["train"], ["sweep", "--out", "sweep"], ["train", "--method", "bitfit", "--model", "m", "--task", "sst2"]])
def test_an_unknown_reporter_is_one_line_before_any_work(command: list[str]) -> None:
    code, _, output = run_cli(*command, "--report-to", "tensorboard,foo")
    assert code == 2
    assert "--report-to 'foo' is not one of tensorboard, wandb, none" in one_error(output)


def test_a_reporter_without_its_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "installed", lambda module: module != "tensorboard")
    code, _, output = run_cli("train", "--report-to", "tensorboard")
    assert code == 2
    assert "needs the tensorboard package" in (line := one_error(output)) and "pip install 'read-cache[tensorboard]'" in line
    code, _, output = run_cli("train", "--report-to", "none,tensorboard")
    assert code == 2 and "mixes none" in one_error(output)


def test_a_run_with_nothing_to_train_still_gets_curves(tmp_path: Path) -> None:
    from read_cache.training.curves import write_curves

    (tmp_path / "metrics.jsonl").write_text("")
    assert write_curves(tmp_path, 0, "probe").read_bytes()[:4] == b"\x89PNG"


def test_a_baseline_reports_and_draws_its_curves_too(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.config import MethodConfig
    from read_cache.methods.train import train_method

    out = tmp_path / "bitfit"
    cfg = MethodConfig(method="bitfit", model=str(tiny_t5), task="sst2", data_dir=glue_dir, limit=24, epochs=2, batch_size=8, out=out,
                       progress=False, report_to=("tensorboard",))
    summary = train_method(cfg)
    assert [step for step, _ in scalar_values(events(out / TENSORBOARD), "train/loss")] == [1, 2][: summary["epochs_run"]]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
