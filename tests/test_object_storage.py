"""Caches on object storage: build to s3:// on a local S3 server (moto), train, sweep and inspect from it.

Nothing leaves the machine: a moto server runs on 127.0.0.1 for this module, and the AWS variables
point at it (monkeypatched, and undone after the module).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S, one_error, run_cli

import read_cache
from read_cache import paths
from read_cache.build import build_cache
from read_cache.config import BuildConfig
from read_cache.errors import CacheCorruptError, ReadCacheError
from read_cache.paths import redact_options
from read_cache.store.lease import LEASE_KEY, Lease
from read_cache.store.location import DEFAULT_CLIENT_OPTIONS, DEFAULT_RETRY, Location

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

SMALL_CHUNKS = 0.003  # MiB: 16-token chunks, so the tiny splits make several units


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint() -> str:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    url = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Never ask a real instance-metadata service for credentials: a closed local port answers at once.
        "AWS_METADATA_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        # Nor the user's ~/.aws files.
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/read-cache-tests/credentials",
        "AWS_CONFIG_FILE": "/nonexistent/read-cache-tests/config",
    }.items():
        mp.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    yield url
    mp.undo()
    server.stop()


def new_bucket() -> str:
    name = f"rc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def config(model: Path, glue: Path, out: object, **kw) -> BuildConfig:
    return BuildConfig(model=str(model), task="sst2", data_dir=glue, out=out, progress=False, batch_size=8, chunk_mb=SMALL_CHUNKS, **kw)


def arrays(where: object) -> dict[str, np.ndarray]:
    cache = read_cache.open_cache(where)
    return {f"{s}/{name}": cache[s].array(name)[...] for s in cache.splits for name in cache[s].array_names()}


def assert_same_arrays(ours: object, theirs: object) -> None:
    a, b = arrays(ours), arrays(theirs)
    assert a.keys() == b.keys()
    for name in b:
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def local_cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("READ_CACHE_HOME", str(out.parent / "home"))
        build_cache(config(tiny_t5, glue_dir, out))
    return out


@pytest.fixture(scope="module")
def s3_cache(endpoint: str, tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"s3://{new_bucket()}/caches/sst2"
    home = tmp_path_factory.mktemp("s3-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("READ_CACHE_HOME", str(home))
        build_cache(config(tiny_t5, glue_dir, url))
        assert paths.last_cache() == url  # the pointer keeps the URL as given
    return url


def object_keys(url: str) -> list[str]:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"][len(prefix) + 1 :] for o in listing.get("Contents", [])]


# --------------------------------------------------------------------------------------------------
# The cache in a bucket is the cache on disk


def test_s3_build_equals_local_build_array_for_array(s3_cache: str, local_cache: Path) -> None:
    assert_same_arrays(s3_cache, local_cache)
    read_cache.open_cache(s3_cache).require_complete()
    keys = object_keys(s3_cache)
    # The same plain Zarr v3 tree as on disk, and the lease is gone once the build ends.
    local = {p.relative_to(local_cache).as_posix() for p in local_cache.rglob("*") if p.is_file()}
    assert set(keys) == local
    assert LEASE_KEY not in keys


def test_any_zarr_reader_opens_the_bucket(s3_cache: str, local_cache: Path, endpoint: str) -> None:
    """Plain zarr through s3fs (not our code path: ours is obstore) reads the same numbers."""
    import zarr

    group = zarr.open_group(s3_cache, mode="r", storage_options={"endpoint_url": endpoint})
    local = zarr.open_group(str(local_cache), mode="r")
    assert group.attrs["task"]["name"] == "sst2"
    assert np.array_equal(group["validation/encoder_hidden"][:50], local["validation/encoder_hidden"][:50])


def test_train_and_sweep_from_s3_match_local(s3_cache: str, local_cache: Path, tmp_path: Path) -> None:
    args = ["--dim", 8, "--epochs", 2, "--no-progress", "--reader", "stream"]
    scores = {}
    for name, cache in (("s3", s3_cache), ("local", local_cache)):
        code, _, output = run_cli("train", "--cache", cache, "--out", tmp_path / name, *args)
        assert code == 0, output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        scores[name] = (summary["validation"]["score"], summary["test"]["score"])
    assert scores["s3"] == scores["local"]  # identical batches, so identical training
    assert summary["cache"] == str(local_cache.resolve())
    assert json.loads((tmp_path / "s3" / "summary.json").read_text())["cache"] == s3_cache
    code, _, output = run_cli("sweep", "--cache", s3_cache, "--out", tmp_path / "sweep", "--rnn", "gru/8,none", "--epochs", 1, "--no-progress")
    assert code == 0, output
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["configurations"] == 2


def test_train_with_no_cache_named_uses_the_last_url_built(s3_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths.record_last_cache(s3_cache)
    code, _, output = run_cli("train", "--dim", 8, "--epochs", 1, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, output
    assert s3_cache in output


def test_inspect_a_url(s3_cache: str) -> None:
    code, stdout, output = run_cli("inspect", s3_cache, "--json")
    assert code == 0, output
    info = json.loads(stdout)
    assert info["path"] == s3_cache
    train = info["splits"]["train"]
    assert train["complete"] and train["disk_bytes"] > 0 and train["compression_ratio"] > 0
    code, stdout, output = run_cli("inspect", s3_cache)
    assert code == 0 and s3_cache in stdout, output


def test_memory_url_through_fsspec(tiny_t5: Path, glue_dir: Path, local_cache: Path) -> None:
    url = f"memory://read-cache-tests/{uuid.uuid4().hex}"
    build_cache(config(tiny_t5, glue_dir, url))
    assert_same_arrays(url, local_cache)


# --------------------------------------------------------------------------------------------------
# Crash safety and the lease


CRASHING_BUILD = """
import os, signal, sys
from pathlib import Path
from read_cache import store
from read_cache.config import BuildConfig
from read_cache.build import build_cache

original, calls = store.CacheWriter.write_unit, [0]

def write_unit(self, split, unit, tokens, examples):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        self.group[split]["encoder_hidden"][unit.tokens[0]:unit.tokens[1]] = tokens["encoder_hidden"]  # half a unit
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, split, unit, tokens, examples)

store.CacheWriter.write_unit = write_unit
build_cache(BuildConfig(model=sys.argv[2], task="sst2", data_dir=Path(sys.argv[3]), out=sys.argv[4],
                        chunk_mb=float(sys.argv[5]), batch_size=8, progress=False))
"""


def test_sigkill_mid_build_then_resume_ends_identical(endpoint: str, tiny_t5: Path, glue_dir: Path, local_cache: Path) -> None:
    url = f"s3://{new_bucket()}/cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(read_cache.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CRASHING_BUILD, "4", str(tiny_t5), str(glue_dir), url, str(SMALL_CHUNKS)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert LEASE_KEY in object_keys(url)  # the dead build's lease is still there...
    with pytest.raises(ReadCacheError, match="incomplete"):
        read_cache.open_cache(url).require_complete()
    # ...and the same command (here through the CLI) takes it over and resumes.
    code, stdout, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--out", url,
                                   "--batch-size", 8, "--chunk-mb", SMALL_CHUNKS, "--no-progress")
    assert code == 0, output
    assert f"read-cache train --cache {url}" in stdout
    assert_same_arrays(url, local_cache)
    read_cache.open_cache(url).require_complete()
    assert LEASE_KEY not in object_keys(url)


def test_second_build_refused_while_the_lease_is_held(s3_cache: str, tiny_t5: Path, glue_dir: Path) -> None:
    before = {k: v.tobytes() for k, v in arrays(s3_cache).items()}
    with Lease(Location.parse(s3_cache)):
        with pytest.raises(ReadCacheError, match="another build is writing"):
            build_cache(config(tiny_t5, glue_dir, s3_cache))
    assert {k: v.tobytes() for k, v in arrays(s3_cache).items()} == before
    assert LEASE_KEY not in object_keys(s3_cache)


def _plant_lease(url: str, **holder: object) -> None:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    body = {"owner": "elsewhere", "host": "another-machine", "pid": 1, "ttl": 60.0, **holder}
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{LEASE_KEY}", Body=json.dumps(body).encode())


def test_a_lease_from_another_machine_is_taken_over_only_after_it_expires(endpoint: str) -> None:
    url = f"s3://{new_bucket()}/cache"
    _plant_lease(url, expires=time.time() + 60)
    with pytest.raises(ReadCacheError, match="another build is writing .*host another-machine"):
        Lease(Location.parse(url)).acquire()
    _plant_lease(url, expires=time.time() - 1)
    with Lease(Location.parse(url)) as lease:
        lease.check()
        holder = json.loads(boto3.client("s3").get_object(Bucket=url.split("/")[2], Key=f"cache/{LEASE_KEY}")["Body"].read())
        assert holder["owner"] == lease.owner and holder["pid"] == os.getpid()


def test_a_lease_renews_itself_in_the_background(endpoint: str) -> None:
    with Lease(Location.parse(f"s3://{new_bucket()}/cache"), ttl=0.8) as lease:
        first = lease._etag
        deadline = time.time() + HANG_GUARD_S  # a hang guard: the renewal thread (every ttl/4) may run late under load
        while lease._etag == first and time.time() < deadline:
            time.sleep(0.01)
        assert lease._etag != first  # rewritten: a new ETag


def test_a_lease_is_renewed_and_a_lost_one_stops_the_writer(endpoint: str) -> None:
    """Each renewal by hand (the thread's ttl/4 is far off): no clock decides the outcome, however loaded the machine."""
    url = f"s3://{new_bucket()}/cache"
    lease = Lease(Location.parse(url), ttl=HANG_GUARD_S).acquire()
    try:
        first = lease._etag
        lease.renew()
        lease.check()  # still ours, with a new ETag
        assert lease._etag != first
        _plant_lease(url, expires=time.time() + 60)  # another build replaces it (say, after a long stall)
        lease.renew()
        with pytest.raises(ReadCacheError, match="lost its lease .*another build replaced"):
            lease.check()
    finally:
        lease.release()


def test_a_lease_not_renewed_for_most_of_its_ttl_is_taken_as_lost(endpoint: str) -> None:
    lease = Lease(Location.parse(f"s3://{new_bucket()}/cache"), ttl=HANG_GUARD_S).acquire()
    try:
        lease.check()
        lease._renewed -= 0.75 * lease.ttl + 1  # as if the last renewal had succeeded that long ago
        with pytest.raises(ReadCacheError, match="lost its lease .*could not be renewed"):
            lease.check()
    finally:
        lease.release()


# --------------------------------------------------------------------------------------------------
# Damage and bad input: one line each, quickly


def test_corrupted_object_is_an_error_naming_the_array(s3_cache: str, endpoint: str) -> None:
    bucket, prefix = s3_cache.removeprefix("s3://").split("/", 1)
    copy = f"s3://{new_bucket()}/copy"
    s3 = boto3.client("s3")
    for key in object_keys(s3_cache):
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        if key == "train/encoder_hidden/c/0/0/0":
            body = bytearray(body)
            body[len(body) // 2] ^= 0x40
            body = bytes(body)
        s3.put_object(Bucket=copy.split("/")[2], Key=f"copy/{key}", Body=body)
    with pytest.raises(CacheCorruptError, match="train/encoder_hidden"):
        read_cache.open_cache(copy)["train"].read_block(0, 5)


@pytest.mark.parametrize("case", ["no credentials", "no bucket", "dead endpoint", "bad options", "options for a path"])
def test_storage_problems_are_one_line_errors(case: str, s3_cache: str, tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, extra = s3_cache, []
    expected = {
        "no credentials": "no credentials for s3://",
        "no bucket": "bucket of s3://.* does not exist",
        "dead endpoint": "cannot reach the object store",
        "bad options": "--storage-options is not valid JSON",
        "options for a path": "--storage-options apply to object-store URLs",
    }[case]
    if case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    elif case == "no bucket":
        url = "s3://no-such-bucket-here/cache"
    elif case == "dead endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    elif case == "bad options":
        extra = ["--storage-options", "{region: 1"]
    else:
        url, extra = str(tmp_path / "c"), ["--storage-options", '{"region": "us-east-1"}']
    # No hang: every client made has the short timeouts and retries (checked where they are set, not by a wall
    # clock, which a loaded machine stretches).
    import obstore.store

    clients: list[dict] = []
    from_url = obstore.store.from_url

    def recorded(url: str, **options):
        clients.append(options)
        return from_url(url, **options)

    monkeypatch.setattr(obstore.store, "from_url", recorded)
    for command in (["inspect", url], ["build", "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--out", url, "--no-progress"]):
        code, _, output = run_cli(*command, *extra)
        assert code == 2, output
        assert __import__("re").search(expected, one_error(output)), output
        assert "Traceback" not in output
    assert bool(clients) == (case in ("no credentials", "no bucket", "dead endpoint"))  # the three that reach for the store
    for options in clients:
        assert options["client_options"]["connect_timeout"] == DEFAULT_CLIENT_OPTIONS["connect_timeout"] == "5s"
        assert options["retry_config"]["max_retries"] == DEFAULT_RETRY["max_retries"] == 3
        assert options["retry_config"]["retry_timeout"].total_seconds() == DEFAULT_RETRY["retry_timeout"] == 20


def test_a_port_with_403_in_it_is_not_an_access_refusal() -> None:
    # The dead-endpoint case above drew a random closed port; one like 40315 once read as HTTP 403.
    from read_cache.store.location import storage_error

    dead = storage_error(RuntimeError("Generic S3 error: error sending request for url (http://127.0.0.1:40315/b/c)"), "s3://b/c")
    assert str(dead).startswith("cannot reach the object store"), dead
    # The test buckets are named by random hex: one like rc-9c403e1f once read as HTTP 403 too (the suite failed).
    hex_bucket = storage_error(RuntimeError("Generic S3 error: Error performing GET http://127.0.0.1:48051/rc-9c403e1f?list-type=2: error sending request"), "s3://rc-9c403e1f/c")
    assert str(hex_bucket).startswith("cannot reach the object store"), hex_bucket
    assert "was refused" in str(storage_error(RuntimeError("HTTP status client error (403 Forbidden)"), "s3://b/c"))
    assert "was refused" in str(storage_error(RuntimeError("request failed with status 403"), "s3://b/c"))


def test_storage_options_reach_the_store_and_secrets_stay_out_of_runs(s3_cache: str, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = json.dumps({"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing"})
    code, stdout, output = run_cli("inspect", s3_cache, "--json", "--storage-options", options)
    assert code == 0, output
    code, _, output = run_cli("train", "--cache", s3_cache, "--storage-options", options, "--dim", 8, "--epochs", 1, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, output
    written = (tmp_path / "run" / "config.json").read_text()
    assert '"secret_access_key": "***"' in written and "testing" not in written
    assert redact_options({"endpoint": "e", "client_options": {"token": "t"}}) == {"endpoint": "e", "client_options": {"token": "***"}}


def test_urls_parse_to_locations() -> None:
    assert Location.parse("s3://b/p/").url == "s3://b/p" and Location.parse("s3://b/p").backend == "obstore"
    assert Location.parse("gs://b/p").backend == "obstore" and Location.parse("az://acct/c/p").backend == "obstore"
    assert Location.parse("memory://x/y").backend == "fsspec"
    assert Location.parse("file:///tmp/x").path == Path("/tmp/x")
    assert Location.parse("rel/dir").is_local and Location.parse("rel/dir").url == str(Path("rel/dir").absolute())
    with pytest.raises(ReadCacheError, match="names no bucket"):
        Location.parse("s3://")


def test_reads_in_flight_change_nothing_but_speed(local_cache: Path) -> None:
    from read_cache.training.reader import SplitReader

    split = read_cache.open_cache(local_cache)["train"]
    assert len(split.block_bounds(32)) > 4
    batches = {k: list(SplitReader(split, batch_size=16, shuffle=True, block_tokens=32, shuffle_blocks=2, inflight=k).epoch(1)) for k in (1, 4)}
    assert len(batches[1]) == len(batches[4])
    for a, b in zip(batches[1], batches[4]):
        assert a.keys() == b.keys() and all(np.array_equal(a[key].numpy(), b[key].numpy()) for key in a)


# --------------------------------------------------------------------------------------------------
# A secret given in --storage-options is written nowhere (issue 19): one test per command that takes it

SECRET = "sekrit-7f3a9c1e"


def secret_options(endpoint: str) -> str:
    return json.dumps({"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": SECRET})


def files_holding_secret(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def objects_holding_secret(url: str) -> list[str]:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    return [key for key in object_keys(url) if SECRET.encode() in s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()]


@pytest.fixture
def bucket(endpoint: str) -> str:
    """A new bucket, made while the environment still holds the test server's credentials."""
    return new_bucket()


@pytest.fixture
def no_env_credentials(bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials only from --storage-options; READ_CACHE_HOME (the last-cache pointer) inside tmp_path."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("READ_CACHE_HOME", str(tmp_path / "home"))


def test_build_writes_no_secret(endpoint: str, bucket: str, tiny_t5: Path, glue_dir: Path, tmp_path: Path, no_env_credentials: None,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/secret-build"
    code, _, output = run_cli("build", "--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--out", url, "--limit", 40,
                              "--batch-size", 8, "--storage-options", secret_options(endpoint), "--no-progress")
    assert code == 0, output
    assert SECRET not in output and files_holding_secret(tmp_path) == []
    monkeypatch.undo()  # the test server's credentials again, to list the bucket
    assert objects_holding_secret(url) == []


def test_train_writes_no_secret(s3_cache: str, endpoint: str, tmp_path: Path, no_env_credentials: None) -> None:
    code, _, output = run_cli("train", "--cache", s3_cache, "--storage-options", secret_options(endpoint), "--dim", 8, "--epochs", 1,
                              "--out", tmp_path / "run", "--no-progress")
    assert code == 0, output
    assert SECRET not in output and files_holding_secret(tmp_path) == []
    assert '"secret_access_key": "***"' in (tmp_path / "run" / "config.json").read_text()


def test_sweep_writes_no_secret(s3_cache: str, endpoint: str, tmp_path: Path, no_env_credentials: None) -> None:
    code, _, output = run_cli("sweep", "--cache", s3_cache, "--storage-options", secret_options(endpoint), "--rnn", "gru/8,rnn/8", "--epochs", 1,
                              "--out", tmp_path / "sweep", "--no-progress")
    assert code == 0, output
    assert SECRET not in output and files_holding_secret(tmp_path) == []
    assert '"secret_access_key": "***"' in (tmp_path / "sweep" / "sweep-config.json").read_text()


def test_inspect_shows_no_secret(s3_cache: str, endpoint: str, tmp_path: Path, no_env_credentials: None) -> None:
    code, stdout, output = run_cli("inspect", s3_cache, "--json", "--storage-options", secret_options(endpoint))
    assert code == 0, output
    assert SECRET not in output and files_holding_secret(tmp_path) == []


def test_the_config_record_masks_secrets_at_any_depth() -> None:
    from read_cache.config import SweepConfig, TrainConfig, record

    cfg = SweepConfig(out=Path("s"), shared=TrainConfig(cache="s3://b/c", storage_options={"secret_access_key": SECRET, "region": "r"}))
    text = json.dumps(record(cfg))
    assert SECRET not in text and '"region": "r"' in text
    assert record(cfg, masked=False)["shared"]["storage_options"]["secret_access_key"] == SECRET  # only for comparing in memory
