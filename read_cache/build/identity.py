"""What a cache records about its build: the geometry, the root attributes, and the build options a resume
must repeat exactly (`check_same_build` refuses to mix two builds in one folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from read_cache.backbone.inputs import input_template
from read_cache.backbone.load import Backbone, ModelDims, model_reference, package_versions
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import Geometry, codec_description, resolve_codec
from read_cache.store.location import Location
from read_cache.tasks.data import split_recipe
from read_cache.tasks.specs import TaskSpec


def make_geometry(backbone: Backbone, cfg: BuildConfig, task: TaskSpec) -> Geometry:
    return dims_geometry(backbone.dims, backbone.kind, cfg, task.is_regression, cfg.float_dtype)


def dims_geometry(dims: ModelDims, kind: str, cfg: BuildConfig, regression: bool, float_dtype: str) -> Geometry:
    """The cache's geometry from the model's shapes (the build's, and `--dry-run`'s from the config alone)."""
    return Geometry(
        n_encoder_layers=dims.n_encoder_layers,
        n_decoder_layers=dims.n_decoder_layers,
        d_model=dims.d_model,
        n_heads=dims.n_heads,
        cross_attention=cfg.cross_attention if kind == "t5" else None,
        float_dtype=float_dtype,
        regression=regression,
        chunk_bytes=int(cfg.chunk_mb * 2**20),
        codec=resolve_codec(float_dtype, cfg.codec),
    )


def check_decoder_options(cfg: BuildConfig, kind: str, model: str) -> None:
    """--tokens last and --prompt are for decoder-only models; elsewhere a one-line error."""
    if kind == "decoder":
        return
    if cfg.tokens == "last":
        raise ReadCacheError(f"--tokens last keeps a causal LM's readout token, and --model {model} is a {kind} model; leave --tokens out")
    if cfg.prompt is not None:
        raise ReadCacheError(f"--prompt sets a decoder-only model's input, and --model {model} is a {kind} model; leave --prompt out")


def identity(cfg: BuildConfig) -> dict[str, Any]:
    """The build options that determine the cache's bytes; a resume must repeat them exactly."""
    return {
        "limit": cfg.limit,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "cross_attention": cfg.cross_attention,
        "float_dtype": cfg.float_dtype,
        "codec": resolve_codec(cfg.float_dtype, cfg.codec),
        "chunk_mb": cfg.chunk_mb,
        "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
        "protocol": cfg.protocol,
        "drop_last_layers": cfg.drop_last_layers,
        "tokens": cfg.tokens,
        "prompt": cfg.prompt,
    }


IDENTITY_DEFAULTS = {"protocol": "t5", "drop_last_layers": 0, "codec": "zstd", "tokens": "all", "prompt": None}
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
    if cfg.codec == "auto" and "codec" in differing:
        # auto resumes whatever the cache holds (a format-2 cache's zstd too): existing arrays keep their codecs,
        # and zarr reads each array's own
        differing.remove("codec")
    if differing == ["float_dtype"]:
        stored = attrs["build"]["float_dtype"]
        raise ReadCacheError(
            f"--out {out} holds a {stored} cache; resume it with --store-dtype {stored}, or choose another --out for a {cfg.float_dtype} cache"
        )
    if differing:
        was = ", ".join(f"{k}={attrs['build'].get(k, IDENTITY_DEFAULTS.get(k))!r}" for k in differing)
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
            "template": input_template(backbone.kind, task, cfg.protocol, cfg.prompt),
        },
        "data": {
            "source": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else "hub:nyu-mll/glue",
            "split_recipe": split_recipe(task, protocol=cfg.protocol),
            "protocol": cfg.protocol,
        },
        "build": identity(cfg),
        "compute_dtype": backbone.dtype,
        "float_dtype": cfg.float_dtype,
        "codec": codec_description(cfg.float_dtype, cfg.codec),
        "cross_attention": cfg.cross_attention if backbone.kind == "t5" else None,
        "lm_head": {k: v for k, v in lm.items() if k != "rows"} if lm else None,
        "packages": package_versions(),
    }
