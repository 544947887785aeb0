"""Training that survives interruption: a checkpoint at every epoch end, and finding the run to resume.

    read-cache train --cache C --epochs 30     # Ctrl-C (or kill -9) during epoch 13 ...
    read-cache train --cache C --epochs 30     # ... "resuming runs/sst2-gru256-lm-... from epoch 13"

After every epoch `train` replaces RUN/checkpoint.pt, and `sweep` replaces SWEEP/checkpoint.pt, atomically
(a temporary file in the same folder, fsync, os.replace, fsync of the folder). A checkpoint holds what the
next epoch needs to go on exactly as if nothing had happened:

    epoch                 the last epoch trained; the next one starts at epoch + 1
    kind                  'train', 'method' or 'sweep'
    members               {name: member}; a run has one member named ""
      net, optimizer      the trained weights and their AdamW state (None once a member has left the pass)
      stopping            early stopping's state_dict(): best score, epoch, state and validation outputs, history
    ended                 why each member left the pass ('early stop', 'halved', ...; None while training)
    stopped               the lone member stopped early (what format-1 run checkpoints had instead of `ended`)
    timeline              where each epoch's time went
    rng                   torch (and CUDA), numpy and python RNG states

metrics.jsonl is rewritten from the checkpoint's history on resume, so a line written for an epoch whose
checkpoint never landed disappears. The checkpoint is deleted once summary.json (sweep.json) is written.

Which folder to resume is `training.runs`' business (an interrupted folder: its first file written, its last
not). `read-cache train`, `train --method` and `sweep` checkpoint the same way: a run is a pass of one member
(named ""), a sweep of many (`training.engine.Member.state_dict`). Loading uses `torch.load(weights_only=True)`:
a checkpoint holds tensors and plain Python values only.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from read_cache.errors import ReadCacheError
from read_cache.training.engine import Member
from read_cache.training.runs import CHECKPOINT, RUNS, SWEEP_CONFIG
from read_cache.util.files import fsync_path

log = logging.getLogger(__name__)

FORMAT = 1
KILL_ENV = "READ_CACHE_TEST_KILL"
"""Test-only: 'before:K', 'written:K' or 'after:K' SIGKILLs this process around the checkpoint of epoch K
(before it is written, written but not yet in place, in place); a ':int' suffix raises Ctrl-C's KeyboardInterrupt there instead."""


# --------------------------------------------------------------------------------------------------
# A pass's members


def save_members(folder: Path, kind: str, epoch: int, members: Iterable[Member], timeline: list[dict[str, Any]]) -> None:
    """FOLDER/checkpoint.pt after `epoch`: every member (weights and optimizers only of those still training)."""
    members = list(members)
    state = {
        "kind": kind,
        "epoch": epoch,
        "members": {m.name: m.state_dict() for m in members},
        "ended": {m.name: m.ended for m in members},
        "stopped": any(m.ended == "early stop" for m in members),
        "timeline": timeline,
    }
    save(folder, state, epoch)


def resume_members(folder: Path, members: Iterable[Member], timeline: list[dict[str, Any]], epochs: int) -> int:
    """Restore FOLDER/checkpoint.pt into `members` and `timeline` if there is one; the first epoch to train."""
    state = load(folder)
    if state is None:
        return 1
    members = list(members)
    missing = sorted({m.name for m in members} - state["members"].keys())
    if missing:
        raise ReadCacheError(f"{folder / CHECKPOINT} has no state for {', '.join(missing)}; pass --overwrite to start over")
    for member in members:
        member.load_state_dict(state["members"][member.name])
        if "ended" in state:
            member.ended = state["ended"][member.name]
        elif state.get("stopped"):  # a run checkpoint written before `ended` was recorded
            member.ended = "early stop"
    timeline[:] = state.get("timeline", [])
    first = epochs + 1 if all(m.ended is not None for m in members) else state["epoch"] + 1
    say_resuming(folder, state["epoch"], first, epochs)
    return first


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
        if asked.endswith(":int"):  # what Python's SIGINT handler raises, here and now: a signal sent to the
            raise KeyboardInterrupt  # process may land on a reader thread and reach the main one only later
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# predict on an unfinished run


def unfinished_message(run_dir: Path) -> str:
    """Why a run folder with a config.json but no weights cannot be used yet, and how to finish it."""
    epoch, command = checkpoint_epoch(run_dir), "read-cache train"
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name == RUNS and (sweep_dir / SWEEP_CONFIG).is_file():
        epoch, command = checkpoint_epoch(sweep_dir), "read-cache sweep"
    when = f"interrupted at epoch {epoch}" if epoch else "interrupted before its first epoch ended"
    return f"{run_dir} holds an unfinished run ({when}); rerun the same `{command}` command to finish it"
