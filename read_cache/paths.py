"""Where caches and runs live when the user does not say, and how a cache's place is spelled (a folder or a URL).

Caches default to `$READ_CACHE_HOME/caches/<model>/<task>` (READ_CACHE_HOME defaults to
`~/.cache/read-cache`); the last cache built is remembered in `$READ_CACHE_HOME/last-cache` so that
`read-cache train` with no `--cache` picks it up (a folder or an object-store URL; storage options are
not remembered, since they may hold secrets: credentials come from the environment). Runs default to `./runs/<task>-<rnn><dim>-<head>-<time>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from read_cache.errors import ReadCacheError
from read_cache.util.files import write_text

CACHE_HOME_ENV = "READ_CACHE_HOME"
URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_SECRET = re.compile(r"secret|token|password|key|credential|sas|signature", re.I)


# --------------------------------------------------------------------------------------------------
# Folders and URLs (read_cache.store.location opens them)


def is_url(where: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` (other than file://), which names a cache in a store rather than a folder."""
    match = URL_PATTERN.match(str(where))
    return bool(match) and match.group(1).lower() != "file"


def check_bucket(url: str) -> None:
    """Refuse a URL that names no bucket (s3:// alone)."""
    match = URL_PATTERN.match(url)
    if match and match.group(1).lower() != "file" and not match.group(2).strip("/"):
        raise ReadCacheError(f"{url} names no bucket; write {match.group(1).lower()}://BUCKET/PREFIX")


def check_location(flag: str, where: str | os.PathLike[str] | None, storage_options: dict[str, Any] | None) -> None:
    """Refuse, in one line, a URL with no bucket or storage options given for a local path."""
    if where is not None and is_url(where):
        check_bucket(str(where))
    elif storage_options and where is not None:
        raise ReadCacheError(f"--storage-options apply to object-store URLs, and {flag} {where} is a local path; drop them or pass a URL")


def parse_storage_options(text: str | None, flag: str = "--storage-options") -> dict[str, Any] | None:
    """The `--storage-options` JSON object, or a one-line error naming the flag."""
    if text is None or not str(text).strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReadCacheError(f"{flag} is not valid JSON ({e.msg}); pass an object such as '{{\"region\": \"eu-west-1\"}}'") from None
    if not isinstance(value, dict):
        raise ReadCacheError(f"{flag} must be a JSON object such as '{{\"region\": \"eu-west-1\"}}', not {type(value).__name__}")
    return value


def redact_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Storage options fit to write into a file or a message: values of secret-looking keys masked."""
    if options is None:
        return None
    return {k: redact_options(v) if isinstance(v, dict) else ("***" if _SECRET.search(k) else v) for k, v in options.items()}


# --------------------------------------------------------------------------------------------------
# Default places


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
    write_text(home / "last-cache", (str(path) if is_url(path) else str(Path(str(path)).resolve())) + "\n")


def forget_last_cache() -> None:
    (cache_home() / "last-cache").unlink(missing_ok=True)


def last_cache() -> Path | str | None:
    """The last cache built: a Path, or a URL string."""
    pointer = cache_home() / "last-cache"
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    return text if is_url(text) else Path(text)


def resolve_cache(cache: Path | str | None) -> Path | str:
    """The cache the user named, or the last one built (and say which)."""
    if cache is not None:
        return cache
    last = last_cache()
    if last is None:
        raise ReadCacheError("no --cache given and no cache built yet; pass --cache PATH or run `read-cache build` first")
    logging.getLogger(__name__).info("using the last cache built: %s", last)
    return last


def default_run_dir(task: str, rnn: str, dim: int, head: str) -> Path:
    return Path("runs") / f"{task}-{rnn}{dim}-{head}-{time.strftime('%Y%m%d-%H%M%S')}"
