"""Stage one: run the frozen backbone once over every split and write the cache.

    read-cache build --model t5-small --task sst2 --data-dir ../shared/glue

`build_cache(BuildConfig(...))` is the library call behind that command. The forward pass and the
writer overlap: a writer thread compresses and stores one unit while the backbone computes the next.
A rerun of the same command resumes from the units already durable (see `read_cache.store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from read_cache import distributed, paths
from read_cache.backbone import Backbone, BackboneStates, check_finite, load_backbone, model_reference, package_versions
from read_cache.config import BuildConfig
from read_cache.data import SplitData, load_glue, split_recipe
from read_cache.device import pick_device
from read_cache.errors import ReadCacheError
from read_cache.hub import require_hub_for
from read_cache.store import (
    SPLITS,
    CacheWriter,
    Geometry,
    Unit,
    check_format_version,
    clear_cache_dir,
    codec_description,
    free_bytes,
    plan_units,
    prepare_cache_dir,
    read_root_attrs,
    remove_partial_files,
    token_rows,
)
from read_cache.store.formats import ErrorStats, dequantise, quantise_torch
from read_cache.store.lease import build_lock
from read_cache.store.location import Location, translated
from read_cache.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitReport:
    split: str
    examples: int
    tokens: int
    truncated: int
    units_written: int
    seconds: float
    bytes_written: int
    resumed: bool


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
# Tokenization


@dataclasses.dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: int
    type_ids: list[list[int]] | None = None
    """Segment ids per token where the tokenizer makes them (BERT pairs: 0 for the first text, 1 for the second).
    The model must get them; the cache need not keep them: they follow from input_ids (segment 1 starts
    after the first separator), and `predict` remakes them from the text with the same tokenizer."""

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(x) for x in self.ids])]).astype(np.int64)


def model_inputs(
    backbone_kind: str, task: TaskSpec, texts: Sequence[tuple[str, ...]], protocol: str = "t5"
) -> tuple[list[Any], list[Any] | None]:
    """T5 reads the paper's prefixed text (as `protocol` writes it); an encoder reads the raw text (pair)."""
    if backbone_kind == "t5":
        return [task.t5_input(t, protocol) for t in texts], None
    firsts = [t[0] for t in texts]
    seconds = [t[1] for t in texts] if len(task.text_fields) > 1 else None
    return firsts, seconds


def tokenize(tokenizer: Any, firsts: list[str], seconds: list[str] | None, max_length: int) -> Tokenized:
    """Token ids (and segment ids, where the tokenizer makes them) of every example, truncated to max_length."""
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    encoded = tokenizer(firsts, seconds, truncation=False, verbose=False, return_token_type_ids=with_types)
    full, types = encoded["input_ids"], encoded["token_type_ids"] if with_types else None
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        cut = tokenizer(
            [firsts[i] for i in too_long],
            [seconds[i] for i in too_long] if seconds else None,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=with_types,
        )
        for n, i in enumerate(too_long):
            full[i] = cut["input_ids"][n]
            if types is not None:
                types[i] = cut["token_type_ids"][n]
    return Tokenized(
        [list(map(int, ids)) for ids in full],
        len(too_long),
        [list(map(int, t)) for t in types] if types is not None else None,
    )


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions grouped by length (stable, so deterministic) into batches with little padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def to_stored(t: torch.Tensor, float_dtype: str, part: str = "the states") -> np.ndarray:
    """A tensor in the store's 16-bit representation (bfloat16 as raw uint16 bits).

    float16 tops out at 65,504, which T5's later layers exceed: an overflow is an error naming the layer
    (`part` says which states), never a silent inf in the cache.
    """
    if float_dtype == "float16":
        half = t.to(torch.float16)
        try:
            check_finite(part, half)
        except ReadCacheError as e:
            raise ReadCacheError(f"{e}".split(";")[0].replace("the backbone produced inf/NaN", "storing as float16 overflowed")
                                 + "; rebuild with --store-dtype bfloat16 (fp32's range)") from None
        return half.cpu().numpy()
    return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def forward_batches(
    backbone: Backbone, ids: list[list[int]], batch_size: int, cross: str, type_ids: list[list[int]] | None = None
) -> Iterator[tuple[np.ndarray, BackboneStates]]:
    """(positions, states) for length-grouped batches of `ids`; the bare forward pass is this alone.

    `type_ids` (from `Tokenized.type_ids`) go to encoders that read segment ids, so BERT sees a pair as a pair.
    """
    pad_id = backbone.tokenizer.pad_token_id or 0
    for batch in length_batches(np.array([len(x) for x in ids]), batch_size):
        input_ids, mask = pad([ids[i] for i in batch], pad_id)
        types = pad([type_ids[i] for i in batch], 0)[0] if type_ids is not None and backbone.uses_token_types else None
        yield batch, backbone.forward(input_ids, mask, cross, token_type_ids=types)


# --------------------------------------------------------------------------------------------------
# One unit


ERROR_SAMPLE_STRIDE = 8
"""Every 8th row of every batch is dequantised again and compared with the float32 it came from."""


class StatesOut:
    """One unit's rows of a hidden-state array in the store's format: codes, and scales for compact formats."""

    def __init__(self, rows: int, layers: int, geometry: Geometry, name: str):
        fmt = geometry.format
        self.name, self.fmt = name, fmt
        self.codes = np.empty((rows, layers, fmt.code_width(geometry.d_model)), dtype=fmt.code_dtype)
        self.scale = np.empty((rows, layers, *geometry.scale_shape()), dtype=fmt.scale_dtype) if fmt.compact else None
        self.errors = ErrorStats.empty(layers)

    def put(self, dest: np.ndarray, states: torch.Tensor) -> None:
        if self.fmt.compact:
            codes, scale = quantise_torch(states, self.fmt)
        else:  # 16-bit: to_stored also refuses a float16 overflow, naming the part
            codes, scale = to_stored(states, self.fmt.name, self.name.split("_")[0]), None
        self.codes[dest] = codes
        if scale is not None:
            self.scale[dest] = scale
        sample = slice(None, None, ERROR_SAMPLE_STRIDE)
        reference = states[sample].float().cpu().numpy()
        if len(reference):
            self.errors.add(reference, dequantise(codes[sample], None if scale is None else scale[sample], self.fmt))

    def arrays(self, rows: slice) -> dict[str, np.ndarray]:
        out = {self.name: self.codes[rows]}
        if self.scale is not None:
            out[f"{self.name}_scale"] = self.scale[rows]
        return out


def compute_unit(
    backbone: Backbone, unit: Unit, tokenized: Tokenized, offsets: np.ndarray, cfg: BuildConfig, geometry: Geometry,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[dict, dict, dict[str, ErrorStats]]:
    """Run the backbone over a unit's examples and lay the results out as the store wants them.

    `on_batch(n)` is told after each forward batch how many of the unit's own examples it computed, so
    progress moves per batch rather than per unit (a unit of a big model is minutes of work).
    Also returns the unit's reconstruction error per array (on a sample), after checking it against
    the format's ceiling: a format that cannot hold this model's states stops the build here.
    """
    c0, c1 = unit.compute
    base = int(offsets[c0])
    n_tok = int(offsets[c1]) - base
    enc = StatesOut(n_tok, geometry.n_encoder_layers, geometry, "encoder_hidden")
    cross = np.empty((n_tok, *geometry.cross_shape()), dtype=_np16(geometry.cross_dtype)) if geometry.cross_attention else None
    e0, e1 = unit.examples
    dec = StatesOut(e1 - e0, geometry.n_decoder_layers, geometry, "decoder_hidden") if geometry.cross_attention else None
    types = tokenized.type_ids[c0:c1] if tokenized.type_ids is not None else None
    for positions, states in forward_batches(backbone, tokenized.ids[c0:c1], cfg.batch_size, cfg.cross_attention, types):
        examples = positions + c0
        dest = token_rows(offsets, examples) - base
        enc.put(dest, states.encoder_hidden)
        own = (examples >= e0) & (examples < e1)
        if cross is not None:
            cross[dest] = to_stored(states.cross_attention, geometry.cross_dtype, "cross-attention of decoder")
            dec.put(examples[own] - e0, states.decoder_hidden[torch.from_numpy(own)])
        on_batch(int(own.sum()))
    t0, t1 = unit.tokens[0] - base, unit.tokens[1] - base
    tokens = enc.arrays(slice(t0, t1))
    examples_out = {}
    errors = {"encoder_hidden": enc.errors}
    if cross is not None:
        tokens["cross_attention"] = cross[t0:t1]
        examples_out = dec.arrays(slice(None))
        errors["decoder_hidden"] = dec.errors
    for name, stats in errors.items():
        stats.check(geometry.format, name)
    return tokens, examples_out, errors


def _np16(float_dtype: str) -> Any:
    return np.uint16 if float_dtype == "bfloat16" else np.float16


# --------------------------------------------------------------------------------------------------
# The writer thread


class UnitWriter:
    """Writes units on a background thread so the backbone never waits on disk."""

    def __init__(self, writer: CacheWriter, split: str, on_written: Callable[[Unit, int, dict[str, ErrorStats]], None]):
        self.writer = writer
        self.split = split
        self.on_written = on_written
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"read-cache-writer-{split}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain without writing once something failed
            unit, tokens, examples, errors = item
            try:
                self.writer.write_unit(self.split, unit, tokens, examples)
                self.on_written(unit, sum(a.nbytes for a in (*tokens.values(), *examples.values())), errors)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self.error = e

    def put(self, unit: Unit, tokens: dict, examples: dict, errors: dict[str, ErrorStats] | None = None) -> None:
        self._raise_if_failed()
        while True:
            try:
                self.queue.put((unit, tokens, examples, errors or {}), timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, OSError) and self.error.errno == 28:
            raise ReadCacheError(
                f"the disk filled up while writing {self.writer.path}; free some space and rerun the same command to resume"
            ) from self.error
        raise self.error


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
        distributed.check_same_arguments(launch, dataclasses.asdict(cfg))
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
    if backbone.kind == "encoder" and cfg.cross_attention == "heads":
        log.info("--cross-attention heads ignored: encoder-only backbones have no cross-attention")
    geometry = make_geometry(backbone, cfg, task)
    tokenized = {
        split: tokenize(backbone.tokenizer, *model_inputs(backbone.kind, task, data[split].texts, cfg.protocol), cfg.max_length)
        for split in SPLITS
    }
    with store_lock(launch, out, lambda: open_store(cfg, out, task, backbone, geometry, tokenized)) as guard:
        writer = CacheWriter(out, geometry)
        writer.guard = guard  # in a bucket: stop writing once the lease is lost
        forward_seconds = [0.0]
        reports = [build_split(writer, backbone, split, data[split], tokenized[split], cfg, forward_seconds, launch) for split in SPLITS]
        forward_seconds[0] = sum(distributed.gather(launch, forward_seconds[0]))
    if launch.is_main and cfg.remember:
        paths.record_last_cache(out)
    return BuildReport(out.path or out, reports, time.perf_counter() - started, forward_seconds[0], launch.world_size)


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


def open_store(cfg: BuildConfig, out: Location, task: TaskSpec, backbone: Backbone, geometry: Geometry, tokenized: dict[str, Tokenized]) -> None:
    """Under the build lock: create the store, or check the one there and tidy it for resuming."""
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
        lm = backbone.lm_head(targets) if backbone.kind == "t5" and targets else None
        CacheWriter.create(out, geometry, root_attributes(cfg, task, backbone, lm), lm["rows"] if lm else None)


def make_geometry(backbone: Backbone, cfg: BuildConfig, task: TaskSpec) -> Geometry:
    return Geometry(
        n_encoder_layers=backbone.n_encoder_layers,
        n_decoder_layers=backbone.n_decoder_layers,
        d_model=backbone.d_model,
        n_heads=backbone.n_heads,
        cross_attention=cfg.cross_attention if backbone.kind == "t5" else None,
        float_dtype=cfg.float_dtype,
        regression=task.is_regression,
        chunk_bytes=int(cfg.chunk_mb * 2**20),
    )


def identity(cfg: BuildConfig) -> dict[str, Any]:
    """The build options that determine the cache's bytes; a resume must repeat them exactly."""
    return {
        "limit": cfg.limit,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "cross_attention": cfg.cross_attention,
        "float_dtype": cfg.float_dtype,
        "chunk_mb": cfg.chunk_mb,
        "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
        "protocol": cfg.protocol,
        "drop_last_layers": cfg.drop_last_layers,
    }


IDENTITY_DEFAULTS = {"protocol": "t5", "drop_last_layers": 0}
"""What a cache built before these options existed was built with."""


def check_same_build(attrs: dict[str, Any], cfg: BuildConfig, out: Location, fingerprint: str | None) -> None:
    """Refuse to mix two builds in one folder; name what differs and how to proceed."""
    model, task = attrs["backbone"]["model"], attrs["task"]["name"]
    if model != model_reference(cfg.model) or task != cfg.task or (fingerprint and attrs["backbone"]["fingerprint"] != fingerprint):
        raise ReadCacheError(
            f"--out {out} already holds a cache of model {model!r} on task {task!r}; "
            "choose another --out (or delete that cache) to build a different model or task"
        )
    differing = [k for k, v in identity(cfg).items() if attrs["build"].get(k, IDENTITY_DEFAULTS.get(k)) != v]
    if differing == ["float_dtype"]:
        stored = attrs["build"]["float_dtype"]
        raise ReadCacheError(
            f"--out {out} holds a {stored} cache; resume it with --store-dtype {stored}, or choose another --out for a {cfg.float_dtype} cache"
        )
    if differing:
        was = ", ".join(f"{k}={attrs['build'].get(k)!r}" for k in differing)
        raise ReadCacheError(f"--out {out} was built with {was}; rerun with those options to resume it, or choose another --out")
    if cfg.dtype and attrs["compute_dtype"] != cfg.dtype:
        raise ReadCacheError(f"--out {out} was built with --dtype {attrs['compute_dtype']}; resume with that dtype or choose another --out")


def root_attributes(cfg: BuildConfig, task: TaskSpec, backbone: Backbone, lm: dict | None) -> dict[str, Any]:
    tok = backbone.tokenizer
    return {
        "backbone": {
            **backbone.info,
            "n_encoder_layers": backbone.n_encoder_layers,
            "n_decoder_layers": backbone.n_decoder_layers,
            "d_model": backbone.d_model,
            "n_heads": backbone.n_heads,
            "token_type_ids": backbone.uses_token_types,
        },
        "tokenizer": {"name_or_path": tok.name_or_path, "class": type(tok).__name__, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id},
        "task": {
            "name": task.name,
            "metric": task.metric.value,
            "label_words": list(task.targets(cfg.protocol)),
            "num_labels": task.num_labels,
            "regression": task.is_regression,
            "template": task.template(cfg.protocol) if backbone.kind == "t5" else "text pair" if len(task.text_fields) > 1 else "text",
        },
        "data": {
            "source": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else "hub:nyu-mll/glue",
            "split_recipe": split_recipe(task, protocol=cfg.protocol),
            "protocol": cfg.protocol,
        },
        "build": identity(cfg),
        "compute_dtype": backbone.dtype,
        "float_dtype": cfg.float_dtype,
        "codec": codec_description(cfg.float_dtype),
        "cross_attention": cfg.cross_attention if backbone.kind == "t5" else None,
        "lm_head": {k: v for k, v in lm.items() if k != "rows"} if lm else None,
        "packages": package_versions(),
    }


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


def build_split(
    writer: CacheWriter, backbone: Backbone, split: str, data: SplitData, tokenized: Tokenized, cfg: BuildConfig,
    forward_seconds: list[float], launch: distributed.Launch = distributed.SINGLE,
) -> SplitReport:
    """Compute and write this rank's share of the split's pending units; rank 0 marks it complete once all are durable."""
    offsets = tokenized.offsets
    resumed, pending = distributed.on_main(launch, lambda: open_split(writer, split, data, tokenized))
    distributed.agree(launch, lambda: check_skeleton(writer, split, data, offsets))
    units = plan_units(offsets, writer.group[split].attrs["unit_examples"], writer.geometry.token_chunk)
    mine = [units[u] for u in distributed.round_robin(pending, launch.rank, launch.world_size)]
    status = {"n_examples": len(offsets) - 1, "n_tokens": int(offsets[-1]), "truncated": tokenized.truncated, "source": data.source}
    started = time.perf_counter()
    written = [0, len(offsets) - 1 - sum(units[u].examples[1] - units[u].examples[0] for u in pending)]
    # The measured reconstruction error of the durable units: a resumed build continues the recorded one.
    # Units are merged in index order, whichever rank computed them, so every launch shape records the same sums.
    errors = {name: ErrorStats.from_dict(d) for name, d in writer.split_status(split).get("reconstruction_error", {}).items()} if launch.is_main else {}
    unit_errors_of: dict[int, dict[str, ErrorStats]] = {}
    if launch.is_main:
        writer.update_split_status(split, {**status, "examples_written": written[1], "complete": not pending})
    with BuildProgress(cfg.progress and launch.is_main, split, len(offsets) - 1, written[1]) as progress:

        def on_written(unit: Unit, nbytes: int, unit_errors: dict[str, ErrorStats]) -> None:
            written[0] += nbytes
            written[1] += unit.examples[1] - unit.examples[0]
            progress.written(nbytes)
            if launch.distributed:  # merged on rank 0 at the end, in unit order
                unit_errors_of[unit.index] = unit_errors
            else:  # one process writes units in index order: merge as they become durable (a resume continues it)
                merge_errors(errors, unit_errors)
            if not launch.distributed:  # under torchrun rank 0's poller records the count of every rank
                writer.update_split_status(split, {**status, "examples_written": written[1], "complete": False, **error_status(errors)})

        others = sorted(set(pending) - {u.index for u in mine}) if launch.is_main else []
        with others_progress(writer, split, units, others, progress, status, written):
            unit_writer = UnitWriter(writer, split, on_written)
            try:
                for unit in mine:
                    t = time.perf_counter()
                    tokens, examples, unit_errors = compute_unit(backbone, unit, tokenized, offsets, cfg, writer.geometry, progress.computed)
                    forward_seconds[0] += time.perf_counter() - t
                    unit_writer.put(unit, tokens, examples, unit_errors)
            finally:
                unit_writer.close()
            distributed.barrier(launch)  # every rank's units are durable now
    ours = distributed.gather(launch, (len(mine), written[0], unit_errors_of))
    for _, by_unit in sorted(((u, e) for _, _, rank_units in ours for u, e in rank_units.items()), key=lambda ue: ue[0]):
        merge_errors(errors, by_unit)
    distributed.on_main(launch, lambda: finish_split(writer, split, units, {**status, **error_status(errors)}))
    return SplitReport(
        split, len(offsets) - 1, int(offsets[-1]), tokenized.truncated, sum(n for n, _, _ in ours), time.perf_counter() - started,
        sum(b for _, b, _ in ours), resumed,
    )


def open_split(writer: CacheWriter, split: str, data: SplitData, tokenized: Tokenized) -> tuple[bool, list[int]]:
    """Create the split's skeleton unless a resumed build made it; returns (resumed, the pending units' indices).

    Under torchrun rank 0 alone calls this and hands the pending list to every rank, so all of them share
    out the same units (a rank reading units_done itself might see another's first unit already done)."""
    resumed = writer.has_split(split)
    if not resumed:
        offsets = tokenized.offsets
        writer.create_split(
            split,
            offsets=offsets,
            input_ids=np.fromiter((t for ids in tokenized.ids for t in ids), dtype=np.int32, count=int(offsets[-1])),
            labels=np.asarray(data.labels),
            index=np.asarray(data.index),
            info={"source": data.source, "truncated": tokenized.truncated},
        )
    done = writer.group[split]["units_done"][...]
    return resumed, [int(u) for u in np.flatnonzero(done == 0)]


def check_skeleton(writer: CacheWriter, split: str, data: SplitData, offsets: np.ndarray) -> None:
    skeleton = writer.split_skeleton(split)
    if not np.array_equal(skeleton["offsets"], offsets) or not np.array_equal(skeleton["label"], np.asarray(data.labels, skeleton["label"].dtype)):
        raise ReadCacheError(f"split {split!r} of {writer.path} was built from other data or another tokenizer; choose another --out")


def finish_split(writer: CacheWriter, split: str, units: list[Unit], status: dict[str, Any]) -> None:
    """Mark the split complete, after checking every unit is durable (re-read, not assumed)."""
    done = writer.group[split]["units_done"][...]
    missing = [u.index for u in units if not done[u.index]]
    if missing:
        raise ReadCacheError(f"split {split!r} of {writer.path} still misses units {missing[:5]} after every rank finished; rerun the same command to resume")
    writer.update_split_status(split, {**status, "examples_written": status["n_examples"], "complete": True})


def others_progress(writer: CacheWriter, split: str, units: list[Unit], others: list[int], progress: BuildProgress, status: dict, written: list[int]) -> Any:
    """On rank 0 of a launch: count the units other ranks make durable into the bar and the split's status."""
    if not others:
        return contextlib.nullcontext()
    per_token, per_example = writer.geometry.bytes_per_token, writer.geometry.bytes_per_example

    def on_done(indices: list[int]) -> None:
        examples = sum(units[u].examples[1] - units[u].examples[0] for u in indices)
        progress.computed(examples)
        progress.written(sum((units[u].tokens[1] - units[u].tokens[0]) * per_token for u in indices) + examples * per_example)
        written[1] += examples
        writer.update_split_status(split, {**status, "examples_written": written[1], "complete": False})

    return distributed.UnitPoller(lambda: writer.group[split]["units_done"][...], others, on_done)


def merge_errors(errors: dict[str, ErrorStats], more: dict[str, ErrorStats]) -> None:
    for name, stats in more.items():
        errors.setdefault(name, ErrorStats.empty(len(stats.err2))).merge(stats)


def error_status(errors: dict[str, ErrorStats]) -> dict[str, Any]:
    """The split status entry `reconstruction_error`: per array, per layer (see docs/storage.md)."""
    return {"reconstruction_error": {name: stats.to_dict() for name, stats in errors.items()}} if errors else {}


class BuildProgress:
    """Examples computed (per forward batch) and MB written, as a rich bar on a terminal, else a log line every ~10 s.

    Without a terminal (CI, nohup, a pipe) a bar would print nothing useful, and a big model would look hung."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, enabled: bool, split: str, total: int, done: int):
        self.enabled, self.split, self.total = enabled, split, total
        self.done, self.base, self.bytes = done, done, 0
        self.started = self.last_log = time.perf_counter()
        self._bar: Any = None

    def __enter__(self) -> BuildProgress:
        from rich.console import Console

        if self.enabled and Console(stderr=True).is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"[bold]{self.split:>10}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} ex/s, {task.fields[mbs]} MB/s written"), TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.split, total=self.total, completed=self.done, rate="-", mbs="-")
        return self

    def computed(self, n: int) -> None:
        self.done += n
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate, mbs = (self.done - self.base) / elapsed, self.bytes / elapsed / 1e6
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{rate:,.0f}", mbs=f"{mbs:,.1f}")
        elif self.enabled and time.perf_counter() - self.last_log >= self.LOG_EVERY_SECONDS:
            self.last_log = time.perf_counter()
            log.info("%s: %s/%s examples computed, %s ex/s, %.1f MB written", self.split, f"{self.done:,}", f"{self.total:,}", f"{rate:,.0f}", self.bytes / 1e6)

    def written(self, nbytes: int) -> None:
        self.bytes += nbytes

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
