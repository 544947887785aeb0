"""Run folders: what they hold, and claiming one (fresh, resumed, or refused) the same way for every command.

    RUN/                         read-cache train (READ)         | train --method (a baseline)
      config.json                written first: the record of what trains (`config.record`, secrets masked)
      metrics.jsonl              one JSON line per epoch
      side_network.safetensors   READ's weights                  | method.safetensors: the trainable part
      curves.png                 training loss and validation score per epoch, the best epoch marked
      tensorboard/, wandb/       with --report-to tensorboard / wandb (`training.report`)
      summary.json               written last: its presence means the run is done
      checkpoint.pt              while training: the state after the last epoch (`training.checkpoint`)

    SWEEP/                       read-cache sweep
      sweep-config.json          written first
      runs/NN-<rnn><dim>-<head>-lr<lr>/   one run folder per configuration, as above
      checkpoint.pt, sweep.png
      sweep.json                 written last

A folder is *interrupted* when its first file exists and its last does not; the same command finds it (the
--out given, or the newest interrupted run of the same record under ./runs) and resumes it. Each folder in use
is held by its process (`util.files.hold`), so a second command never resumes a run that is still training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from read_cache.errors import ReadCacheError
from read_cache.util.files import hold, read_json, release, remove, write_json

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "side_network.safetensors"
METHOD_WEIGHTS = "method.safetensors"
CURVES = "curves.png"
CHECKPOINT = "checkpoint.pt"
TENSORBOARD = "tensorboard"
"""RUN/tensorboard/: --report-to tensorboard's event files (`training.report`)."""
WANDB = "wandb"
"""RUN/wandb/: W&B's files for the run (wandb.init(dir=RUN) makes this folder)."""
REPORTS = (TENSORBOARD, WANDB)
ARTIFACTS = (WEIGHTS, CONFIG, METRICS, SUMMARY, CURVES, *REPORTS)
"""A READ run's own files and folders (what --overwrite replaces: old events beside new ones would show two runs as one)."""
METHOD_ARTIFACTS = (METHOD_WEIGHTS, CONFIG, METRICS, SUMMARY, CURVES, *REPORTS)
SWEEP_CONFIG = "sweep-config.json"
SWEEP_REPORT = "sweep.json"
SWEEP_CHART = "sweep.png"
SWEEP_ARTIFACTS = (SWEEP_REPORT, SWEEP_CHART, SWEEP_CONFIG)
RUNS = "runs"
"""A sweep's run folders live in SWEEP/runs/."""

# Fields of a command's record a rerun may change without changing a single number: where it writes, whether
# it shows bars, how the reader holds the splits (every tier yields identical batches), where metrics are
# reported, and the cache's spelling (its identity is compared through the record's "cache" entry).
VOLATILE = frozenset({"cache", "out", "overwrite", "progress", "reader", "memory_budget_gb", "device_memory_budget_gb", "report_to"})


def claim_folder(
    out: Path, record: dict[str, Any] | None, *, overwrite: bool, own_files: tuple[str, ...], first: str | None, last: str, what: str = "run"
) -> bool:
    """Hold `out` for this process and decide what happens there; True when it holds an interrupted `what` to resume.

    `first` names the file the record goes into (written here, atomically; None: nothing resumes), `last` the
    file written when done. A finished folder, or any other non-empty one, is refused unless --overwrite (which
    deletes only `own_files`, files or folders, and the checkpoint); an interrupted folder of another record
    likewise; an interrupted folder of the same record resumes even with --overwrite, since resuming ends
    exactly where starting over would.
    """
    if out.exists() and not out.is_dir():
        raise ReadCacheError(f"--out {out} is a file; choose a folder for the {what}")
    out.mkdir(parents=True, exist_ok=True)
    if not hold(out):
        raise ReadCacheError(f"another read-cache process is training in --out {out} right now; wait for it or choose another --out")
    (out / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
    resuming = first is not None and record is not None and _resumable(out, record, overwrite=overwrite, first=first, last=last, what=what)
    if not resuming and any(out.iterdir()):
        if not overwrite:
            raise ReadCacheError(f"--out {out} exists; pass --overwrite or choose another --out")
        for name in (*own_files, CHECKPOINT):
            remove(out / name)
    if first is not None and record is not None:
        write_json(out / first, record)
    return resuming


def _resumable(out: Path, record: dict[str, Any], *, overwrite: bool, first: str, last: str, what: str) -> bool:
    saved = read_json(out / first)
    if saved is None or (out / last).exists():
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


def default_folder(fresh: Path, record: dict[str, Any], *, first: str = CONFIG, last: str = SUMMARY) -> Path:
    """Where a run goes without --out: the newest interrupted run of this record beside `fresh`, else `fresh` (made unique)."""
    return find_interrupted(fresh.parent, record, first=first, last=last) or unused(fresh)


def find_interrupted(root: Path, record: dict[str, Any], *, first: str = CONFIG, last: str = SUMMARY) -> Path | None:
    """The newest folder under `root` holding an interrupted run of this record that no process is training."""
    if not root.is_dir():
        return None
    candidates = []
    for folder in root.iterdir():
        saved = read_json(folder / first)
        if saved is not None and not (folder / last).exists():
            candidates.append(((folder / first).stat().st_mtime, folder, saved))
    for _, folder, saved in sorted(candidates, key=lambda c: c[0], reverse=True):
        differ = differences(saved, record)
        if differ:  # worth a line when the cache is the same: likely the same command with a flag changed
            level = logging.DEBUG if any(d.startswith("cache.") for d in differ) else logging.INFO
            log.log(level, "not resuming %s: another configuration (it differs in %s)", folder, ", ".join(differ))
        elif hold(folder):
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
    """Where a folder's record and this command's differ, ignoring what cannot change a number."""
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


def finished(folder: Path) -> None:
    """The folder's last file is written: its checkpoint is no longer needed, and the folder is free."""
    (folder / CHECKPOINT).unlink(missing_ok=True)
    release(folder)
