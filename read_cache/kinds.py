"""The vocabularies of the command line, each defined once (torch-free, zarr-free): what a flag may be.

    >>> from read_cache.kinds import RNNKind, check_choice
    >>> check_choice("--rnn", "gru", RNNKind)     # silent; 'grux' is a one-line ReadCacheError naming the choices

The configs (`read_cache.config`) validate flags against these; the stages use the same names (the side
network's RNN and head kinds, the store's formats, the methods of Table 1), so a name means one thing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from enum import Enum
from typing import Any, NamedTuple

from read_cache.errors import ReadCacheError


class RNNKind(str, Enum):
    """`--rnn`: the side network's recurrent cell, or none (a probe on the frozen states)."""

    GRU = "gru"
    LSTM = "lstm"
    RNN = "rnn"
    NONE = "none"


class HeadKind(str, Enum):
    """`--head`: the frozen LM head over the label words, or a trainable linear layer."""

    LM = "lm"
    LINEAR = "linear"


class Pooling(str, Enum):
    """`--pooling` (encoder-only and decoder-only backbones): the mean of the real tokens, the first token ([CLS]),
    or the last one (a causal LM's readout: the only token that has seen the whole prompt)."""

    MEAN = "mean"
    FIRST = "first"
    LAST = "last"


RNN_KINDS = tuple(k.value for k in RNNKind)
HEADS = tuple(k.value for k in HeadKind)
POOLINGS = tuple(k.value for k in Pooling)
READER_MODES = ("auto", "device", "ram", "stream")
"""`--reader`: auto (the GPU where it fits --device-memory-budget, else RAM where it fits --memory-budget, else
stream), device (codes held on the GPU), ram (codes held in host memory), stream (read from the store)."""
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
"""`build --dtype`: the backbone's compute precision."""
TRAIN_DTYPES = ("bf16", "fp32")
"""`train --dtype`: autocast in bf16, or plain fp32."""
STORE_DTYPES = ("bfloat16", "float16", "fp8", "int8", "int4")
"""`--store-dtype`: how hidden states are stored (read_cache.store.formats; docs/storage.md)."""
CODECS = ("auto", "none", "zstd", "lz4")
"""`build --codec`: auto (raw codes for fp8/int8/int4, blosc-zstd for 16-bit floats: measured, docs/storage.md), none
(crc32c only), or blosc with zstd or lz4; every chunk keeps its crc32c checksum."""
CACHED_TOKENS = ("all", "last")
"""`build --tokens`: cache the states of every token, or (decoder-only models) of the readout token alone: the last
one, which is all the `lm` head reads (the cache is then about tokens-per-example times smaller)."""
CROSS_ATTENTION = ("mean", "heads")
"""`--cross-attention`: averaged over heads (the paper's single head), or every head kept."""
PROTOCOLS = ("t5", "lst")
"""`--protocol`: this package's splits with T5's label words, or Ladder Side-Tuning's splits with the label
digits (the READ paper's code); see `read_cache.tasks.data`."""
TASK_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
"""The nine GLUE tasks, in GLUE's order (read_cache.tasks.specs describes each)."""
BENCH_METHODS = ("forward", "build", "cached_store", "cached_ram", "interleaved", "online", "full", "reader")
"""What `read-cache bench --methods` takes besides the baselines (lora-8, prompt-20, ...)."""


def check_choice(flag: str, value: Any, choices: Iterable[Any], hint: str = "") -> None:
    """A one-line error naming the flag and its choices when `value` is not one of them."""
    names = [c.value if isinstance(c, Enum) else c for c in choices]
    if (value.value if isinstance(value, Enum) else value) not in names:
        raise ReadCacheError(f"{flag} {value!r} is not one of {', '.join(names)}{hint}")


def task_name(name: str) -> str:
    """The task's short name; GLUE's spellings ("SST-2", "STS-B") are accepted too. Unknown: a one-line error."""
    key = name.strip().lower().replace("-", "")
    if key not in TASK_NAMES:
        raise ReadCacheError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return key


# --------------------------------------------------------------------------------------------------
# The baselines of the paper's Table 1 (`train --method`, `bench --methods`; implemented in read_cache.methods)

METHOD_NAMES = ("full", "lora", "prompt", "adapter", "bitfit", "lst")
"""Every baseline method, in the paper's Table 1 order."""
METHOD_SIZES: dict[str, tuple[int, ...]] = {"lora": (8, 32), "prompt": (10, 20, 30), "adapter": (32, 64), "lst": (8,)}
"""The paper's grid per method (LoRA ranks, prompt lengths, adapter widths, LST reduction factors)."""
DEFAULT_METHOD_SIZE: dict[str, int] = {"lora": 8, "prompt": 20, "adapter": 64, "lst": 8}
METHOD_LR: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "prompt": 3e-2, "adapter": 1e-3, "bitfit": 1e-3, "lst": 3e-3}
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
        return METHOD_LR[self.name]

    def module(self) -> Any:
        """The method's implementation (imports torch)."""
        return importlib.import_module(f"read_cache.methods.{self.name}")


def parse_method(text: str) -> MethodSpec:
    """'lora' -> lora-8, 'lora-32' -> lora-32, 'bitfit' -> bitfit; anything else is a one-line error."""
    name, dash, size_text = text.strip().lower().partition("-")
    if name not in METHOD_NAMES:
        raise ReadCacheError(f"--method {text!r} is not one of {', '.join(METHOD_NAMES)} (optionally NAME-SIZE, e.g. lora-32, prompt-10)")
    if name not in METHOD_SIZES:
        if dash:
            raise ReadCacheError(f"--method {name} has no size; pass it as {name}")
        return MethodSpec(name, None)
    if not dash:
        return MethodSpec(name, DEFAULT_METHOD_SIZE[name])
    size = positive_int(size_text)
    if size is None:
        raise ReadCacheError(f"--method {text!r}: the {SIZE_NAMES[name]} after '-' must be a positive whole number, e.g. {name}-{DEFAULT_METHOD_SIZE[name]}")
    return MethodSpec(name, size)


def positive_int(text: str) -> int | None:
    """`text` as a whole number above 0 (a method's size, an RNN's size after '/'), or None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def installed(module: str) -> bool:
    """True when `module` can be imported (found without importing it: the CLI checks flags before heavy imports)."""
    return importlib.util.find_spec(module) is not None


def check_installed(spec: MethodSpec) -> None:
    """LoRA and prompt tuning come from peft (the `baselines` extra); say so before anything loads."""
    if spec.name in ("lora", "prompt") and not installed("peft"):
        raise ReadCacheError(f"--method {spec.label} needs peft; install it with: pip install 'read-cache[baselines]'")


REPORTERS = ("tensorboard", "wandb", "none")
"""Where `--report-to` sends each epoch's numbers (besides metrics.jsonl, always written)."""
REPORTER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The package each reporter imports, which is also the name of read-cache's extra that installs it."""


def check_reporters(names: tuple[str, ...]) -> None:
    """--report-to's entries: known, 'none' alone, and each one's package installed; else a one-line error."""
    if not names:
        raise ReadCacheError("--report-to is empty; pass a comma list of tensorboard, wandb, or none")
    for name in names:
        check_choice("--report-to", name, REPORTERS, " (a comma list, e.g. --report-to tensorboard,wandb)")
    if "none" in names and len(names) > 1:
        raise ReadCacheError(f"--report-to {','.join(names)} mixes none with reporters; drop none (or pass none alone)")
    for name in names:
        package = REPORTER_EXTRAS.get(name)
        if package is not None and not installed(package):
            raise ReadCacheError(
                f"--report-to {name} needs the {package} package, which is not installed; "
                f"install it with: pip install 'read-cache[{package}]' (or leave {name} out of --report-to)"
            )


def is_method(text: str) -> bool:
    """True when `text` names a baseline method (with or without a size)."""
    return text.strip().lower().partition("-")[0] in METHOD_NAMES
