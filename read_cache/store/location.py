"""Where a cache lives: a local folder or an object-store URL, and the zarr store that reaches it.

    loc = Location.parse("s3://bucket/caches/t5-small/sst2")       # or a path, gs://, az://, memory://
    group = zarr.open_group(loc.store(read_only=True), mode="r")

In a bucket the cache is the same plain Zarr v3 tree as on disk (`<prefix>/zarr.json`,
`<prefix>/train/encoder_hidden/c/0/0/0`, ...), so any zarr reader opens it. Which zarr store reaches it:

- a local path or `file://` URL: zarr's LocalStore (files, fsync, flock: see the build lock);
- `s3://`, `gs://`, `az://` (and their aliases): zarr's ObjectStore over obstore, the faster of the two
  candidates in our measurement (docs/object-storage.md), and the one with conditional writes
  (`mode="create"`, If-Match) on all three services, which the build lease needs;
- any other fsspec URL (`memory://`, `http://`, ...): zarr's FsspecStore.

Credentials and endpoints come from each service's standard environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; GOOGLE_SERVICE_ACCOUNT; AZURE_STORAGE_ACCOUNT_NAME,
...), or from `--storage-options JSON`, whose keys go to obstore's `from_url` (object stores) or to
fsspec (other URLs). Timeouts and retries are short by default, so an unreachable endpoint is an error
within seconds, not a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from read_cache.errors import ReadCacheError
from read_cache.paths import URL_PATTERN, check_bucket, is_url

log = logging.getLogger(__name__)

OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az", "abfs": "az", "abfss": "az", "adl": "az"}
"""URL schemes served by obstore, and the service each means."""
BACKENDS = ("obstore", "fsspec")

# Short enough that a dead endpoint fails in seconds; long enough for a 4-8 MB chunk on a slow link.
DEFAULT_CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "120s"}
DEFAULT_RETRY = {"max_retries": 3, "retry_timeout": 20.0, "backoff": {"init_backoff": 0.1, "max_backoff": 2.0, "base": 2.0}}


@dataclasses.dataclass(frozen=True)
class Location:
    """A cache's place: `path` for a local folder, else `url` (scheme://bucket/prefix) with its options."""

    url: str
    """An absolute local path, or the URL without a trailing slash."""
    path: Path | None = None
    """The folder, for local caches; None in an object store."""
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    backend: str = "local"
    """'local', 'obstore' or 'fsspec'."""

    # --- making one ----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, where: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None, *, backend: str | None = None) -> Location:
        """A Location for a path or URL; `backend` forces 'obstore' or 'fsspec' for a URL (benchmarks)."""
        if isinstance(where, Location):
            return where if storage_options is None and backend is None else cls.parse(where.url if where.path is None else where.path, storage_options, backend=backend)
        text = str(where)
        match = URL_PATTERN.match(text)
        if storage_options and not is_url(text):
            raise ReadCacheError(f"--storage-options apply to object-store URLs, and {text} is a local path; drop them or pass a URL")
        if not match:
            path = Path(text).expanduser()
            return cls(str(path.absolute()), path)
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme == "file":
            path = Path(rest if rest.startswith("/") else "/" + rest)
            return cls(str(path), path)
        check_bucket(text)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        chosen = backend or ("obstore" if scheme in OBJECT_SCHEMES else "fsspec")
        return cls(f"{scheme}://{rest.rstrip('/')}", None, dict(storage_options or {}), chosen)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def scheme(self) -> str:
        return "file" if self.is_local else self.url.split("://", 1)[0]

    def __str__(self) -> str:
        return self.url

    def resolve(self) -> Location:
        """Already absolute; here so code written for Paths (`cache.path.resolve()`) keeps working."""
        return self

    def __truediv__(self, name: str) -> Location:
        """`location / "train"`, as with a Path (messages name the array's place)."""
        return self.child(name)

    def child(self, name: str) -> Location:
        if self.path is not None:
            return dataclasses.replace(self, url=str(Path(self.url) / name), path=self.path / name)
        return dataclasses.replace(self, url=f"{self.url}/{name}")

    # --- the zarr store ---------------------------------------------------------------------------------
    def store(self, *, read_only: bool = False) -> Store:
        """The zarr store rooted at this location."""
        if self.path is not None:
            from zarr.storage import LocalStore

            return LocalStore(self.path, read_only=read_only)
        if self.backend == "obstore":
            from zarr.storage import ObjectStore

            return ObjectStore(self._client, read_only=read_only)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    @functools.cached_property
    def _client(self) -> Any:
        """One obstore client per Location, so its connections (and TLS sessions) are reused."""
        return self.obstore()

    def obstore(self) -> Any:
        """A new obstore store for this URL (object-store schemes only), with short timeouts and retries."""
        try:
            from obstore.store import from_url
        except ImportError:
            raise ReadCacheError(f"{self.url} needs obstore; pip install 'read-cache[object-storage]'") from None

        options = dict(self.storage_options)
        client = {**DEFAULT_CLIENT_OPTIONS, **options.pop("client_options", {})}
        retry = _retry_config({**DEFAULT_RETRY, **options.pop("retry_config", {})})
        service = OBJECT_SCHEMES.get(self.scheme)
        if service == "s3":
            endpoint = options.get("endpoint") or options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if "endpoint_url" in options:
                options["endpoint"] = options.pop("endpoint_url")
            if endpoint and str(endpoint).startswith("http://"):
                client.setdefault("allow_http", True)  # a local or private S3 server (MinIO, moto) speaks plain HTTP
            if "credential_provider" not in options and _wants_aws_profile(options):
                options["credential_provider"] = _boto3_credentials()
        try:
            return from_url(self.url, client_options=client, retry_config=retry, **options)
        except ImportError as e:
            raise ReadCacheError(f"{self.url} needs obstore ({e}); pip install 'read-cache[object-storage]'") from None
        except (ValueError, TypeError) as e:  # obstore names the bad key or value
            raise ReadCacheError(f"--storage-options for {self.url} were refused ({e}); see docs/object-storage.md for the keys") from None
        except Exception as e:  # noqa: BLE001 - obstore's own error types
            raise storage_error(e, self) from None

    # --- small operations on keys (the same code for every backend) -----------------------------------------
    def read_bytes(self, key: str) -> bytes | None:
        """The object (or file) `key` under this location, or None where there is none."""
        with translated(self):
            buf = sync(self.store(read_only=True).get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (relative to this location)."""
        if self.path is not None:
            root = self.path / prefix if prefix else self.path
            return [p.relative_to(self.path).as_posix() for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        with translated(self):
            return sync(_collect(self.store(read_only=True), "list_prefix", prefix))

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these keys (objects in a bucket, files on disk)."""
        store = self.store()
        with translated(self):
            sync(_delete(store, keys))

    def total_bytes(self, prefix: str = "") -> int:
        """Bytes stored under `prefix`: file sizes on disk, object sizes in a bucket."""
        if self.path is not None:
            root = self.path / prefix if prefix else self.path
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        with translated(self):
            return int(sync(self.store(read_only=True).getsize_prefix(prefix)))

    def check_reachable(self) -> None:
        """Fail now, in one line, on a missing bucket, bad credentials or a dead endpoint (listing proves all three)."""
        if self.path is None:
            with translated(self):
                sync(_first(self.store(read_only=True), "list_dir", ""))

    def free_bytes(self) -> int | None:
        """Free space where a local cache goes; None in an object store (no such limit to check)."""
        if self.path is None:
            return None
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free


def _wants_aws_profile(options: dict[str, Any]) -> bool:
    """No keys given, but an AWS profile or credentials file exists: obstore reads neither itself, boto3 does."""
    if any(k in options for k in ("access_key_id", "aws_access_key_id", "skip_signature", "aws_skip_signature")):
        return False
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return False
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    return bool(os.environ.get("AWS_PROFILE")) or any(Path(f).expanduser().is_file() for f in files)


def _boto3_credentials() -> Any:
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # without boto3, obstore's own chain (environment, web identity, instance metadata)
        return None
    session = boto3.Session()
    return Boto3CredentialProvider(session) if session.get_credentials() is not None else None


def _retry_config(retry: dict[str, Any]) -> dict[str, Any]:
    """obstore wants timedeltas; JSON gives seconds."""
    def seconds(value: Any) -> Any:
        return datetime.timedelta(seconds=value) if isinstance(value, (int, float)) else value

    out = {**retry, "retry_timeout": seconds(retry.get("retry_timeout"))}
    if isinstance(retry.get("backoff"), dict):
        out["backoff"] = {k: seconds(v) if k != "base" else v for k, v in retry["backoff"].items()}
    return {k: v for k, v in out.items() if v is not None}


async def _collect(store: Store, method: str, prefix: str) -> list[str]:
    # The listing generator must be made inside zarr's event loop (obstore starts its request there).
    return [key async for key in getattr(store, method)(prefix)]


async def _delete(store: Store, keys: list[str]) -> None:
    import asyncio

    await asyncio.gather(*(store.delete(key) for key in keys))


async def _first(store: Store, method: str, prefix: str) -> str | None:
    async for key in getattr(store, method)(prefix):
        return key
    return None


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the problem and the fix


def storage_error(e: BaseException, location: Location | str) -> ReadCacheError:
    """A one-line ReadCacheError for a storage failure (credentials, bucket, endpoint, permission, other)."""
    where = str(location)
    text = f"{type(e).__name__}: {e}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ReadCacheError):
        return e
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return ReadCacheError(f"the bucket of {where} does not exist; create it first (or fix the URL)")
    if re.search(r"169\.254\.169\.254|latest/api/token|latest/meta-data|NoCredentials|Unable to locate credentials|credential", text, re.I):
        return ReadCacheError(
            f"no credentials for {where}; set the service's variables (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) "
            "or pass --storage-options"
        )
    # A bare status code, not digits inside a port, a size or a name: a dead endpoint at 127.0.0.1:40315, or a
    # bucket named rc-9c403e1f, is not a 403.
    if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|(?<![\w.:])403(?!\w)", text):
        return ReadCacheError(f"access to {where} was refused ({_short(first)}); check the credentials and the bucket's permissions")
    if re.search(r"error sending request|Connection refused|connect|dns error|timed out|timeout|Name or service not known", text, re.I):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if location and str(location).startswith("s3") else None
        return ReadCacheError(
            f"cannot reach the object store for {where}{f' at {endpoint}' if endpoint else ''} ({_short(first)}); "
            "check the endpoint (AWS_ENDPOINT_URL for S3) and the network"
        )
    return ReadCacheError(f"storage error at {where}: {_short(first)}")


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_storage_failure(e: BaseException) -> bool:
    """A failure to reach the store (rather than bytes that fail their checksum)."""
    module = type(e).__module__ or ""
    if module.startswith(("obstore", "botocore", "aiobotocore", "aiohttp", "s3fs")):
        return True
    return isinstance(e, (ConnectionError, TimeoutError, PermissionError))


@contextmanager
def translated(location: Location) -> Iterator[None]:
    """Re-raise storage failures under this block as one-line ReadCacheErrors (local files pass through)."""
    try:
        yield
    except ReadCacheError:
        raise
    except FileNotFoundError as e:
        if location.is_local or "NoSuchBucket" not in str(e):
            raise
        raise storage_error(e, location) from None
    except Exception as e:
        if location.is_local or not (is_storage_failure(e) or isinstance(e, OSError)):
            raise
        raise storage_error(e, location) from None
