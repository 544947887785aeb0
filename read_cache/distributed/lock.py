"""One launch, one writer: the build lock for a launch of many ranks.

    with launch_lock(launch, out, prepare):   # rank 0 holds the store's flock for the whole launch
        ...                                   # every rank has proved it sees the same folder

The store's `BuildLock` is an flock on the cache folder, which the kernel drops when its holder dies.
Under torchrun rank 0 takes it, so any other build (one process, or another launch's rank 0) is refused
while this launch runs; the other ranks of the launch never take it. Rank 0 then writes a launch record
(`LAUNCH_RECORD`: a fresh random token, torchrun's run id, host and pid) into the folder and broadcasts
the token; every rank reads the record back from *its* view of --out. A rank that finds no record, or
another launch's, is not looking at the same folder (a node-local disk, a different mount): the launch
stops with an error naming that rank before anything is written. Rank 0 deletes the record when done.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from read_cache.distributed.env import Launch
from read_cache.distributed.group import agree, on_main
from read_cache.errors import ReadCacheError
from read_cache.store import BuildLock
from read_cache.util.files import write_json

LAUNCH_RECORD = ".build-launch.json"


@contextlib.contextmanager
def launch_lock(launch: Launch, path: Path, prepare: Callable[[], None]) -> Iterator[None]:
    """Hold the build lock for the launch, run `prepare` on rank 0 under it, then check every rank sees `path`.

    `prepare` (create or check the store) runs before the record is written, so the record only ever
    sits in a folder that already holds a cache.
    """
    lock = BuildLock(path)
    if not launch.distributed:
        with lock:
            (path / LAUNCH_RECORD).unlink(missing_ok=True)  # a killed launch's, if any
            prepare()
            yield
        return
    on_main(launch, lock.__enter__)
    try:
        on_main(launch, lambda: ((path / LAUNCH_RECORD).unlink(missing_ok=True), prepare()))
        token = on_main(launch, lambda: write_record(path, launch))
        agree(launch, lambda: check_record(path, token, launch))
        yield
    finally:
        if launch.is_main:
            (path / LAUNCH_RECORD).unlink(missing_ok=True)
            lock.__exit__(None, None, None)


def write_record(path: Path, launch: Launch) -> str:
    """Write this launch's record atomically; returns its token."""
    token = uuid.uuid4().hex
    record = {"token": token, "run_id": launch.run_id, "host": launch.host, "pid": os.getpid(), "world_size": launch.world_size, "started": time.time()}
    write_json(path / LAUNCH_RECORD, record)
    return token


def check_record(path: Path, token: str, launch: Launch) -> None:
    """Refuse a rank whose --out is not the folder rank 0 locked."""
    where = f"{launch.describe()} cannot see the store at {path}"
    fix = "put --out on a filesystem every node mounts at the same path (and launch every rank from the same folder if it is relative)"
    try:
        record = json.loads((path / LAUNCH_RECORD).read_text())
    except FileNotFoundError:
        raise ReadCacheError(f"{where} (rank 0's launch record is not there); {fix}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ReadCacheError(f"{where} ({e}); {fix}") from None
    if record.get("token") != token:
        raise ReadCacheError(f"{where}: it holds the record of another launch (host {record.get('host')}, pid {record.get('pid')}); {fix}")
