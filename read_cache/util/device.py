"""Where training runs and in which precision, without importing the backbone (or transformers).

    >>> from read_cache.util.device import pick_device, autocast_dtype
    >>> autocast_dtype(pick_device(None))   # None on a CPU without AMX / AVX512-BF16

bf16 pays on CUDA and on CPUs with AMX or AVX512-BF16; elsewhere torch emulates it and a bf16
matmul runs ~30x slower than fp32 (measured on the 2-core EPYC build machines: 1.4 vs 38-64 GFLOP/s).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from read_cache.errors import ReadCacheError

log = logging.getLogger(__name__)

FP16_RISK = (
    "fp16 compute is risky for T5: its activations exceed fp16's range (65,504) in later layers and turn into "
    "inf/NaN (the build stops when they do); bf16 keeps fp32's range, fp32 is exact"
)


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def training_threads(local_world_size: int = 1) -> int:
    """CPU threads for the training step: every core but one, which the reader thread needs.

    On the 2-core build machines torch's default (one per core) makes every small op wait for a
    descheduled OpenMP thread whenever anything else runs: measured 47 ex/s against 550 with one thread.
    """
    return max(1, cpu_threads_per_rank(local_world_size) - 1)  # under torchrun: this rank's share of the cores (`local_world_size`)


def cpu_threads_per_rank(local_world_size: int) -> int:
    """This process's fair share of the node's cores (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(local_world_size, 1))


def pick_device(device: str | None) -> torch.device:
    """The device asked for, or CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as e:
        raise ReadCacheError(f"--device {device} is not a torch device; use cpu, cuda or cuda:N") from e
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ReadCacheError(f"--device {device} asked for CUDA but torch sees no GPU here; use --device cpu")
    return picked


def autocast_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype | None:
    """bf16 for autocast where it pays (or where `dtype` says 'bf16'), None for plain fp32."""
    if dtype not in (None, "bf16", "fp32"):
        raise ReadCacheError(f"--dtype {dtype} is not supported for training; choose bf16 or fp32")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        raise ReadCacheError(
            "--dtype bf16 on this CPU (no AMX or AVX512-BF16) is emulated, ~30x slower than fp32, and oneDNN's LSTM "
            "refuses it; leave --dtype out (fp32 here)"
        )
    if dtype is not None:
        return torch.bfloat16 if dtype == "bf16" else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def default_compute_dtype(device: str, kind: str = "t5") -> str:
    """The backbone's compute dtype when --dtype is left out: bf16 where it is fast, else fp32.

    Never fp16 for T5 (see `FP16_RISK`) or a decoder-only LM (trained in bf16, many overflow fp16's range): a GPU
    without bf16 computes them in fp32; encoders, trained with fp16 in mind, may use fp16 there.
    """
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if kind == "encoder" else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def warn_if_risky_dtype(dtype: str, kind: str) -> None:
    """Say why fp16 is risky when it is chosen for a T5."""
    if dtype == "fp16" and kind == "t5":
        log.warning("--dtype fp16: %s", FP16_RISK)
