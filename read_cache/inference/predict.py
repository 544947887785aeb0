"""Online use of a trained run: `predict(run_dir, texts)` for a READ run or a baseline's.

    from read_cache.inference.predict import predict
    out = predict("runs/sst2-gru256-lm-20250101-120000", ["a lovely film", "a dull plot"])
    out.labels      # ['positive', 'negative'] (STS-B: scores)
    out.logits      # [n, C] (STS-B: [n])

A READ run goes through `inference.read` (backbone + side network, as the cached path computes it); a run of
`train --method` through `inference.baseline` (backbone + the method's weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from read_cache.inference.results import Predictions, as_tuples
from read_cache.tasks.specs import get_task


def predict(
    run_dir: str | Path,
    texts: Sequence[str] | Sequence[tuple[str, ...]],
    model: str | None = None,
    *,
    batch_size: int | None = None,
    device: str | None = None,
) -> Predictions:
    """Labels (or scores) and logits for `texts`: one string per example, or a tuple per sentence pair.

    `model` defaults to the backbone the run's cache was built from; another model is refused unless
    it has the same weights. `batch_size` defaults to the build's (same batches -> bit-equal states).
    """
    from read_cache.inference.baseline import is_method_run, predict_method
    from read_cache.inference.read import predict_read

    if is_method_run(run_dir):  # a baseline of `train --method`: backbone + method weights, no cache
        run_task = get_task(json.loads((Path(run_dir) / "config.json").read_text())["task"])
        return predict_method(run_dir, as_tuples(run_task, texts), model, batch_size=batch_size or 64, device=device)
    return predict_read(run_dir, texts, model, batch_size=batch_size, device=device)
