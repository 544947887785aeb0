"""Does the store keep a GPU fed? Reader throughput per format on CUDA, against T5-base's forward pass.

    python examples/gpu_reader.py --out /tmp/gpu-reader            # needs a CUDA GPU; ~5-10 minutes on an H100

Writes synthetic T5-base-shaped caches (12 + 12 layers, d = 768, ~38 tokens per example like QQP;
Gaussian states with per-channel scales and a few 30x outlier channels, quantised on the GPU with the
build's own `quantise_torch`) in bfloat16, fp8, int8 and int4, then measures, formats interleaved:

  limit       read + decode every chunk on the host (numpy), on W threads: the host's ceiling
  gpu-decode  SplitReader(device="cuda"): each window of codes + scales copied to the GPU once (pinned),
              every batch gathered and dequantised there (batch_to)
  host-decode the same reader decoding to float32 on the host, then copying float32 to the GPU
  side step   one GRU/256 READ side-network training step per batch on the GPU (what reading must keep up with)
  forward     a random-init T5-base forward (bf16, batch 64) on the same examples: examples/s a
              recomputation would deliver, and the bytes/s the store must then deliver to be worth it

Prints one JSON document (and writes it to OUT/gpu_reader.json). The store files sit in the page cache
after writing (this script does not drop it), so "store" here means zarr + codec + host memory, not a disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from read_cache.store import CacheWriter, Geometry, open_cache, plan_units
from read_cache.store.formats import dequantise, get_format, quantise_torch
from read_cache.training.reader import SplitReader, batch_to

FORMATS = ("bfloat16", "fp8", "int8", "int4")
DEVICE = "cuda"  # --device cpu runs a (slow, small) smoke test of this script without a GPU


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_cache(path: Path, fmt: str, examples: int, mean_tokens: int, seed: int = 0) -> Path:
    if (path / "zarr.json").is_file():
        return path
    g = Geometry(12, 12, 768, 12, "mean", fmt, False)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.poisson(mean_tokens, examples), 4, 256)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    attrs = {"backbone": {"model": "synthetic-t5-base", "kind": "t5"}, "task": {"name": "qqp"}, "float_dtype": fmt}
    writer = CacheWriter.create(path, g, attrs, None)
    channel = torch.from_numpy(np.exp(rng.normal(0, 0.5, (12, 768))).astype(np.float32)).to(DEVICE)
    channel[:, [7, 100, 500]] *= 30
    for split, n in (("train", examples), ("validation", 64), ("test", 64)):
        off = offsets[: n + 1]
        writer.create_split(split, offsets=off, input_ids=np.zeros(int(off[-1]), np.int32), labels=rng.integers(0, 2, n),
                            index=np.arange(n), info={"source": "synthetic", "truncated": 0})
        units = plan_units(off, writer.group[split].attrs["unit_examples"], g.token_chunk)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        for unit in units:
            t = unit.tokens[1] - unit.tokens[0]
            e = unit.examples[1] - unit.examples[0]
            enc = torch.randn(t, 12, 768, device=DEVICE, generator=gen) * channel
            dec = torch.randn(e, 12, 768, device=DEVICE, generator=gen) * channel
            cross = torch.rand(t, 12, device=DEVICE, generator=gen)
            tokens, per_example = {}, {}
            for name, x, out in (("encoder_hidden", enc, tokens), ("decoder_hidden", dec, per_example)):
                codes, scale = quantise_torch(x, get_format(fmt))
                out[name] = codes
                if scale is not None:
                    out[f"{name}_scale"] = scale
            tokens["cross_attention"] = quantise_torch(cross, get_format(g.cross_dtype))[0]
            writer.write_unit(split, unit, tokens, per_example)
        writer.update_split_status(split, {"n_examples": n, "n_tokens": int(off[-1]), "examples_written": n, "complete": True})
    return path


def limit(split, threads: int) -> float:
    g = split.cache.geometry
    cross = get_format(g.cross_dtype)

    def one(bounds):
        b = split.read_block(*bounds)
        dequantise(b.encoder_hidden, b.encoder_scale, g.format)
        dequantise(b.decoder_hidden, b.decoder_scale, g.format)
        dequantise(b.cross_attention, None, cross)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, split.block_bounds()))
    return time.perf_counter() - started


def reader_epoch(split, workers: int, on_gpu: bool, step=None) -> float:
    r = SplitReader(split, batch_size=96, shuffle=True, seed=0, mode="stream", workers=workers, device=DEVICE if on_gpu else "cpu")
    sync()
    started = time.perf_counter()
    for batch in r.epoch(1):
        b = batch_to(batch, torch.device(DEVICE))
        if step is not None:
            step(b)
    sync()
    return time.perf_counter() - started


def side_step_fn():
    """One GRU/256 step at T5-base's shape: the same step the race times (examples/gpu_race.py)."""
    from gpu_race import side_step  # this folder is on sys.path when a script here runs

    return side_step("t5-base", DEVICE)


def forward_rate(mean_tokens: int, batches: int = 30) -> float:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
    model = T5ForConditionalGeneration(config).to(DEVICE).eval().to(torch.bfloat16)
    ids = torch.randint(5, 32000, (64, mean_tokens), device=DEVICE)
    start = torch.zeros((64, 1), dtype=torch.long, device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, decoder_input_ids=start, output_hidden_states=True)
        sync()
        started = time.perf_counter()
        for _ in range(batches):
            model(input_ids=ids, decoder_input_ids=start, output_hidden_states=True)
        sync()
    return 64 * batches / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--mean-tokens", type=int, default=38)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--forward-batches", type=int, default=30)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    assert DEVICE == "cpu" or torch.cuda.is_available(), "this script measures the CUDA path; run it on a GPU machine"
    workers = [int(w) for w in args.workers.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    caches = {fmt: synthetic_cache(args.out / fmt, fmt, args.examples, args.mean_tokens) for fmt in FORMATS}
    splits = {fmt: open_cache(p)["train"] for fmt, p in caches.items()}
    step = side_step_fn()
    reader_epoch(splits["int8"], 2, True, step)  # warm-up: CUDA context, kernels, allocator
    results: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for fmt in FORMATS[round_ % 4 :] + FORMATS[: round_ % 4]:
            for w in workers:
                results.setdefault(f"{fmt}/limit/{w}", []).append(limit(splits[fmt], w))
                results.setdefault(f"{fmt}/gpu-decode/{w}", []).append(reader_epoch(splits[fmt], w, True))
                results.setdefault(f"{fmt}/host-decode/{w}", []).append(reader_epoch(splits[fmt], w, False))
            results.setdefault(f"{fmt}/gpu-decode+side-step/{max(workers)}", []).append(reader_epoch(splits[fmt], max(workers), True, step))
    n = len(splits["bfloat16"])
    rows = {k: {"examples_per_second": n / statistics.median(v), "seconds": v} for k, v in results.items()}
    forward = forward_rate(args.mean_tokens, args.forward_batches)
    bytes_per_example = {fmt: open_cache(p).disk_bytes("train") / n for fmt, p in caches.items()}
    report = {
        "device": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu", "cpu_cores": len(os.sched_getaffinity(0)), "examples": n, "mean_tokens": args.mean_tokens,
        "rows": rows, "bytes_per_example_on_disk": bytes_per_example,
        "t5_base_forward_examples_per_second": forward,
        "store_bytes_per_second_to_match_forward": {fmt: forward * b for fmt, b in bytes_per_example.items()},
    }
    (args.out / "gpu_reader.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("\n| format | bytes/example | path | workers | examples/s |\n|---|---|---|---|---|")
    for key, row in rows.items():
        fmt, path, w = key.split("/")
        print(f"| {fmt} | {bytes_per_example[fmt]:,.0f} | {path} | {w} | {row['examples_per_second']:,.0f} |")
    print(f"\nT5-base forward (bf16, batch 64, {args.mean_tokens} tokens): {forward:,.0f} examples/s")


if __name__ == "__main__":
    main()
