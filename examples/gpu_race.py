"""The race on a GPU: a cached READ epoch, per reader tier, against online READ with a tuned forward.

    python examples/gpu_race.py --out /tmp/race                 # a CUDA GPU; ~4 minutes on an H100/H200
    python examples/gpu_race.py --out /tmp/race --tiny          # ~20 s on a CPU: checks the script runs

For each shape (T5-base: 12 + 12 layers, d 768; T5-3B: 24 + 24 layers, d 1024, 32 heads of 128 -- T5-large
has the same cache shape, so one cache serves both) and each compact format (int8, int4), it writes a
synthetic cache of ~38-token examples (QQP's length; Gaussian states, quantised by the build's own
`quantise_torch`), then measures in one process:

  step      a GRU/256 READ side-network training step per batch of 96, on batches already on the GPU:
            what training costs when reading is free
  forward   the tuned recompute: a random-init backbone of the shape, bf16 autocast, SDPA encoder
            self-attention (the library's `Backbone.forward`, exactly what online READ runs), at the
            fastest batch size that fits (tried: 64 ... 1024)
  online    online READ's epoch: forward (at its best batch) + the same step per batch of 96
  cached    a cached epoch per tier (device, ram, stream, and stream-host: the stream without staging):
            SplitReader batches moved to the GPU (codes + scales, dequantised there) + the same step
  pcie      a pinned host-to-device copy of 1 GB: the link the ram and stream tiers cross

Printed and written to OUT/gpu_race.json: examples/s of each, the bound (forward + step) / step, and
each tier's speed-up over online as a share of the bound (the issue's goals: >= 75% at T5-base,
>= 50% at T5-3B for the best tier that fits). The store's files sit in the page cache after writing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from read_cache.store import CacheWriter, Geometry, open_cache, plan_units
from read_cache.store.formats import get_format, quantise_torch
from read_cache.training.reader import SplitReader, batch_to

SHAPES = {  # (N_E, N_D, d, heads, d_ff, examples written)
    "t5-base": (12, 12, 768, 12, 3072, 12_000),
    "t5-3b": (24, 24, 1024, 32, 16384, 4_000),
}
TINY = (2, 2, 64, 4, 128, 300)
"""Every shape under --tiny: the script's whole path in seconds on a CPU (tests/test_bench.py runs it), not a measurement."""
TIERS = ("device", "ram", "stream", "stream-host")
"""`stream` stages each chunk through small pinned buffers into a window in GPU memory (training.staging);
`stream-host` lands each window whole in pinned host memory first, as the stream did before staging."""
BATCH = 96  # both arms train at the paper's batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dims(shape: str, tiny: bool) -> tuple[int, int, int, int, int, int]:
    """(N_E, N_D, d, heads, d_ff, examples written) of `shape`, or TINY's under --tiny."""
    return TINY if tiny else SHAPES[shape]


def synthetic_cache(path: Path, shape: str, fmt: str, mean_tokens: int, device: str, tiny: bool) -> Path:
    """A complete cache of random states in `fmt` (kept between runs)."""
    if (path / "zarr.json").is_file():
        return path
    n_e, n_d, d, heads, _, examples = dims(shape, tiny)
    g = Geometry(n_e, n_d, d, heads, "mean", fmt, False)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.poisson(mean_tokens, examples), 4, 256)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    attrs = {"backbone": {"model": f"synthetic-{shape}", "kind": "t5"}, "task": {"name": "qqp"}, "float_dtype": fmt}
    writer = CacheWriter.create(path, g, attrs, None)
    gen = torch.Generator(device=device).manual_seed(0)
    for split, n in (("train", examples), ("validation", 64), ("test", 64)):
        off = offsets[: n + 1]
        writer.create_split(split, offsets=off, input_ids=np.zeros(int(off[-1]), np.int32), labels=rng.integers(0, 2, n),
                            index=np.arange(n), info={"source": "synthetic", "truncated": 0})
        for unit in plan_units(off, writer.group[split].attrs["unit_examples"], g.token_chunk):
            tokens, per_example = {}, {}
            for name, rows, layers, out in (("encoder_hidden", unit.tokens, n_e, tokens), ("decoder_hidden", unit.examples, n_d, per_example)):
                codes, scale = quantise_torch(torch.randn(rows[1] - rows[0], layers, d, device=device, generator=gen), get_format(fmt))
                out[name], out[f"{name}_scale"] = codes, scale
            cross = torch.rand(unit.tokens[1] - unit.tokens[0], n_d, device=device, generator=gen)
            tokens["cross_attention"] = quantise_torch(cross, get_format(g.cross_dtype))[0]
            writer.write_unit(split, unit, tokens, per_example)
        writer.update_split_status(split, {"n_examples": n, "n_tokens": int(off[-1]), "examples_written": n, "complete": True})
    return path


def side_step(shape: str, device: str, tiny: bool) -> Callable[[dict[str, torch.Tensor]], None]:
    """One GRU/256 training step on a batch already on `device` (bf16 autocast on CUDA, as `train` runs)."""
    from read_cache.training.side_network import (
        SideNetwork,
        SideNetworkConfig,
        forward_batch,
    )

    n_e, n_d, d, *_ = dims(shape, tiny)
    cfg = SideNetworkConfig(rnn="gru", dim=256, d_model=d, n_encoder_layers=n_e, n_decoder_layers=n_d, head="linear", num_labels=2)
    net = SideNetwork(cfg, None).to(device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = forward_batch(net, batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["label"].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def tuned_backbone(shape: str, device: str, tiny: bool) -> Any:
    """A random-init T5 of the shape, run the way online READ runs it (`Backbone.forward`: autocast, SDPA encoder)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from read_cache.backbone.load import Backbone, use_fast_attention

    n_e, n_d, d, heads, d_ff, _ = dims(shape, tiny)
    config = T5Config(d_model=d, d_ff=d_ff, num_layers=n_e, num_decoder_layers=n_d, num_heads=heads, d_kv=d // heads,
                      vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager")
    net = T5ForConditionalGeneration(config)
    attention = use_fast_attention(net, "t5")
    net = net.requires_grad_(False).eval().to(device)
    dtype = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return Backbone(net, None, "t5", device, dtype, {"attention": attention})


def forward_rate(backbone: Any, mean_tokens: int, batch: int, repeats: int) -> float:
    ids = torch.randint(5, 32000, (batch, mean_tokens))
    mask = torch.ones_like(ids)
    backbone.forward(ids, mask, "mean")  # warm-up: kernels, allocator
    sync(backbone.device)
    started = time.perf_counter()
    for _ in range(repeats):
        backbone.forward(ids, mask, "mean")
    sync(backbone.device)
    return batch * repeats / (time.perf_counter() - started)


def best_forward(backbone: Any, mean_tokens: int, batches: tuple[int, ...], repeats: int) -> tuple[int, float, dict[int, float]]:
    """The fastest batch size that fits, and examples/s at each tried."""
    rates = {}
    for b in batches:
        try:
            rates[b] = forward_rate(backbone, mean_tokens, b, repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    best = max(rates, key=rates.get)
    return best, rates[best], rates


def step_rate(split: Any, step: Callable, device: str, batches: int) -> float:
    """Examples/s of the step alone, on batches already on the device (reading free)."""
    reader = SplitReader(split, batch_size=BATCH, shuffle=True, seed=0, mode="ram", device=device)
    ready = [batch_to(b, torch.device(device)) for _, b in zip(range(batches), reader.epoch(0))]
    step(ready[0])
    sync(device)
    started = time.perf_counter()
    for b in ready:
        step(b)
    sync(device)
    return sum(len(b["rows"]) for b in ready) / (time.perf_counter() - started)


def cached_rate(split: Any, tier: str, step: Callable, device: str) -> float:
    """Examples/s of one cached epoch: read (tier) + move + dequantise + step; the tier's one-time load is paid first."""
    streamed = {"coded": True, "stage": tier == "stream"} if tier.startswith("stream") else {}  # both ways, on a CPU too
    reader = SplitReader(split, batch_size=BATCH, shuffle=True, seed=0, mode=tier.split("-")[0], device=device, **streamed)
    for _, b in zip(range(2), reader.epoch(0)):  # loads a ram/device tier, warms the stream's first window
        step(batch_to(b, torch.device(device)))
    sync(device)
    started = time.perf_counter()
    for b in reader.epoch(1):
        step(batch_to(b, torch.device(device)))
    sync(device)
    return len(split) / (time.perf_counter() - started)


def pcie_gbps(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    started = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    sync(device)
    return 3 * host.numel() / (time.perf_counter() - started) / 1e9


def race(shape: str, fmt: str, args: argparse.Namespace, forward: tuple[int, float, dict]) -> dict[str, Any]:
    path = synthetic_cache(args.out / f"{shape}-{fmt}{'-tiny' if args.tiny else ''}", shape, fmt, args.mean_tokens, args.device, args.tiny)
    split = open_cache(path)["train"]
    step = side_step(shape, args.device, args.tiny)
    steps = step_rate(split, step, args.device, batches=min(40, len(split) // BATCH))
    best_batch, fwd, _ = forward
    online = 1 / (1 / fwd + 1 / steps)  # recompute each batch's states at the forward's best batch, then the step at 96
    bound = steps / online  # = (forward + step) / step, per example
    result: dict[str, Any] = {
        "examples": len(split), "bytes_per_example": round(open_cache(path).disk_bytes("train") / len(split)),
        "step_examples_per_second": round(steps), "online_examples_per_second": round(online), "bound": round(bound, 2), "tiers": {},
    }
    for tier in TIERS:
        if tier == "device" and not args.device.startswith("cuda") and not args.tiny:
            continue
        try:
            rate = cached_rate(split, tier, step, args.device)
        except Exception as e:  # a tier that does not fit is a result, not a crash
            result["tiers"][tier] = {"error": f"{type(e).__name__}: {e}"}
            continue
        result["tiers"][tier] = {"examples_per_second": round(rate), "speedup_over_online": round(rate / online, 2),
                                 "share_of_bound": round(rate / online / bound, 3)}
    print(json.dumps({shape: {fmt: result}}), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="t5-base,t5-3b")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--mean-tokens", type=int, default=38)
    ap.add_argument("--tiny", action="store_true", help="a smoke test: every shape shrunk to TINY (seconds on a CPU)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                              "pcie_h2d_gbps": pcie_gbps(args.device), "cpu_cores": len(os.sched_getaffinity(0)), "shapes": {}}
    for shape in args.shapes.split(","):
        backbone = tuned_backbone(shape, args.device, args.tiny)
        tried = (8, 16) if args.tiny else (64, 128, 256, 512, 1024)
        forward = best_forward(backbone, args.mean_tokens, tried, repeats=2 if args.tiny else 10)
        del backbone
        report["shapes"][shape] = {"forward": {"best_batch": forward[0], "examples_per_second": round(forward[1]),
                                               "by_batch": {b: round(r) for b, r in forward[2].items()}},
                                   **{fmt: race(shape, fmt, args, forward) for fmt in args.formats.split(",")}}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    (args.out / "gpu_race.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
