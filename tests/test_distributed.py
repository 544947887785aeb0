"""torchrun: 2 CPU processes with gloo build, sweep and train exactly as one process does, and refuse bad launches.

Most launches here start the ranks themselves with the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): that costs no launcher process and lets a test give one rank another
folder or other flags. One test goes through torchrun itself (`python -m torch.distributed.run`).
Every rank runs one thread (OMP_NUM_THREADS=1), and so does every one-process reference here, so the
arithmetic, and therefore the bytes, are the same. About 3 minutes on this shared 2-core machine (load 6),
most of it Python and torch starting in 2 processes per launch; `-m slow` adds a launch killed whole.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, cache_files, flip_byte_in_a_chunk, write_glue

import read_cache
from read_cache.build import build_cache
from read_cache.config import BuildConfig, SweepConfig, TrainConfig
from read_cache.distributed import LAUNCH_RECORD, balanced, detect, round_robin
from read_cache.errors import ReadCacheError
from read_cache.store import BuildLock
from read_cache.training.reader import epoch_windows
from read_cache.training.sweep import sweep

REPO = Path(__file__).resolve().parents[1]
SMALL_CHUNKS = 0.003  # MiB: 16-token chunks, so 300 examples make 7 train units and many training blocks
BUILD = ["build", "--task", "sst2", "--chunk-mb", SMALL_CHUNKS, "--batch-size", 8, "--dtype", "fp32", "--no-progress"]
TIMEOUT = HANG_GUARD_S  # a hang guard: a loaded machine must not trip it


# --------------------------------------------------------------------------------------------------
# Launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "test-launch",
    }


def start(argv_of_rank, world: int = 2, cwd_of_rank=None, **popen) -> list[subprocess.Popen]:
    """Start `world` ranks (argv_of_rank(rank) each) the way torchrun does."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *map(str, argv_of_rank(rank))], env=rank_env(rank, world, port), cwd=cwd_of_rank(rank) if cwd_of_rank else None,
            **({"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | popen),
        )
        for rank in range(world)
    ]


def launch(argv_of_rank, world: int = 2, cwd_of_rank=None) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks and wait for all; kill all on timeout."""
    procs = start(argv_of_rank, world, cwd_of_rank)
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def cli(*args: object) -> list[object]:
    return ["-m", "read_cache", *args]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The references run with one thread, like every rank."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Comparing stores


def assert_identical(ours: Path, reference: Path, *, error_record: bool = True) -> None:
    """Array by array, then file by file (every chunk and zarr.json).

    `error_record=False`: the root zarr.json may differ in the measured reconstruction error alone (a killed
    torchrun launch loses the statistics of the units its other ranks made durable; docs/distributed.md)."""
    a, b = read_cache.open_cache(ours), read_cache.open_cache(reference)
    assert a.splits == b.splits == ["train", "validation", "test"]
    for split in b.splits:
        assert sorted(a[split].array_names()) == sorted(b[split].array_names())
        for name in b[split].array_names():
            assert np.array_equal(a[split].array(name)[...], b[split].array(name)[...]), f"{split}/{name}"
    mine, theirs = cache_files(ours), cache_files(reference)
    assert mine.keys() == theirs.keys()
    if not error_record:
        for files_of in (mine, theirs):
            meta = json.loads(files_of["zarr.json"])
            for status in meta["attributes"]["splits"].values():
                status.pop("reconstruction_error", None)
            files_of["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    assert [name for name in theirs if mine[name] != theirs[name]] == []
    a.require_complete()


@pytest.fixture(scope="module")
def setup(tiny_t5: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny T5, GLUE rows, and the one-process reference cache."""
    root = tmp_path_factory.mktemp("distributed")
    glue = write_glue(root / "glue", n_train=300, n_dev=60, seed=3)
    reference = root / "reference"
    with one_thread():
        build_cache(BuildConfig(model=str(tiny_t5), task="sst2", data_dir=glue, out=reference, chunk_mb=SMALL_CHUNKS, batch_size=8, dtype="fp32", progress=False))
    assert read_cache.open_cache(reference)["train"].attrs["n_units"] >= 4
    return tiny_t5, glue, reference


# --------------------------------------------------------------------------------------------------
# The build


def test_torchrun_build_equals_the_one_process_build(setup, tmp_path: Path) -> None:
    """Through torchrun itself: 2 ranks write one store, byte for byte the one-process build."""
    model, glue, reference = setup
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           *cli(*BUILD, "--model", model, "--data-dir", glue, "--out", out)]
    proc = subprocess.run(list(map(str, cmd)), env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical(out, reference)
    assert not (out / LAUNCH_RECORD).exists()
    assert proc.stdout.count("┃ split") == 1 and "summed over 2 ranks" in proc.stdout  # one table, rank 0's
    units = {line.split()[1]: int(line.split()[9]) for line in proc.stdout.splitlines() if line.startswith("│") and line.split()[1] in ("train", "validation", "test")}
    assert units == {s: read_cache.open_cache(reference)[s].attrs["n_units"] for s in ("train", "validation", "test")}  # every rank's units counted


KILLED_RANK = """
import os, signal, sys
from read_cache import store
from read_cache.cli import main

original, calls = store.CacheWriter.write_unit, []

def write_unit(self, split, unit, tokens, examples):
    calls.append(unit)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # rank 1 dies mid-unit: half its arrays on disk
        self.group[split]["encoder_hidden"][unit.tokens[0]:unit.tokens[1]] = tokens["encoder_hidden"]
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, split, unit, tokens, examples)

store.CacheWriter.write_unit = write_unit
sys.argv[0] = "read-cache"
main()
"""


def test_a_killed_launch_resumes_in_one_process_byte_identical(setup, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed mid-unit; rank 0 stops with a clear error; one process finishes the store as if nothing happened."""
    model, glue, reference = setup
    out = tmp_path / "cache"
    probe = tmp_path / "killed_rank.py"
    probe.write_text(KILLED_RANK)
    ranks = launch(lambda rank: [probe, *BUILD, "--model", model, "--data-dir", glue, "--out", out])
    assert ranks[1].returncode == -9
    assert ranks[0].returncode == 2, ranks[0].stderr[-3000:]
    assert error_lines(ranks[0].stderr) and "rerun the same command" in ranks[0].stderr
    with pytest.raises(ReadCacheError, match="incomplete"):
        read_cache.open_cache(out).require_complete()
    done = read_cache.open_cache(out)["train"].array("units_done")[...]
    assert 0 < done.sum() < len(done)  # killed mid-way: some units durable, not all
    with one_thread():
        report = build_cache(BuildConfig(model=str(model), task="sst2", data_dir=glue, out=out, chunk_mb=SMALL_CHUNKS, batch_size=8, dtype="fp32", progress=False))
    assert report.splits[0].units_written == len(done) - done.sum()  # what was durable is never recomputed
    assert_identical(out, reference, error_record=False)


@pytest.mark.slow  # two more launches; run with: pytest -m slow tests/test_distributed.py
def test_a_launch_killed_whole_resumes_with_the_same_command(setup, tmp_path: Path) -> None:
    """Every rank SIGKILLed from outside, wherever the build is; the same launch again finishes it byte-identical."""
    model, glue, reference = setup
    out = tmp_path / "cache"
    argv = lambda rank: cli(*BUILD, "--model", model, "--data-dir", glue, "--out", out)  # noqa: E731
    procs = start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = out / "train" / "units_done" / "c"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (flags.is_dir() and any(flags.iterdir())) and all(p.poll() is None for p in procs):
        time.sleep(0.005)
    for p in procs:
        p.kill()
        p.wait()
    assert not read_cache.open_cache(out).split_status("test").get("complete")  # killed before the end
    ranks = launch(argv)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
    assert_identical(out, reference)


# --------------------------------------------------------------------------------------------------
# Bad launches


def test_ranks_with_different_arguments_are_refused(setup, tmp_path: Path) -> None:
    model, glue, _ = setup
    out = tmp_path / "cache"
    ranks = launch(lambda rank: cli(*BUILD, "--model", model, "--data-dir", glue, "--out", out, *(["--limit", 50] if rank else [])))
    assert [r.returncode for r in ranks] == [2, 2]
    (line,) = error_lines(ranks[0].stderr)
    assert "different arguments" in line and "rank 1 has --limit 50 where rank 0 has None" in line
    assert error_lines(ranks[1].stderr) == []  # rank 0 speaks for the launch
    assert not out.exists()


def test_a_rank_that_cannot_see_the_store_is_refused(setup, tmp_path: Path) -> None:
    """A relative --out from another folder stands for a node whose disk is not shared."""
    model, glue, _ = setup
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    ranks = launch(lambda rank: cli(*BUILD, "--model", model, "--data-dir", glue, "--out", "cache"), cwd_of_rank=lambda rank: tmp_path / f"node{rank}")
    assert [r.returncode for r in ranks] == [2, 2], ranks[0].stderr[-3000:]
    (line,) = error_lines(ranks[0].stderr)
    assert "rank 1 of 2" in line and "cannot see the store" in line
    assert not (tmp_path / "node1" / "cache").exists()
    store = tmp_path / "node0" / "cache"
    # Nothing torn: the root of an empty cache, no split, no record; a later build continues it (as the killed tests show).
    assert not read_cache.open_cache(store).splits and not (store / LAUNCH_RECORD).exists()


LEAVE_SCRIPT = """
import os
from read_cache import distributed
with distributed.session("cpu") as launch:
    import torch.distributed.nn.functional  # as transformers' model imports do, inside the group
    distributed.barrier(launch)
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads left:", sorted(t for t in threads if "gloo" in t))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_a_session_leaves_no_gloo_thread_behind() -> None:
    # A group still alive after destroy_process_group runs its gloo threads until the process exits, where a rank
    # could abort ("terminate called without an active exception", exit -6): CI once saw it on the refused launch
    # below. torch.distributed.nn.functional, imported inside the group, held it through its functions' defaults.
    ranks = launch(lambda rank: ["-c", LEAVE_SCRIPT])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
    assert [r.stdout.strip() for r in ranks] == ["gloo threads left: []"] * 2


def test_a_second_launch_into_a_store_being_built_is_refused(setup, tmp_path: Path) -> None:
    model, glue, reference = setup
    out = tmp_path / "cache"
    out.mkdir()
    before = cache_files(reference)
    with BuildLock(reference):  # a build holds the store (as rank 0 of a launch would)
        ranks = launch(lambda rank: cli(*BUILD, "--model", model, "--data-dir", glue, "--out", reference))
    # Both stop with exit 2: the ranks leave the process group in order (`group.leave`), so gloo never aborts
    # rank 1 (SIGABRT) by tearing rank 0's connections down under it, as it once did in ~10 runs on 2 cores; and no
    # group outlives its session to abort a rank at exit (`test_a_session_leaves_no_gloo_thread_behind`).
    assert [r.returncode for r in ranks] == [2, 2], ranks[1].stderr[-3000:]
    (line,) = error_lines(ranks[0].stderr)
    assert "another build is writing" in line
    assert error_lines(ranks[1].stderr) == []
    assert cache_files(reference) == before


# --------------------------------------------------------------------------------------------------
# The sweep


def test_two_rank_sweep_equals_the_one_process_sweep(setup, tmp_path: Path) -> None:
    model, glue, reference = setup
    flags = ["--rnn", "gru,lstm", "--dim", 8, "--lr", "1e-2,3e-3", "--epochs", 3, "--batch-size", 16, "--search", "halving", "--eta", 2, "--threads", 1]
    ranks = launch(lambda rank: cli("sweep", "--cache", reference, *flags, "--out", tmp_path / "two", "--no-progress"))
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
    shared = TrainConfig(cache=reference, epochs=3, batch_size=16, threads=1, progress=False)
    one = sweep(SweepConfig(out=tmp_path / "one", rnn=("gru", "lstm"), dim=(8,), lr=(1e-2, 3e-3), search="halving", eta=2, shared=shared))
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert two["world_size"] == 2 and two["configurations"] == one["configurations"] == 4
    different = {"run_dir"}  # the runs live under each sweep's own --out
    for a, b in zip(one["configs"], two["configs"], strict=True):
        assert {k: v for k, v in a.items() if k not in different} == {k: v for k, v in b.items() if k not in different}
    assert one["best"]["name"] == two["best"]["name"]
    assert {e["ended"] for e in two["configs"]} >= {"halved"}  # halving decided over both ranks' configurations
    assert sorted(p.name for p in (tmp_path / "two" / "runs").iterdir()) == [e["name"] for e in two["configs"]]


# --------------------------------------------------------------------------------------------------
# Data-parallel training


STEP_HASHES = """
import hashlib, json, os, sys
from pathlib import Path
from read_cache.training import train
from read_cache.cli import main

original, log = train.train_step, Path(os.environ["STEP_LOG"]) / f"rank{os.environ['RANK']}.jsonl"

def train_step(run, optimizer, batch, weight=1.0):
    loss = original(run, optimizer, batch, weight)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in run.net.parameters())).hexdigest()
    with log.open("a") as f:
        f.write(json.dumps({"weights": digest, "rows": batch["rows"].tolist() if weight else []}) + "\\n")
    return loss

train.train_step = train_step
sys.argv[0] = "read-cache"
main()
"""


def test_data_parallel_training_keeps_the_ranks_in_step(setup, tmp_path: Path) -> None:
    """Weights equal on both ranks after every step; each epoch's shares are disjoint and cover train; one run folder, one reporter."""
    _, _, reference = setup
    probe = tmp_path / "step_hashes.py"
    probe.write_text(STEP_HASHES)
    logs = tmp_path / "steps"
    logs.mkdir()
    run = tmp_path / "run"
    os.environ["STEP_LOG"] = str(logs)
    try:
        ranks = launch(lambda rank: [probe, "train", "--cache", reference, "--dim", 8, "--epochs", 2, "--batch-size", 16, "--out", run, "--no-progress", "--report-to", "tensorboard"])
    finally:
        del os.environ["STEP_LOG"]
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
    steps = [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(steps[0]) == len(steps[1]) > 4
    assert [s["weights"] for s in steps[0]] == [s["weights"] for s in steps[1]]
    assert len({s["weights"] for s in steps[0]}) == len(steps[0])  # every step changed them
    n_train = len(read_cache.open_cache(reference)["train"])
    half = len(steps[0]) // 2  # two epochs of equal step counts
    for epoch in (steps[0][:half], steps[1][:half]), (steps[0][half:], steps[1][half:]):
        rows = [sorted(row for s in share for row in s["rows"]) for share in epoch]
        assert not set(rows[0]) & set(rows[1])
        assert sorted(rows[0] + rows[1]) == list(range(n_train))
        assert abs(len(rows[0]) - len(rows[1])) < n_train // 4  # balanced shares
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "metrics.jsonl", "side_network.safetensors", "summary.json", "tensorboard"]
    assert len(list((run / "tensorboard").iterdir())) == 1  # rank 0 alone reports
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------------------------------
# The pieces, without processes


def test_shares_are_disjoint_balanced_and_whole_for_one_process() -> None:
    assert round_robin(list(range(7)), 1, 3) == [1, 4]
    shares = balanced([5, 1, 1, 1, 5, 1], 2)
    assert sorted(shares[0] + shares[1]) == list(range(6)) and not set(shares[0]) & set(shares[1])
    assert balanced([3, 4], 1) == [[0, 1]]
    bounds = [(i * 10, i * 10 + 10) for i in range(9)]
    whole = epoch_windows(bounds, shuffle=True, seed=1, epoch=2, shuffle_blocks=2)
    assert [w.blocks for w in whole] == [w.blocks for w in epoch_windows(bounds, shuffle=True, seed=1, epoch=2, shuffle_blocks=2, rank=0, world_size=1)]
    parts = [epoch_windows(bounds, shuffle=True, seed=1, epoch=2, shuffle_blocks=2, rank=r, world_size=2) for r in (0, 1)]
    rows = [np.concatenate([w.order for w in part]) for part in parts]
    assert sorted(np.concatenate(rows).tolist()) == list(range(90)) and abs(len(rows[0]) - len(rows[1])) <= 10


def test_the_launch_is_read_from_torchrun_variables() -> None:
    assert detect({}).world_size == 1 and detect({}).is_main
    launch_ = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"})
    assert (launch_.rank, launch_.world_size, launch_.local_rank, launch_.local_world_size, launch_.run_id) == (3, 8, 1, 4, "x")
    assert launch_.distributed and not launch_.is_main
    with pytest.raises(ReadCacheError, match="torchrun"):
        detect({"RANK": "a", "WORLD_SIZE": "2"})


def test_store_digest_helper_sees_a_flipped_byte(setup, tmp_path: Path) -> None:
    """The comparison above can fail: a copy with one byte changed is not identical."""
    import shutil

    _, _, reference = setup
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    flip_byte_in_a_chunk(copy, "train/encoder_hidden", 1)
    with pytest.raises((AssertionError, ValueError)):  # zarr's checksum or our comparison, whichever looks first
        assert_identical(copy, reference)
    assert cache_files(copy) != cache_files(reference)


class FakeStore:
    """The part of torch's Store that `group.leave` uses, shared by threads standing in for ranks."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.waits: list[tuple[int, list[str]]] = []
        self.changed = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def wait(self, keys: list[str], timeout: datetime.timedelta) -> None:
        self.waits.append((threading.get_ident(), list(keys)))
        with self.changed:
            if not self.changed.wait_for(lambda: all(k in self.values for k in keys), timeout.total_seconds()):
                raise RuntimeError(f"timed out waiting for {keys}")


def leave_as_threads(in_step: dict[int, bool], world: int, store: FakeStore) -> list[int]:
    """Run `group.leave` for the ranks in `in_step`, rank 0's thread first; the ranks in the order they destroyed."""
    from read_cache.distributed.env import Launch
    from read_cache.distributed.group import leave

    destroyed: list[int] = []
    lock = threading.Lock()

    def rank_leaves(rank: int) -> None:
        def destroy() -> None:
            with lock:
                destroyed.append(rank)

        leave(Launch(rank, world, rank, world), store, "t", in_step=in_step[rank], destroy=destroy)

    threads = [threading.Thread(target=rank_leaves, args=(rank,)) for rank in sorted(in_step)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert not any(thread.is_alive() for thread in threads)
    return destroyed


def test_ranks_leave_the_group_highest_first_and_rank_zero_last() -> None:
    """Ranks that end in step destroy their groups one by one from the top, whatever order they arrive in:
    no rank closes its connections under another that still has its group (gloo's SIGABRT at teardown)."""
    store = FakeStore()
    assert leave_as_threads({0: True, 1: True, 2: True}, 3, store) == [2, 1, 0]
    assert store.values == {"t/arrived/0": "in step", "t/arrived/1": "in step", "t/arrived/2": "in step", "t/left/1": "1", "t/left/2": "1"}


def test_a_rank_that_fails_alone_leaves_at_once_and_no_one_waits_for_it() -> None:
    """A failing rank must not wait for ranks that may be mid-work; it marks itself, so the others never wait on it."""
    store = FakeStore()
    assert leave_as_threads({1: False}, 3, store) == [1]  # ranks 0 and 2 have not arrived: rank 1 does not wait for them
    assert store.waits == [] and store.values == {"t/arrived/1": "failed", "t/left/1": "1"}
    assert leave_as_threads({0: True, 2: True}, 3, store) == [2, 0]  # the others then leave, in order


def test_rank_zero_counts_the_units_other_ranks_make_durable() -> None:
    """The poller reports each watched unit once, as the store marks it done, and the rest after the barrier."""
    from read_cache.distributed import UnitPoller

    done = np.zeros(6, dtype=np.uint8)
    seen: list[list[int]] = []
    with UnitPoller(lambda: done.copy(), [1, 3, 5], seen.append, every=0.01) as poller:
        done[[0, 1]] = 1  # unit 0 is rank 0's own: not watched
        deadline = time.time() + HANG_GUARD_S  # a hang guard: the poller thread may be slow to run on a loaded machine
        while not seen and time.time() < deadline:
            time.sleep(0.01)
        done[[3, 5]] = 1
    assert seen[0] == [1] and sorted(u for batch in seen for u in batch) == [1, 3, 5] and not poller.waiting
