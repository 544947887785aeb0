"""Where caches and runs live when the user does not say.

Caches default to `$READ_CACHE_HOME/caches/<model>/<task>` (READ_CACHE_HOME defaults to
`~/.cache/read-cache`); the last cache built is remembered in `$READ_CACHE_HOME/last-cache` so that
`read-cache train` with no `--cache` picks it up. Runs default to `./runs/<task>-<rnn><dim>-<head>-<time>`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

CACHE_HOME_ENV = "READ_CACHE_HOME"


def cache_home() -> Path:
    return Path(os.environ.get(CACHE_HOME_ENV) or Path.home() / ".cache" / "read-cache").expanduser()


def slug(text: str) -> str:
    """A folder name for a hub id or path: 'google-t5/t5-small' -> 'google-t5--t5-small'."""
    text = str(text).rstrip("/")
    if Path(text).is_absolute() or text.startswith("."):
        text = Path(text).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-") or "model"


def default_cache_path(model: str, task: str) -> Path:
    return cache_home() / "caches" / slug(model) / task


def record_last_cache(path: Path) -> None:
    home = cache_home()
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / "last-cache.tmp"
    tmp.write_text(str(path.resolve()) + "\n")
    tmp.replace(home / "last-cache")


def forget_last_cache() -> None:
    (cache_home() / "last-cache").unlink(missing_ok=True)


def last_cache() -> Path | None:
    pointer = cache_home() / "last-cache"
    if not pointer.is_file():
        return None
    return Path(pointer.read_text().strip())


def default_run_dir(task: str, rnn: str, dim: int, head: str) -> Path:
    return Path("runs") / f"{task}-{rnn}{dim}-{head}-{time.strftime('%Y%m%d-%H%M%S')}"
