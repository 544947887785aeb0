"""What the READ paper (arXiv 2305.15348) reports and ran, as data: Table 1's scores, Table 8's architectures,
Table 9's learning rates and the training recipe of `--preset paper`.

    >>> from read_cache.paper import paper_lr, PAPER_SCORES
    >>> paper_lr("cola", "read")
    0.000329
    >>> PAPER_SCORES["read"]["sst2"]
    93.8

Torch-free: the configs import it to apply the preset before anything heavy loads. Source: the full text in
../shared/seeds (Table 1 on page 5, Tables 8 and 9 in appendix D.2).
"""

from __future__ import annotations

import dataclasses

from read_cache.errors import ReadCacheError

VARIANTS = ("read", "read-large")
"""READ on T5-base, and READ-large on T5-large with its last 4 encoder and decoder layers dropped."""

TABLE1_TASKS = ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")
"""Table 1's columns, in its order (RTE and WNLI are not in the paper's table)."""

PAPER_SCORES: dict[str, dict[str, float]] = {
    "read": {"cola": 52.59, "mnli": 85.25, "qnli": 92.93, "mrpc": 87.09, "qqp": 89.10, "sst2": 93.80, "stsb": 87.77},
    "read-large": {"cola": 54.05, "mnli": 87.29, "qnli": 93.68, "mrpc": 87.70, "qqp": 89.34, "sst2": 93.92, "stsb": 88.58},
}
"""Table 1: test scores x 100 (mean of 3 seeds) with GLUE's metric per task."""

PAPER_AVERAGE = {"read": 84.97, "read-large": 85.73}
"""Table 1's printed Avg. column. It is not the mean of the seven printed columns (84.08 and 84.94), nor is
any other row's; the table compares averages over the same tasks instead."""

PAPER_LR: dict[str, dict[str, float]] = {
    "read": {"cola": 3.29e-4, "mnli": 3.67e-4, "qnli": 1.75e-4, "mrpc": 7.8e-5, "qqp": 1e-6, "sst2": 2.5e-6, "stsb": 4.6e-5},
    "read-large": {"cola": 8.5e-5, "mnli": 1.46e-4, "qnli": 1.75e-4, "mrpc": 1.43e-3, "qqp": 2.13e-4, "sst2": 2.04e-4, "stsb": 7.1e-5},
}
"""Table 9: the final learning rate per task, found by the search below."""

ARCHITECTURES = ("gru/256", "gru/128", "lstm/128")
"""Table 8: READ's architecture candidates (RNN type / RNN dim); GRU/256 won for both variants."""

DROPPED_LAYERS = {"read": 0, "read-large": 4}
"""Appendix D.1: READ-large drops T5-large's last 4 encoder and decoder layers."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """The training recipe of section 4 and appendix D.2."""

    batch_size: int = 96
    """Total batch size, the same for every task and method (appendix D.1)."""
    epochs: int = 30
    """'fine-tuning on each dataset for up to 30 epochs'."""
    patience: int = 1
    """'an early stop once validation metric stops improving': the first epoch without a better score ends it."""
    lr_range: tuple[float, float] = (1e-6, 3e-3)
    """The learning-rate search's interval, searched on a log scale."""
    rounds: int = 32
    """'for up to 32 rounds' of Bayesian optimisation per (architecture, task)."""
    seeds: int = 3
    """'the average score on 3 different seeds'."""


PAPER = Preset()
PRESETS = ("paper",)
"""What `--preset` takes."""


def check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        raise ReadCacheError(f"--preset {preset!r} is not one of {', '.join(PRESETS)} (or leave it out)")


def paper_lr(task: str, variant: str = "read") -> float:
    """Table 9's learning rate for READ (`variant` 'read') or READ-large on `task`."""
    if variant not in PAPER_LR:
        raise ReadCacheError(f"unknown READ variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if task not in PAPER_LR[variant]:
        raise ReadCacheError(
            f"the paper's Table 9 has no learning rate for {task} (it covers {', '.join(TABLE1_TASKS)}); pass --lr"
        )
    return PAPER_LR[variant][task]


DEFAULT_LR = 1e-3
"""`read-cache train`'s learning rate without --lr or a preset."""


def variant_of(d_model: int) -> str:
    """Which of the paper's rows a backbone of width `d_model` compares with: READ-large for T5-large (1024), else READ."""
    return "read-large" if d_model >= 1024 else "read"


def resolve_lr(lr: float | None, preset: str | None, task: str, d_model: int) -> float:
    """--lr when given; else Table 9's rate for `task` under --preset paper; else `DEFAULT_LR`."""
    if lr is not None:
        return lr
    if preset == "paper":
        return paper_lr(task, variant_of(d_model))
    return DEFAULT_LR
