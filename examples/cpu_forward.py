"""The CPU forward, tuned and not: SDPA vs eager attention, bf16 autocast vs fp32, two batch sizes.

    python examples/cpu_forward.py MODEL_FOLDER          # e.g. a random t5-small from ../shared/tools/make_random_t5.py

One process, configurations interleaved round by round; prints examples/s and the load average.
"""

import copy
import os
import sys
import time

import torch

from read_cache.backbone.load import load_backbone


def rate(backbone, batch: int, length: int = 24, repeats: int = 3) -> float:
    ids = torch.randint(5, 32000, (batch, length))
    mask = torch.ones_like(ids)
    backbone.forward(ids, mask, "mean")
    started = time.perf_counter()
    for _ in range(repeats):
        backbone.forward(ids, mask, "mean")
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    backbones = {}
    for dtype in ("bf16", "fp32"):
        tuned = load_backbone(sys.argv[1], dtype=dtype, device="cpu")
        eager = copy.copy(tuned)
        eager.model = copy.deepcopy(tuned.model)
        eager.model.set_attn_implementation("eager")
        backbones[(dtype, "sdpa")], backbones[(dtype, "eager")] = tuned, eager
    for r in range(3):
        cells = [f"{d} {a} b{b} {rate(bb, b):.0f}" for b in (64, 256) for (d, a), bb in backbones.items()]
        print(f"round {r} load {os.getloadavg()[0]:.2f}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
