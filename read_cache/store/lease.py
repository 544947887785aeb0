"""The build lock: an flock on a local folder, a lease object in an object store.

    with build_lock(Location.parse("s3://bucket/caches/sst2")) as lock:
        ...            # lock.check() raises once the lease can no longer be trusted

An object store has no flock and no process that dies with its holder, so a build holds a *lease*: the
object `<prefix>/build.lease` (JSON: owner, host, pid, expiry), created with a conditional write
(If-None-Match: *; obstore's `mode="create"`), so two builds cannot both create it. A thread renews it
(a conditional overwrite, If-Match its last ETag) every `ttl / 4` seconds. Another build may take it
over only when it has expired, or when its holder ran on this host and its process is gone (a build
killed with SIGKILL resumes at once with the same command). The takeover is itself an If-Match write,
so of two builds racing for a stale lease one wins. Expiry compares wall clocks: machines sharing a
bucket must agree on the time to within the ttl (NTP does far better).

The writer calls `check()` before it writes a unit: it raises if a renewal was refused (another build
took over) or if the last successful renewal is older than 3/4 of the ttl (we may have lost it unseen).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from read_cache.errors import ReadCacheError
from read_cache.store.location import OBJECT_SCHEMES, Location, storage_error

log = logging.getLogger(__name__)

LEASE_KEY = "build.lease"
LEASE_SECONDS = 60.0
"""How long a lease lives without renewal: a crashed build on another machine blocks its cache this long."""


class LeaseHeld(ReadCacheError):
    """Another live build holds the lease."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


# --------------------------------------------------------------------------------------------------
# Conditional writes, per backend


class ObjectLeaseStore:
    """Conditional create / replace / read of one object through obstore (S3, GCS, Azure)."""

    def __init__(self, location: Location):
        self.location = location
        self.store = location.obstore()

    def create(self, key: str, data: bytes) -> str | None:
        """Write `data` if `key` does not exist; its ETag, or None if it already exists."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return obstore.put(self.store, key, data, mode="create")["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            return None

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Overwrite `key` if its ETag is still `etag`; the new ETag, or None if it changed or vanished."""
        import obstore
        from obstore.exceptions import PreconditionError

        try:
            return obstore.put(self.store, key, data, mode={"e_tag": etag})["e_tag"]
        except (PreconditionError, FileNotFoundError):
            return None

    def read(self, key: str) -> tuple[bytes, str] | None:
        import obstore

        try:
            result = obstore.get(self.store, key)
        except FileNotFoundError:
            return None
        return bytes(result.bytes()), result.meta["e_tag"]

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self.store, key)


class FsspecLeaseStore:
    """The same for fsspec URLs. memory:// lives in this process, so a lock makes it atomic; other
    fsspec file systems offer no conditional write, so there the lease is best effort (and says so)."""

    _lock = threading.Lock()

    def __init__(self, location: Location):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(location.url, **location.storage_options)
        if location.scheme != "memory":
            log.warning("%s has no conditional writes: the build lease there is best effort", location.scheme)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def create(self, key: str, data: bytes) -> str | None:
        with self._lock:
            if self.fs.exists(self._path(key)):
                return None
            self.fs.pipe_file(self._path(key), data)
            return _digest(data)

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        with self._lock:
            current = self.read(key)
            if current is None or current[1] != etag:
                return None
            self.fs.pipe_file(self._path(key), data)
            return _digest(data)

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def delete(self, key: str) -> None:
        self.fs.rm_file(self._path(key))


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# The lease


class Lease:
    """A renewable, expiring claim on a cache in an object store; `acquire()`, `check()`, `release()`."""

    def __init__(self, location: Location, ttl: float = LEASE_SECONDS):
        self.location = location
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self.backend = ObjectLeaseStore(location) if location.scheme in OBJECT_SCHEMES else FsspecLeaseStore(location)
        self._etag: str | None = None
        self._renewed = 0.0  # monotonic time of the last successful write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, expires: float) -> bytes:
        return json.dumps(
            {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "expires": expires, "ttl": self.ttl}
        ).encode()

    # --- taking it ---------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        try:
            etag = self.backend.create(LEASE_KEY, self._body(time.time() + self.ttl))
            if etag is None:
                etag = self._take_over()
        except ReadCacheError:
            raise
        except Exception as e:  # noqa: BLE001 - obstore/fsspec errors become one line
            raise storage_error(e, self.location) from None
        self._etag, self._renewed = etag, time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="read-cache-lease", daemon=True)
        self._thread.start()
        log.debug("lease %s taken on %s", self.owner, self.location)
        return self

    def _take_over(self) -> str:
        """Replace a stale lease (expired, or its holder on this host is dead); refuse a live one."""
        for _ in range(3):  # the lease may vanish or change between our reads
            current = self.backend.read(LEASE_KEY)
            if current is None:
                etag = self.backend.create(LEASE_KEY, self._body(time.time() + self.ttl))
                if etag is not None:
                    return etag
                continue
            data, etag = current
            holder = _parse(data)
            if not _stale(holder):
                until = time.strftime("%H:%M:%S", time.localtime(float(holder.get("expires", 0))))
                raise LeaseHeld(
                    f"another build is writing {self.location} right now ({_who(holder)}, lease until {until}); "
                    f"wait for it to finish (if it died, rerun after {until}) or choose another --out"
                )
            log.info("taking over the stale build lease on %s (%s)", self.location, _who(holder))
            new = self.backend.replace(LEASE_KEY, self._body(time.time() + self.ttl), etag)
            if new is not None:
                return new
        raise LeaseHeld(f"another build took the lease on {self.location} first; wait for it to finish or choose another --out")

    # --- keeping it -----------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self.renew()

    def renew(self) -> None:
        if self._lost or self._etag is None:
            return
        try:
            new = self.backend.replace(LEASE_KEY, self._body(time.time() + self.ttl), self._etag)
        except Exception as e:  # noqa: BLE001 - a network blip: retried at the next tick; check() times out
            log.warning("could not renew the build lease on %s: %s", self.location, e)
            return
        if new is None:
            self._lost = "another build replaced its lease"
            return
        self._etag, self._renewed = new, time.monotonic()

    def check(self) -> None:
        """Raise unless this build still holds the lease (called before each write)."""
        if self._lost is None and time.monotonic() - self._renewed > 0.75 * self.ttl:
            self._lost = f"it could not be renewed for {time.monotonic() - self._renewed:.0f} s"
        if self._lost:
            raise ReadCacheError(
                f"this build lost its lease on {self.location} ({self._lost}); stop other builds of it, then rerun the same command to resume"
            )

    # --- giving it back ------------------------------------------------------------------------------
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost or self._etag is None:
            return
        try:
            # Expire it first (only if still ours), then delete: a build that finds the expired lease in
            # between may take it over, and then notices the deletion at its first renewal.
            if self.backend.replace(LEASE_KEY, self._body(0.0), self._etag) is not None:
                self.backend.delete(LEASE_KEY)
        except Exception as e:  # noqa: BLE001 - an expired lease left behind is harmless
            log.warning("could not remove the build lease on %s (%s); it expires by itself", self.location, e)
        self._etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: treated as expired below (expires 0)


def _stale(holder: dict[str, Any]) -> bool:
    if float(holder.get("expires", 0)) < time.time():
        return True
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])


def _who(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"


class _NoCheck:
    def check(self) -> None:
        return None


@contextmanager
def build_lock(location: Location, ttl: float = LEASE_SECONDS) -> Iterator[Any]:
    """The right lock for `location`: an flock on a local folder, a lease in an object store."""
    if location.path is not None:
        from read_cache.store import BuildLock

        with BuildLock(location.path):
            yield _NoCheck()
        return
    with Lease(location, ttl) as lease:
        yield lease
