"""Training that survives interruption: a checkpoint at every epoch end, and finding the run to resume.

    read-cache train --cache C --epochs 30     # Ctrl-C (or kill -9) during epoch 13 ...
    read-cache train --cache C --epochs 30     # ... "resuming runs/sst2-gru256-lm-... from epoch 13"

After every epoch `train` replaces RUN/checkpoint.pt, and `sweep` replaces SWEEP/checkpoint.pt, atomically
(a temporary file in the same folder, fsync, os.replace, fsync of the folder). A checkpoint holds what the
next epoch needs to go on exactly as if nothing had happened:

    epoch                 the last epoch trained; the next one starts at epoch + 1
    members               {name: member}; a run has one member named ""
      net, optimizer      the side network and its AdamW state (None once a sweep member has left the pass)
      stopping            early stopping: best score, epoch, state and validation outputs, history, counters
    ended                 sweep only: why each configuration left the pass ('early stop', 'halved', ...)
    timeline              sweep only: where each epoch's time went
    rng                   torch (and CUDA), numpy and python RNG states

metrics.jsonl is rewritten from the checkpoint's history on resume, so a line written for an epoch whose
checkpoint never landed disappears. The checkpoint is deleted once summary.json (sweep.json) is written.

Which folder to resume: a run folder is *interrupted* when its config.json exists and its summary.json
does not; the same command finds it (the newest interrupted run under ./runs with the same training
config and cache; or the --out given) and goes on. Each folder in use is flock'ed, so a second command
never resumes a run that is still training. Loading uses `torch.load(weights_only=True)`: a checkpoint
holds tensors and plain Python values only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from read_cache.errors import ReadCacheError
from read_cache.store import fsync_path

if TYPE_CHECKING:
    from read_cache.training.train import EarlyStopping, Run

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
KILL_ENV = "READ_CACHE_TEST_KILL"
"""Test-only: 'before:K', 'written:K' or 'after:K' SIGKILLs this process around the checkpoint of epoch K
(before it is written, written but not yet in place, in place); a ':int' suffix sends Ctrl-C instead."""

# TrainConfig fields a rerun may change without changing a single number: where it writes, whether it
# shows bars, how the reader holds the splits (RAM and streaming yield identical batches), and the cache's
# spelling (its identity is compared through config.json's "cache" record).
VOLATILE = frozenset({"cache", "out", "overwrite", "progress", "reader", "memory_budget_gb"})


# --------------------------------------------------------------------------------------------------
# Claiming a folder: fresh, resumed, or refused


def claim(out: Path, record: dict[str, Any], *, overwrite: bool, config: str, done: str, what: str = "run") -> bool:
    """Lock `out` for this process; True when it holds an interrupted `what` of the same config to resume.

    `config` names the file written first (the record), `done` the file written last. A finished folder and
    any other non-empty folder are left to the caller's --overwrite rules; an interrupted folder of another
    config is refused unless --overwrite. An interrupted folder of the same config resumes even with
    --overwrite: resuming ends exactly where starting over would.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock(out, flag="--out")
    (out / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
    saved = read_json(out / config)
    if saved is None or (out / done).exists():
        return False
    differ = differences(saved, record)
    if not differ:
        return True
    if overwrite:
        return False
    raise ReadCacheError(
        f"--out {out} holds an interrupted {what} of another configuration (it differs in {', '.join(differ)}); "
        "pass --overwrite to start over there, or choose another --out"
    )


def find_interrupted(root: Path, record: dict[str, Any], *, config: str, done: str) -> Path | None:
    """The newest folder under `root` holding an interrupted run of this config that no process is training."""
    if not root.is_dir():
        return None
    candidates = []
    for folder in root.iterdir():
        saved = read_json(folder / config)
        if saved is not None and not (folder / done).exists():
            candidates.append(((folder / config).stat().st_mtime, folder, saved))
    for _, folder, saved in sorted(candidates, key=lambda c: c[0], reverse=True):
        differ = differences(saved, record)
        if differ:  # worth a line when the cache is the same: likely the same command with a flag changed
            level = logging.DEBUG if any(d.startswith("cache.") for d in differ) else logging.INFO
            log.log(level, "not resuming %s: another configuration (it differs in %s)", folder, ", ".join(differ))
        elif try_lock(folder):
            return folder
    return None


def unused(folder: Path) -> Path:
    """`folder`, or `folder-2`, `folder-3`... when runs started within one second would share a default name."""
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


def differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """Where a folder's config.json and this command's differ, ignoring what cannot change a number."""
    return _differ(comparable(saved), comparable(record), "")


def _differ(a: Any, b: Any, where: str) -> list[str]:
    """Dotted names of the differing fields; the flags' own sections ('train', 'sweep', 'shared') unnamed."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [where]
    out = []
    for key in sorted(a.keys() | b.keys()):
        inner = key if not where or where in ("train", "sweep", "shared") else f"{where}.{key}"
        out += _differ(a.get(key), b.get(key), inner)
    return out


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The record through JSON (tuples -> lists, Paths -> str), without the fields in VOLATILE."""
    plain = json.loads(json.dumps(record, default=str))
    if isinstance(plain.get("train"), dict):
        plain["train"] = {k: v for k, v in plain["train"].items() if k not in VOLATILE}
    if isinstance(plain.get("sweep"), dict):
        sweep = {k: v for k, v in plain["sweep"].items() if k not in ("out", "overwrite")}
        if isinstance(sweep.get("shared"), dict):
            sweep["shared"] = {k: v for k, v in sweep["shared"].items() if k not in VOLATILE}
        plain["sweep"] = sweep
    return plain


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# Folders this process holds: path -> open descriptor. flock belongs to the open file, so a second open
# in the same process would block itself; a rerun in the same process (tests, a notebook) reuses it.
_held: dict[Path, int] = {}


def lock(folder: Path, *, flag: str) -> None:
    if not try_lock(folder):
        raise ReadCacheError(f"another read-cache process is training in {flag} {folder} right now; wait for it or choose another {flag}")


def try_lock(folder: Path) -> bool:
    """An exclusive flock on the folder, dropped by the kernel when the process dies (even by kill -9)."""
    key = folder.resolve()
    if key in _held:
        return True
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _held[key] = fd
    return True


def release(folder: Path) -> None:
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)


def finished(folder: Path) -> None:
    """The folder's last file is written: its checkpoint is no longer needed, and the folder is free."""
    (folder / CHECKPOINT).unlink(missing_ok=True)
    release(folder)


# --------------------------------------------------------------------------------------------------
# One training run


def save_fit(run: Run, optimizer: torch.optim.Optimizer, stopping: EarlyStopping, epoch: int, *, stopped: bool) -> None:
    """RUN/checkpoint.pt after `epoch`; `stopped` when early stopping ended the run there."""
    if not getattr(stopping, "writes", True):  # under torchrun (issue 10) rank 0 alone writes the run folder
        return
    member = member_state(run.net, optimizer, stopping, active=True)
    save(run.out, {"kind": "train", "epoch": epoch, "stopped": stopped, "members": {"": member}}, epoch)


def resume_fit(run: Run, optimizer: torch.optim.Optimizer, stopping: EarlyStopping) -> int:
    """Restore RUN/checkpoint.pt if there is one; the first epoch to train (past --epochs when none is left)."""
    state = load(run.out)
    if state is None:
        return 1
    restore_member(run.net, optimizer, stopping, state["members"][""])
    first = run.cfg.epochs + 1 if state["stopped"] else state["epoch"] + 1
    say_resuming(run.out, state["epoch"], first, run.cfg.epochs)
    return first


# --------------------------------------------------------------------------------------------------
# A sweep


def save_sweep(out: Path, epoch: int, members: Iterable[Any], timeline: list[dict[str, Any]]) -> None:
    """SWEEP/checkpoint.pt after `epoch`: every member (nets and optimizers only of those still training)."""
    members = list(members)
    state = {
        "kind": "sweep",
        "epoch": epoch,
        "members": {m.name: member_state(m.run.net, m.optimizer, m.stopping, active=m.ended is None) for m in members},
        "ended": {m.name: m.ended for m in members},
        "timeline": timeline,
    }
    save(out, state, epoch)


def resume_sweep(out: Path, members: Iterable[Any], timeline: list[dict[str, Any]], epochs: int) -> int:
    """Restore SWEEP/checkpoint.pt into `members` and `timeline` if there is one; the first epoch to train."""
    state = load(out)
    if state is None:
        return 1
    members = list(members)
    missing = sorted({m.name for m in members} - state["members"].keys())
    if missing:
        raise ReadCacheError(f"{out / CHECKPOINT} has no state for {', '.join(missing)}; pass --overwrite to start the sweep over")
    for member in members:
        restore_member(member.run.net, member.optimizer, member.stopping, state["members"][member.name])
        member.ended = state["ended"][member.name]
    timeline[:] = state["timeline"]
    say_resuming(out, state["epoch"], state["epoch"] + 1, epochs)
    return state["epoch"] + 1


# --------------------------------------------------------------------------------------------------
# What a member's state is


def member_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None, stopping: EarlyStopping, *, active: bool) -> dict[str, Any]:
    """A network's training state; a member that left the pass needs only its early-stopping record."""
    return {
        "net": net.state_dict() if active else None,
        "optimizer": optimizer.state_dict() if active and optimizer is not None else None,
        "stopping": stopping_state(stopping),
    }


def restore_member(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None, stopping: EarlyStopping, state: dict[str, Any]) -> None:
    if state["net"] is not None:
        net.load_state_dict(state["net"])
    if state["optimizer"] is not None and optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    restore_stopping(stopping, state["stopping"])


def stopping_state(stopping: EarlyStopping) -> dict[str, Any]:
    validation = stopping.best_validation
    return {
        "best_score": stopping.best_score,
        "best_epoch": stopping.best_epoch,
        "best_state": stopping.best_state,
        "best_validation": None if validation is None else [torch.from_numpy(np.ascontiguousarray(a)) for a in validation],
        "epoch": stopping.epoch,
        "seen": stopping.seen,
        "seconds": stopping.seconds,
        "last": stopping.last,
        "history": stopping.history,
    }


def restore_stopping(stopping: EarlyStopping, state: dict[str, Any]) -> None:
    """Put the early-stopping record back, and metrics.jsonl with it (one line per checkpointed epoch)."""
    from read_cache.training.train import METRICS, Evaluation

    stopping.best_score, stopping.best_epoch, stopping.best_state = state["best_score"], state["best_epoch"], state["best_state"]
    validation = state["best_validation"]
    stopping.best_validation = None if validation is None else Evaluation(*(t.numpy() for t in validation))
    stopping.epoch, stopping.seen, stopping.seconds, stopping.last = state["epoch"], state["seen"], state["seconds"], state["last"]
    stopping.history = list(state["history"])
    if getattr(stopping, "writes", True):
        lines = "".join(json.dumps(record) + "\n" for record in stopping.history)
        write_atomically(stopping.run.out / METRICS, lines.encode())


# --------------------------------------------------------------------------------------------------
# Files and RNGs


def save(folder: Path, state: dict[str, Any], epoch: int) -> None:
    """Write the checkpoint durably: a crash leaves either the previous one or this one, never half of one."""
    kill_point("before", epoch)
    state = {"format": FORMAT, **state, "rng": rng_state()}
    tmp = folder / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    kill_point("written", epoch)
    os.replace(tmp, folder / CHECKPOINT)
    fsync_path(folder)  # makes the rename itself durable, not only the file's bytes
    kill_point("after", epoch)


def load(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file cannot happen through os.replace, but a disk can fail
        raise ReadCacheError(f"{path} cannot be read ({type(e).__name__}); pass --overwrite to start over") from None
    if state.get("format") != FORMAT:
        raise ReadCacheError(f"{path} is checkpoint format {state.get('format')}, not {FORMAT}; pass --overwrite to start over")
    set_rng_state(state["rng"])
    return state


def checkpoint_epoch(folder: Path) -> int | None:
    """The epoch a folder's checkpoint holds, or None when it has none (read without loading the tensors)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG training could draw from. Today nothing draws after the network is built (the reader's order
    comes from (seed, epoch) alone and there is no dropout), but a resumed run must not depend on that."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def say_resuming(folder: Path, done: int, first: int, epochs: int) -> None:
    if first > epochs:
        log.info("resuming %s after epoch %d: training had ended, scoring and saving", folder, done)
    else:
        log.info("resuming %s from epoch %d (epochs 1-%d are in its checkpoint)", folder, first, done)


def kill_point(stage: str, epoch: int) -> None:
    """Die as kill -9 would (or take Ctrl-C with ':int') where a test asked: READ_CACHE_TEST_KILL=STAGE:EPOCH[:int]."""
    asked = os.environ.get(KILL_ENV, "")
    if asked.removesuffix(":int") == f"{stage}:{epoch}":
        import signal

        os.kill(os.getpid(), signal.SIGINT if asked.endswith(":int") else signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# predict on an unfinished run


def unfinished_message(run_dir: Path) -> str:
    """Why a run folder with a config.json but no weights cannot be used yet, and how to finish it."""
    from read_cache.training.sweep import RUNS, SWEEP_CONFIG

    epoch, command = checkpoint_epoch(run_dir), "read-cache train"
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name == RUNS and (sweep_dir / SWEEP_CONFIG).is_file():
        epoch, command = checkpoint_epoch(sweep_dir), "read-cache sweep"
    when = f"interrupted at epoch {epoch}" if epoch else "interrupted before its first epoch ended"
    return f"{run_dir} holds an unfinished run ({when}); rerun the same `{command}` command to finish it"
