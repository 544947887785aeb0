"""What `predict` returns, and how it takes its texts: shared by READ runs and baselines.

    out = read_cache.inference.predict.predict(run_dir, ["a lovely film"])
    out.labels, out.logits, out.rows()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from read_cache.errors import ReadCacheError
from read_cache.tasks.specs import TaskSpec


class Predictions(NamedTuple):
    labels: list[str] | list[float]
    """Label words for classification, scores for regression (STS-B)."""
    label_ids: np.ndarray | None
    """[n] class ids; None for regression."""
    logits: np.ndarray
    """[n, C] logits, or [n] scores for regression."""
    label_words: list[str] | None = None
    """The C labels the logits score (classification only)."""

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per example: {'label', 'probabilities': {label: p}} or {'score'} for regression."""
        if self.label_ids is None:
            return [{"score": float(s)} for s in self.labels]
        shifted = np.exp(self.logits - self.logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        return [
            {"label": label, "probabilities": {w: round(float(p), 6) for w, p in zip(self.label_words or [], row)}}
            for label, row in zip(self.labels, probabilities)
        ]


def as_tuples(task: TaskSpec, texts: Sequence[str] | Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    if isinstance(texts, str):
        raise ReadCacheError("texts must be a list of examples, not a single string; wrap it in a list")
    out = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
    want = len(task.text_fields)
    bad = [i for i, t in enumerate(out) if len(t) != want]
    if bad:
        raise ReadCacheError(
            f"{task.name} examples have {want} text field(s) {task.text_fields}, but example {bad[0]} has {len(out[bad[0]])}; "
            f"pass {'a string' if want == 1 else 'a tuple of ' + str(want) + ' strings'} per example"
        )
    if not out:
        raise ReadCacheError("no texts to predict; pass at least one example")
    blank = [i for i, t in enumerate(out) if not any(field.strip() for field in t)]
    if blank:
        raise ReadCacheError(f"example {blank[0]} is empty; pass the text to label")
    return out
