"""Stage one: run the frozen backbone once over every split and write the cache.

    read-cache build --model t5-small --task sst2 --data-dir ../shared/glue

`build_cache(BuildConfig(...))` is the library call behind that command. The forward pass and the
writer overlap: a writer thread compresses and stores one unit while the backbone computes the next.
A rerun of the same command resumes from the units already durable (see `read_cache.store`).

This module holds the build's outer steps (lock, check, create or resume the store, one split after
another); `units` runs the backbone (`read_cache.backbone.forward`) over one unit and writes it, `splits`
one split, `progress` shows it, `identity` is what the cache records about its build, `estimate` projects
its size (`build --dry-run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from read_cache import distributed, paths
from read_cache.backbone.hub import require_hub_for
from read_cache.backbone.inputs import Tokenized, input_template, tokenize_split
from read_cache.backbone.load import Backbone, load_backbone
from read_cache.build.identity import check_decoder_options, check_same_build, make_geometry, root_attributes
from read_cache.build.splits import ComputedSplit, SplitReport, build_split, prepare_split
from read_cache.build.units import Ahead, fit_channel_scales
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import (
    SPLITS,
    CacheWriter,
    Geometry,
    check_format_version,
    clear_cache_dir,
    free_bytes,
    prepare_cache_dir,
    read_root_attrs,
    remove_partial_files,
)
from read_cache.store.lease import build_lock
from read_cache.store.location import Location, translated
from read_cache.tasks.data import SplitData, load_glue
from read_cache.tasks.specs import TaskSpec, get_task
from read_cache.util.device import pick_device

__all__ = ["BuildReport", "build_cache", "check_disk", "check_out", "check_same_build", "open_store", "store_lock"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildReport:
    path: Path | Location
    """The cache folder, or its Location in an object store (prints as the URL)."""
    splits: list[SplitReport]
    wall_seconds: float
    forward_seconds: float
    world_size: int = 1
    """Processes that built it (torchrun's WORLD_SIZE); forward_seconds sums every rank's."""


# --------------------------------------------------------------------------------------------------
# The build


def build_cache(cfg: BuildConfig) -> BuildReport:
    """Run stage one; resumes a cache that an earlier run of the same command left incomplete.

    Under torchrun every rank runs this with the same config: rank 0 creates the store, each rank
    computes its share of every split's units on its own device (see docs/distributed.md).
    """
    started = time.perf_counter()
    cfg.validate()
    with distributed.session(cfg.device) as launch:
        distributed.check_same_arguments(launch, cfg)
        return _build(cfg, launch, started)


def _build(cfg: BuildConfig, launch: distributed.Launch, started: float) -> BuildReport:
    pick_device(launch.device or cfg.device)
    require_hub_for(cfg.model, data_dir=cfg.data_dir, revision=cfg.revision)
    task = get_task(cfg.task)
    out = Location.parse(cfg.out or paths.default_cache_path(cfg.model, task.name), cfg.storage_options)
    if launch.distributed and out.path is None:
        raise ReadCacheError(
            f"--out {out}: a torchrun build needs a folder every rank mounts; build an object-storage cache with one "
            "process (`read-cache build` without torchrun), or build to a shared folder and copy it to the bucket"
        )
    distributed.on_main(launch, lambda: check_out(cfg, out))
    data = load_glue(task, cfg.data_dir, cfg.limit, cfg.protocol)
    backbone = load_backbone(
        cfg.model, dtype=cfg.dtype, device=launch.device or cfg.device, revision=cfg.revision, drop_last_layers=cfg.drop_last_layers
    )
    if backbone.kind != "t5" and cfg.cross_attention == "heads":
        log.info("--cross-attention heads ignored: %s backbones have no cross-attention", backbone.kind)
    check_decoder_options(cfg, backbone.kind, cfg.model)
    geometry = make_geometry(backbone, cfg, task)
    tokenized = {split: tokenize_split(backbone.tokenizer, backbone.kind, task, data[split].texts, cfg) for split in SPLITS}
    ahead: Ahead = {}  # train's first examples, computed to fit the channel scales (a new compact cache)
    with store_lock(launch, out, lambda: open_store(cfg, out, task, backbone, geometry, tokenized, ahead)) as guard:
        writer = CacheWriter(out, geometry)
        writer.guard = guard  # in a bucket: stop writing once the lease is lost
        forward_seconds = [0.0]
        reports = build_splits(writer, backbone, data, tokenized, cfg, forward_seconds, launch, ahead)
        forward_seconds[0] = sum(distributed.gather(launch, forward_seconds[0]))
    if launch.is_main and cfg.remember:
        paths.record_last_cache(out)
    return BuildReport(out.path or out, reports, time.perf_counter() - started, forward_seconds[0], launch.world_size)


def build_splits(
    writer: CacheWriter, backbone: Backbone, data: dict[str, SplitData], tokenized: dict[str, Tokenized], cfg: BuildConfig,
    forward_seconds: list[float], launch: distributed.Launch, ahead: Ahead | None = None,
) -> list[SplitReport]:
    """Every split in order, each finished after the next one is computed (its last units' writing overlaps that).

    Every skeleton is made first, while no unit is being written: beside a unit's write each took 0.3-0.5 s of
    the build's main thread here (t5-small, SST-2 --limit 1000), alone 0.07."""
    reports: list[SplitReport] = []
    unfinished: list[ComputedSplit] = []
    opened = {split: prepare_split(writer, split, data[split], tokenized[split], launch) for split in SPLITS}
    try:
        for split in SPLITS:
            states_ahead = ahead if split == "train" else None
            unfinished.append(build_split(
                writer, backbone, split, data[split], tokenized[split], cfg, forward_seconds, launch, states_ahead, opened=opened[split]
            ))
            if len(unfinished) == 2:
                reports.append(unfinished.pop(0).finish())
        reports.extend(computed.finish() for computed in unfinished)
    except BaseException:
        for computed in unfinished:  # nothing may write once the lock is let go
            computed.abandon()
        raise
    return reports


@contextlib.contextmanager
def store_lock(launch: distributed.Launch, out: Location, prepare: Callable[[], None]) -> Iterator[Callable[[], None] | None]:
    """Hold the build lock (the launch's flock, or a lease in a bucket), run `prepare` on rank 0 under it.

    Yields what the writer checks before each write: the lease's check in a bucket, else nothing."""
    if launch.distributed:
        with distributed.launch_lock(launch, out.path, prepare):
            yield None
        return
    with build_lock(out) as lock, translated(out):
        if out.path is not None:
            (out.path / distributed.LAUNCH_RECORD).unlink(missing_ok=True)  # a killed torchrun launch's, if any
        prepare()
        yield lock.check


def check_out(cfg: BuildConfig, out: Location) -> None:
    """Before loading anything: --out can hold this cache (or already holds an earlier run of it)."""
    prepare_cache_dir(out)
    existing = read_root_attrs(out)
    if existing is not None and not cfg.overwrite:
        check_format_version(existing, out)
        check_same_build(existing, cfg, out, fingerprint=None)


def open_store(
    cfg: BuildConfig, out: Location, task: TaskSpec, backbone: Backbone, geometry: Geometry, tokenized: dict[str, Tokenized], ahead: Ahead
) -> None:
    """Under the build lock: create the store, or check the one there and tidy it for resuming (a new compact
    store's channel fit leaves the states of train's first examples in `ahead`)."""
    existing = read_root_attrs(out)  # re-read under the lock
    if existing is not None and cfg.overwrite:
        log.info("--overwrite: deleting the cache at %s", out)
        clear_cache_dir(out)
        existing = None
    if existing is not None:
        check_same_build(existing, cfg, out, fingerprint=backbone.info["fingerprint"])
        removed = remove_partial_files(out)
        log.info("resuming %s (%d leftover partial files removed)", out, removed)
    check_disk(out, geometry, tokenized, existing, cfg.force)
    if existing is None:
        targets = task.targets(cfg.protocol)
        template = input_template(backbone.kind, task, cfg.protocol, cfg.prompt)
        lm = backbone.lm_head(targets, template) if backbone.kind != "encoder" and targets else None
        channels = fit_channel_scales(backbone, tokenized["train"], cfg, ahead) if geometry.format.compact else None
        CacheWriter.create(out, geometry, root_attributes(cfg, task, backbone, lm), backbone.root_arrays(lm), channels)


def check_disk(out: Location, geometry: Geometry, tokenized: dict[str, Tokenized], existing: dict | None, force: bool) -> None:
    """Print the estimate before building; refuse a build that cannot fit unless forced."""
    done = {s for s, st in (existing or {}).get("splits", {}).items() if st.get("complete")}
    need = sum(
        len(tok.ids) * geometry.bytes_per_example + int(tok.offsets[-1]) * geometry.bytes_per_token
        for split, tok in tokenized.items()
        if split not in done
    )
    free = free_bytes(out)
    tokens = sum(int(tok.offsets[-1]) for split, tok in tokenized.items() if split not in done)
    examples = sum(len(tok.ids) for split, tok in tokenized.items() if split not in done)
    projected = geometry.projected_disk_bytes(tokens, examples) / 1e6
    if free is None:
        log.info(
            "estimated cache size (--store-dtype %s): %.1f MB stored (projected), %.1f MB uncompressed; %s is an object store: no free-space check",
            geometry.float_dtype, projected, need / 1e6, out,
        )
        return
    log.info(
        "estimated cache size (--store-dtype %s): %.1f MB on disk (projected), %.1f MB uncompressed; %.1f MB free at %s",
        geometry.float_dtype, projected, need / 1e6, free / 1e6, out,
    )
    if need > free and not force:
        raise ReadCacheError(
            f"the cache needs up to {need / 1e9:.2f} GB but {out} has {free / 1e9:.2f} GB free; free space, choose another --out, or pass --force"
        )
