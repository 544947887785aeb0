"""Where caches and runs live when the user does not say.

Caches default to `$READ_CACHE_HOME/caches/<model>/<task>` (READ_CACHE_HOME defaults to
`~/.cache/read-cache`); the last cache built is remembered in `$READ_CACHE_HOME/last-cache` so that
`read-cache train` with no `--cache` picks it up (a folder or an object-store URL; storage options are
not remembered, since they may hold secrets: credentials come from the environment). Runs default to `./runs/<task>-<rnn><dim>-<head>-<time>`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from read_cache.store.location import is_url

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


def record_last_cache(path: Path | str | object) -> None:
    """Remember a cache folder (absolute) or URL (as given) for `train` without `--cache`."""
    home = cache_home()
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / "last-cache.tmp"
    tmp.write_text((str(path) if is_url(path) else str(Path(str(path)).resolve())) + "\n")
    tmp.replace(home / "last-cache")


def forget_last_cache() -> None:
    (cache_home() / "last-cache").unlink(missing_ok=True)


def last_cache() -> Path | str | None:
    """The last cache built: a Path, or a URL string."""
    pointer = cache_home() / "last-cache"
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    return text if is_url(text) else Path(text)


def default_run_dir(task: str, rnn: str, dim: int, head: str) -> Path:
    return Path("runs") / f"{task}-{rnn}{dim}-{head}-{time.strftime('%Y%m%d-%H%M%S')}"
