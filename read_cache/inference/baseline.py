"""Online use of a baseline's run folder: reload the backbone, re-apply the method, load its weights, label text.

    from read_cache.inference.predict import predict          # dispatches here for runs of `train --method`
    predict("runs/sst2-lora-8-20250101-120000", ["a lovely film"]).labels    # ['positive']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from read_cache.backbone.load import load_backbone
from read_cache.errors import ReadCacheError
from read_cache.inference.results import Predictions
from read_cache.kinds import parse_method
from read_cache.methods.model import TaskModel, build_task_model
from read_cache.methods.train import Splits, Trainer
from read_cache.tasks.specs import TaskSpec, get_task
from read_cache.training.runs import CONFIG, METHOD_WEIGHTS


def is_method_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / CONFIG
    return path.is_file() and "method" in json.loads(path.read_text())


def load_method_run(run_dir: str | Path, model: str | None = None, device: str | None = None) -> tuple[TaskModel, Any, TaskSpec, dict[str, Any]]:
    """The trained task model (eval mode), its backbone, task and config.json; refuses other weights than the run's."""
    run_dir = Path(run_dir)
    if not (run_dir / METHOD_WEIGHTS).is_file():
        raise ReadCacheError(f"{run_dir} holds no finished run ({METHOD_WEIGHTS} missing); pass a folder `read-cache train --method` wrote")
    config = json.loads((run_dir / CONFIG).read_text())
    recorded = config["backbone"]
    backbone = load_backbone(model or recorded["model"], device=device, dtype="fp32")
    if backbone.info["fingerprint"] != recorded["fingerprint"]:
        raise ReadCacheError(
            f"model {model or recorded['model']!r} has weights {backbone.info['fingerprint']}, but the run was trained on "
            f"{recorded['model']!r} with weights {recorded['fingerprint']}; pass --model with the run's backbone"
        )
    task = get_task(config["task"])
    module = build_task_model(backbone, task, parse_method(config["method"]["label"]), pooling=config["pooling"]).to(backbone.device)
    module.load_trainable_state(load_file(str(run_dir / METHOD_WEIGHTS)))
    return module.eval(), backbone, task, config


def predict_method(run_dir: str | Path, examples: list[tuple[str, ...]], model: str | None = None, *, batch_size: int = 64, device: str | None = None) -> Any:
    """Predictions (labels, label ids, logits) of a baseline run for `examples`, as `read_cache.inference.predict.predict` returns."""
    from read_cache.backbone.inputs import model_inputs, tokenize

    module, backbone, task, config = load_method_run(run_dir, model, device)
    tok = tokenize(backbone.tokenizer, *model_inputs(backbone.kind, task, examples), int(config["max_length"]))
    labels = np.zeros(len(examples), dtype=np.float32 if task.is_regression else np.int64)
    splits = Splits({"new": tok.ids}, {"new": tok.type_ids if backbone.uses_token_types else None}, {"new": labels}, backbone.pad_id)
    with torch.no_grad():
        logits = Trainer(module, task, splits, lr=1.0, batch_size=batch_size, device=backbone.device).evaluate("new").logits
    if task.is_regression:
        return Predictions([float(x) for x in logits], None, logits)
    ids = logits.argmax(axis=-1)
    return Predictions([task.label_words[i] for i in ids], ids, logits, list(task.label_words))
