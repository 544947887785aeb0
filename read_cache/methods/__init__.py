"""The baselines of the paper's Table 1, trained on the live backbone with READ's splits, label words and metric.

    read-cache train --method lora-8 --model t5-small --task sst2 --data-dir ../shared/glue
    read-cache bench --model $MINILM --task sst2 --methods full,lora-8,prompt-20,adapter-64,bitfit,lst-8 --out bench/

A method is named `NAME` or `NAME-SIZE`; SIZE is the method's one size knob (the paper's grid in
`SIZES`, the default in `DEFAULT_SIZE`):

    full     every backbone weight trains                                  (no size)
    lora     LoRA on the attention query and value projections (peft)     rank 8 | 32
    prompt   prompt tuning: trainable virtual tokens before the input     10 | 20 | 30 tokens
    adapter  Houlsby bottleneck adapters after every attention and FF     32 | 64 bottleneck width
    bitfit   only biases (T5 has none: zero-initialised ones are added)   (no size)
    lst      Ladder Side-Tuning: a 1/SIZE-width side copy fed by ladders   reduction 8

Each method's module (`read_cache.methods.lora`, ...) has the same two functions:
`adapt(model, kind, size)` freezes the backbone and adds (or unfreezes) the method's own parameters,
returning what `TaskModel` runs, and `expected_parameters(config, kind, size)` is the formula for how
many parameters that adds, which the tests hold the code to. This module stays free of torch, so the
CLI can check a method name before anything heavy loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, NamedTuple

from read_cache.errors import ReadCacheError

NAMES = ("full", "lora", "prompt", "adapter", "bitfit", "lst")
"""Every baseline method, in the paper's Table 1 order."""
SIZES: dict[str, tuple[int, ...]] = {"lora": (8, 32), "prompt": (10, 20, 30), "adapter": (32, 64), "lst": (8,)}
"""The paper's grid per method (LoRA ranks, prompt lengths, adapter widths, LST reduction factors)."""
DEFAULT_SIZE: dict[str, int] = {"lora": 8, "prompt": 20, "adapter": 64, "lst": 8}
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "prompt": 3e-2, "adapter": 1e-3, "bitfit": 1e-3, "lst": 3e-3}
"""Learning rates from each method's own paper (prompt tuning needs a large one), for AdamW."""
SIZE_NAMES = {"lora": "rank", "prompt": "virtual tokens", "adapter": "bottleneck", "lst": "reduction factor"}


class MethodSpec(NamedTuple):
    """A parsed `--method`: the method and its size (None for methods without one)."""

    name: str
    size: int | None

    @property
    def label(self) -> str:
        """Canonical spelling, also the bench's row and file name: 'lora-8', 'bitfit'."""
        return self.name if self.size is None else f"{self.name}-{self.size}"

    @property
    def default_lr(self) -> float:
        return DEFAULT_LR[self.name]

    def module(self) -> Any:
        """The method's implementation (imports torch)."""
        return importlib.import_module(f"read_cache.methods.{self.name}")


def parse_method(text: str) -> MethodSpec:
    """'lora' -> lora-8, 'lora-32' -> lora-32, 'bitfit' -> bitfit; anything else is a one-line error."""
    name, dash, size_text = text.strip().lower().partition("-")
    if name not in NAMES:
        raise ReadCacheError(f"--method {text!r} is not one of {', '.join(NAMES)} (optionally NAME-SIZE, e.g. lora-32, prompt-10)")
    if name not in SIZES:
        if dash:
            raise ReadCacheError(f"--method {name} has no size; pass it as {name}")
        return MethodSpec(name, None)
    if not dash:
        return MethodSpec(name, DEFAULT_SIZE[name])
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ReadCacheError(f"--method {text!r}: the {SIZE_NAMES[name]} after '-' must be a positive whole number, e.g. {name}-{DEFAULT_SIZE[name]}")
    return MethodSpec(name, size)


def check_installed(spec: MethodSpec) -> None:
    """LoRA and prompt tuning come from peft (the `baselines` extra); say so before anything loads."""
    if spec.name in ("lora", "prompt") and importlib.util.find_spec("peft") is None:
        raise ReadCacheError(f"--method {spec.label} needs peft; install it with: pip install 'read-cache[baselines]'")


def is_method(text: str) -> bool:
    """True when `text` names a baseline method (with or without a size)."""
    return text.strip().lower().partition("-")[0] in NAMES
