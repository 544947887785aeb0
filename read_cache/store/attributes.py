"""A typed view of a cache's root attributes: what stage two, `inspect` and `glue` read, in one place.

    info = open_cache(path).info
    info.model, info.backbone_kind, info.protocol, info.lm_output_scale   # defaults for older caches filled in

The raw attributes are JSON in the cache's zarr.json (docs/cache-format.md lists every key); fields that
older caches lack get the value those caches implied (`protocol` 't5' before --protocol existed,
`drop_last_layers` 0 before --drop-last-layers), here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CacheAttributes:
    """What a cache says about itself."""

    format_version: int
    model: str
    """The hub id or folder the backbone was loaded from."""
    backbone_kind: str
    """'t5', 'encoder' or 'decoder' (a causal LM)."""
    fingerprint: str | None
    """A digest of the backbone's weights: `predict` refuses another model unless it matches."""
    d_model: int
    pooling: str | None
    """Encoder-only backbones: how the family pools ('mean', 'first'); 'last' for decoder-only; None for T5."""
    tokens: str
    """'all' (every token's states) or 'last' (`build --tokens last`: each example's readout token alone)."""
    template: str | None
    """The input the backbone read: T5's prompt, a decoder-only model's (`--prompt`), or 'text' / 'text pair'."""
    task: str
    label_words: tuple[str, ...] | None
    """The targets the LM head scores (T5's words, or digits under --protocol lst); None for regression."""
    float_dtype: str
    compute_dtype: str | None
    codec: dict[str, Any]
    cross_attention: str | None
    max_length: int | None
    build_batch_size: int | None
    protocol: str
    drop_last_layers: int
    split_recipe: Any
    tokenizer: dict[str, Any] | None
    lm_output_scale: float | None
    """T5's LM-head output scaling; None where the cache holds no LM head."""
    lm_bias: tuple[float, ...] | None
    """The LM head's bias at the label tokens (Phi); None where it has none."""
    lm_softcap: float | None
    """The LM head's logit soft cap (Gemma 2: cap * tanh(z / cap)); None where it has none."""
    splits: dict[str, dict[str, Any]]
    """Per split: examples written, whether it is complete, the measured error (`Cache.split_status`)."""

    @classmethod
    def parse(cls, attrs: dict[str, Any]) -> CacheAttributes:
        backbone, build, task = attrs.get("backbone", {}), attrs.get("build", {}), attrs.get("task", {})
        lm = attrs.get("lm_head")
        words = task.get("label_words")
        return cls(
            format_version=int(attrs["format_version"]),
            model=backbone.get("model", "?"),
            backbone_kind=backbone.get("kind", "t5"),
            fingerprint=backbone.get("fingerprint"),
            d_model=int(backbone.get("d_model", attrs.get("geometry", {}).get("d_model", 0))),
            pooling=backbone.get("pooling"),
            tokens=build.get("tokens") or "all",
            template=task.get("template"),
            task=task.get("name", "?"),
            label_words=tuple(words) if words else None,
            float_dtype=attrs.get("float_dtype", "bfloat16"),
            compute_dtype=attrs.get("compute_dtype"),
            codec=attrs.get("codec", {}),
            cross_attention=attrs.get("cross_attention"),
            max_length=build.get("max_length"),
            build_batch_size=build.get("batch_size"),
            protocol=build.get("protocol", "t5"),
            drop_last_layers=int(build.get("drop_last_layers", 0)),
            split_recipe=attrs.get("data", {}).get("split_recipe"),
            tokenizer=attrs.get("tokenizer"),
            lm_output_scale=float(lm["output_scale"]) if lm else None,
            lm_bias=tuple(lm["bias"]) if lm and lm.get("bias") is not None else None,
            lm_softcap=float(lm["softcap"]) if lm and lm.get("softcap") is not None else None,
            splits=attrs.get("splits", {}),
        )

    def complete(self, splits: tuple[str, ...] = ("train", "validation", "test")) -> bool:
        """Every one of `splits` was built to the end."""
        return all(self.splits.get(s, {}).get("complete") for s in splits)
