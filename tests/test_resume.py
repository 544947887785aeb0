"""Training that survives interruption: kill -9 (and Ctrl-C) at chosen points, rerun the same command,
end bit-identical to an uninterrupted run; the folder rules; predict on an unfinished run.

The kill points come from the test-only READ_CACHE_TEST_KILL=STAGE:EPOCH hook in `read_cache.training.checkpoint`
('after:K' right after epoch K's checkpoint is in place; 'before:K' once epoch K is trained and its
metrics line written but its checkpoint not; 'written:K' with the new checkpoint written but not yet
renamed into place), so every kill lands exactly where the test says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, build_quietly, one_error, run_cli
from safetensors.torch import load_file

from read_cache.config import SweepConfig
from read_cache.errors import ReadCacheError
from read_cache.training import checkpoint
from read_cache.training.sweep import sweep
from read_cache.training.train import TrainConfig, train
from read_cache.util import files

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ("--rnn", "gru", "--dim", "16", "--lr", "2e-2", "--batch-size", "16", "--epochs", "6", "--patience", "6", "--threads", "1", "--no-progress")
SWEEP_FLAGS = (
    "--rnn", "gru/16,lstm/8", "--lr", "2e-2,1e-3", "--search", "halving", "--eta", "2", "--batch-size", "16",
    "--epochs", "5", "--patience", "5", "--threads", "1", "--no-progress",
)


@pytest.fixture(scope="module")
def cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp("resume-sst2") / "cache")


def cli(cwd: Path, *args: object, kill: str | None = None) -> subprocess.CompletedProcess:
    """`python -m read_cache ARGS` in a fresh process (so kill -9 is real), one thread, optionally killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(checkpoint.KILL_ENV, None)
    if kill:
        env[checkpoint.KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "read_cache", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def train_config(cache: Path, out: Path | None, **changes) -> TrainConfig:
    """TRAIN_FLAGS as a TrainConfig: the uninterrupted reference, trained in this process."""
    base = dict(cache=cache, out=out, rnn="gru", dim=16, lr=2e-2, batch_size=16, epochs=6, patience=6, threads=1, progress=False)
    return TrainConfig(**{**base, **changes})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "side_network.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def epochs_of(run: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "examples_per_second")} for line in lines]


def scores(summary: dict) -> tuple:
    return summary["validation"], summary["test"], summary["epochs_run"], summary["best_epoch"]


class Crash(Exception):
    """Stands in for kill -9 in the in-process tests."""


def crash_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    def kill(stage: str, epoch: int) -> None:
        if f"{stage}:{epoch}" == where:
            raise Crash(where)

    monkeypatch.setattr(checkpoint, "kill_point", kill)


# --------------------------------------------------------------------------------------------------
# train


def test_train_killed_twice_resumes_bit_identical(cache: Path, tmp_path: Path) -> None:
    reference = train(train_config(cache, tmp_path / "reference"))
    work = tmp_path / "work"
    work.mkdir()
    command = ("train", "--cache", cache, *TRAIN_FLAGS)

    first = cli(work, *command, kill="after:2")  # right after epoch 2's checkpoint
    assert first.returncode == -9, first.stderr
    (run,) = (work / "runs").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    code, _, output = run_cli("predict", "--run", run, "a good film")  # bug 3: not "config.json missing"
    assert code == 2
    assert one_error(output) == f"error: {run} holds an unfinished run (interrupted at epoch 2); rerun the same `read-cache train` command to finish it"

    second = cli(work, *command, kill="before:5")  # epoch 5 trained and logged, its checkpoint not written
    assert second.returncode == -9, second.stderr
    assert f"resuming runs/{run.name} from epoch 3" in second.stderr
    assert len(epochs_of(run)) == 5  # the line of epoch 5, whose checkpoint never landed...

    last = cli(work, *command)
    assert last.returncode == 0, last.stderr
    assert f"resuming runs/{run.name} from epoch 5" in last.stderr
    assert [p.name for p in (work / "runs").iterdir()] == [run.name]  # no second run folder
    assert not (run / "checkpoint.pt").exists()  # done: the checkpoint is gone
    summary = json.loads((run / "summary.json").read_text())
    assert scores(summary) == scores(reference)
    assert (run / "side_network.safetensors").read_bytes() == (tmp_path / "reference" / "side_network.safetensors").read_bytes()
    assert epochs_of(run) == epochs_of(tmp_path / "reference")  # ...is replaced by the rerun's, once


def test_a_run_killed_where_early_stopping_ended_it_only_scores_on_resume(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config(cache, tmp_path / "run", lr=1e-7, patience=1)  # lr 1e-7 never improves: stops after epoch 2
    reference = train(dataclasses.replace(cfg, out=tmp_path / "reference"))
    assert reference["epochs_run"] == 2 < cfg.epochs
    crash_at(monkeypatch, "after:2")
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr("read_cache.training.engine.train_epoch", lambda *a: calls.append(a))
    assert scores(train(cfg)) == scores(reference) and calls == []
    assert same_weights(tmp_path / "run", tmp_path / "reference")


def test_an_explicit_out_resumes_its_config_and_refuses_another(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    crash_at(monkeypatch, "written:3")  # the new checkpoint is on disk under its temporary name only
    with pytest.raises(Crash):
        train(train_config(cache, out))
    monkeypatch.undo()
    assert (out / "checkpoint.pt.tmp").exists() and checkpoint.checkpoint_epoch(out) == 2

    other = train_config(cache, out, lr=1e-2)
    with pytest.raises(ReadCacheError) as e:
        train(other)
    assert str(e.value) == f"--out {out} holds an interrupted run of another configuration (it differs in lr); pass --overwrite to start over there, or choose another --out"

    same = train(train_config(cache, out, reader="stream"))  # how the splits are read changes no number
    assert scores(same) == scores(train(train_config(cache, tmp_path / "reference")))
    assert same_weights(out, tmp_path / "reference")
    with pytest.raises(ReadCacheError, match="exists; pass --overwrite"):  # a finished run is never silently redone
        train(train_config(cache, out))
    assert scores(train(dataclasses.replace(other, overwrite=True)))[2] == other.epochs  # --overwrite starts over


def test_a_run_another_process_is_training_is_never_resumed(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    crash_at(monkeypatch, "after:1")
    with pytest.raises(Crash):
        train(train_config(cache, None))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    files.release(run)  # as if this process had died: another one now holds it
    holder = subprocess.Popen(
        # It holds the lock until the test closes its stdin (or kills it), however long the trainings below take.
        [sys.executable, "-c", f"import fcntl, os, sys; fd = os.open({str(run)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(ReadCacheError) as e:
            train(train_config(cache, run))
        assert str(e.value) == f"another read-cache process is training in --out {run} right now; wait for it or choose another --out"
        summary = train(train_config(cache, None))  # a new run beside it
        assert Path(summary["run_dir"]) != run and not (run / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------------
# sweep


def test_sweep_interrupted_twice_resumes_bit_identical(cache: Path, tmp_path: Path) -> None:
    reference = sweep(
        SweepConfig(
            out=tmp_path / "reference", rnn=("gru/16", "lstm/8"), lr=(2e-2, 1e-3), search="halving", eta=2,
            shared=TrainConfig(cache=cache, batch_size=16, epochs=5, patience=5, threads=1, progress=False),
        )
    )
    out = tmp_path / "sweep"
    command = ("sweep", "--cache", cache, "--out", out, *SWEEP_FLAGS)

    first = cli(tmp_path, *command, kill="after:1:int")  # Ctrl-C right after epoch 1 (and its halving)
    assert first.returncode == 130, first.stderr
    assert "interrupted: rerun the same command to resume from its last finished epoch" in first.stderr
    run = out / "runs" / reference["configs"][0]["name"]
    code, _, output = run_cli("predict", "--run", run, "a good film")
    assert code == 2 and "interrupted at epoch 1); rerun the same `read-cache sweep` command" in one_error(output)

    second = cli(tmp_path, *command, kill="before:3")  # kill -9 once epoch 3 is trained
    assert second.returncode == -9, second.stderr
    assert f"resuming {out} from epoch 2" in second.stderr

    last = cli(tmp_path, *command)
    assert last.returncode == 0, last.stderr
    report = json.loads((out / "sweep.json").read_text())
    keys = ("name", "validation", "test", "epochs_run", "best_epoch", "ended", "validation_curve")
    assert [{k: e[k] for k in keys} for e in report["configs"]] == [{k: e[k] for k in keys} for e in reference["configs"]]
    assert {e["ended"] for e in report["configs"]} >= {"halved", "last epoch"}
    for entry in reference["configs"]:
        assert same_weights(out / "runs" / entry["name"], Path(entry["run_dir"])), entry["name"]
    assert not (out / "checkpoint.pt").exists()
    code, _, output = run_cli(*command)  # finished: never silently redone
    assert code == 2 and one_error(output) == f"error: --out {out} exists; pass --overwrite or choose another --out"


@pytest.mark.parametrize(
    ("command", "module", "function", "says"),
    [
        (("build", "--model", "m", "--task", "sst2"), "read_cache.build", "build_cache", "interrupted: rerun the same command to resume from its last durable unit"),
        (("train", "--cache", "c"), "read_cache.training.train", "train", "interrupted: rerun the same command to resume from its last finished epoch (each epoch end is checkpointed)"),
        (("inspect", "c"), "read_cache.store.describe", "describe", "interrupted"),  # nothing to resume
    ],
)
def test_ctrl_c_says_what_the_same_command_resumes(command: tuple, module: str, function: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(f"{module}.{function}", interrupted)
    monkeypatch.setattr("read_cache.store.open_cache", lambda path, *options: None)
    code, _, output = run_cli(*command)
    assert code == 130 and output.strip().splitlines()[-1] == says


def test_a_checkpoint_written_before_the_engine_resumes(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run checkpoints of format 1 written before one engine served train and sweep had `stopped` and no `ended`
    or `timeline`: a rerun still resumes them and ends as an uninterrupted run."""
    reference = train(train_config(cache, tmp_path / "reference"))
    out = tmp_path / "run"
    crash_at(monkeypatch, "after:3")
    with pytest.raises(Crash):
        train(train_config(cache, out))
    monkeypatch.undo()
    state = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("ended", "timeline")}
    assert old["kind"] == "train" and old["stopped"] is False
    torch.save(old, out / checkpoint.CHECKPOINT)
    assert scores(train(train_config(cache, out))) == scores(reference)
    assert same_weights(out, tmp_path / "reference")


# --------------------------------------------------------------------------------------------------
# train --method: the baselines run on the same engine, so they resume the same way


@pytest.mark.parametrize("method", ["lora-8", "bitfit"])
def test_a_baseline_killed_after_epoch_1_resumes_bit_identical(method: str, tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.config import MethodConfig
    from read_cache.methods.train import train_method

    flags = dict(model=str(tiny_t5), task="sst2", data_dir=glue_dir, limit=40, epochs=3, patience=3, batch_size=8, threads=1, progress=False)
    reference = train_method(MethodConfig(method=method, out=tmp_path / "reference", **flags))
    work = tmp_path / "work"
    work.mkdir()
    command = ("train", "--method", method, "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--limit", 40,
               "--epochs", 3, "--patience", 3, "--batch-size", 8, "--threads", 1, "--no-progress")
    killed = cli(work, *command, kill="after:1")
    assert killed.returncode == -9, killed.stderr
    (run,) = (work / "runs").iterdir()
    assert checkpoint.checkpoint_epoch(run) == 1 and not (run / "summary.json").exists()
    rerun = cli(work, *command)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in (work / "runs").iterdir()] == [run.name]  # the same folder, resumed
    assert "resuming" in rerun.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["validation"], summary["test"], summary["epochs_run"], summary["best_epoch"]) == (
        reference["validation"], reference["test"], reference["epochs_run"], reference["best_epoch"])
    ours, theirs = load_file(str(run / "method.safetensors")), load_file(str(tmp_path / "reference" / "method.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert epochs_of(run) == epochs_of(tmp_path / "reference")
