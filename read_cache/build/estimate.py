"""Size before cost: `read-cache build ... --dry-run` tokenises every split and projects the cache's size.

    read-cache build --model t5-base --task qqp --dry-run

Only the tokenizer and the model's config are loaded (no weights, no forward pass), so this takes
seconds for GLUE-sized tasks and shows, per `--store-dtype`, what the cache will take on disk:
raw bytes from the shapes, on-disk bytes from the bytes per stored value measured for each format
(`StoreFormat.disk_bytes_per_value`, docs/storage.md).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from read_cache.backbone.causal import prepare_tokenizer
from read_cache.backbone.inputs import tokenize_split
from read_cache.backbone.load import _load_config, backbone_kind, model_dims
from read_cache.build.identity import check_decoder_options, dims_geometry
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import SPLITS
from read_cache.store.formats import STORE_DTYPES
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitCount:
    split: str
    examples: int
    tokens: int
    truncated: int


@dataclasses.dataclass
class Estimate:
    model: str
    task: str
    chosen: str
    """The --store-dtype the build would use."""
    splits: list[SplitCount]
    raw_bytes: dict[str, int]
    """Per format: uncompressed bytes of every array."""
    disk_bytes: dict[str, int]
    """Per format: projected bytes on disk."""
    geometry: dict[str, Any]
    kind: str = "t5"
    """The backbone's kind ('t5', 'encoder', 'decoder'): how the table names its layers."""
    stored: str = "all"
    """`--tokens`: 'all', or 'last' (one row per example, so `tokens` counts examples)."""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits)

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.splits)


def estimate_build(cfg: BuildConfig) -> Estimate:
    """Tokenise every split of `cfg`'s task with the model's tokenizer and project the cache per format."""
    from transformers import AutoConfig, AutoTokenizer

    cfg.validate()
    task = get_task(cfg.task)
    config = _load_config(AutoConfig, cfg.model, cfg.revision)
    kind = backbone_kind(config, cfg.model)
    check_decoder_options(cfg, kind, cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise ReadCacheError(f"cannot load the tokenizer of {cfg.model!r}: {str(e).splitlines()[0]}") from e
    data = load_glue(task, cfg.data_dir, cfg.limit)
    counts = []
    if kind == "decoder":
        prepare_tokenizer(tokenizer)  # as load_backbone does: truncation keeps the prompt's end
    for split in SPLITS:
        # Tokens counted are the ones stored: every token, or one per example under --tokens last.
        tok = tokenize_split(tokenizer, kind, task, data[split].texts, cfg)
        counts.append(SplitCount(split, len(tok.ids), int(tok.offsets[-1]), tok.truncated))
    dims = model_dims(config, kind)
    raw, disk = {}, {}
    for fmt in STORE_DTYPES:
        g = dims_geometry(dims, kind, cfg, task.is_regression, fmt)
        raw[fmt] = sum(s.tokens * g.bytes_per_token + s.examples * g.bytes_per_example for s in counts)
        disk[fmt] = sum(g.projected_disk_bytes(s.tokens, s.examples) for s in counts)
    geometry = dims_geometry(dims, kind, cfg, task.is_regression, cfg.float_dtype).to_dict()
    return Estimate(cfg.model, task.name, cfg.float_dtype, counts, raw, disk, geometry, kind, cfg.tokens)


def estimate_table(est: Estimate) -> str:
    """The dry run's printout: per split examples and tokens, then per format the raw and on-disk sizes."""
    g = est.geometry
    layers = (
        f"{g['n_encoder_layers']} layers (decoder-only; {'the readout token alone' if est.stored == 'last' else 'every token'})"
        if est.kind == "decoder" else f"{g['n_encoder_layers']} encoder + {g['n_decoder_layers']} decoder layers"
    )
    lines = [
        f"{est.model} on {est.task}: {layers}, d = {g['d_model']} (tokenizer and config only; no weights loaded)",
        "",
        f"{'split':<12}{'examples':>12}{'tokens':>14}{'tokens/ex':>11}{'truncated':>11}",
    ]
    for s in est.splits:
        lines.append(f"{s.split:<12}{s.examples:>12,}{s.tokens:>14,}{s.tokens / max(s.examples, 1):>11.1f}{s.truncated:>11,}")
    lines.append(f"{'all':<12}{est.examples:>12,}{est.tokens:>14,}{est.tokens / max(est.examples, 1):>11.1f}")
    lines += ["", f"{'--store-dtype':<15}{'raw GB':>10}{'on disk GB':>13}   (projected from measured bytes per value)"]
    for fmt in STORE_DTYPES:
        mark = "  <- this build" if fmt == est.chosen else ""
        lines.append(f"{fmt:<15}{est.raw_bytes[fmt] / 1e9:>10.2f}{est.disk_bytes[fmt] / 1e9:>13.2f}{mark}")
    return "\n".join(lines)
