"""`read-cache bench --methods reader`: how fast each store format feeds training, with no training step.

For every format (bfloat16, fp8, int8, int4; each a transcode of the bench's cache, so the same
states) and in one process, formats interleaved round by round so they share the machine's moods:

  limit        read every chunk of the train split in order and decode it to float32 (read_block +
               dequantise), on 1 and on 2 threads: what the bytes and the codec allow
  stream / ram one shuffled epoch of `SplitReader` batches (float32 tensors, as training gets them),
               from the store and from RAM, with 1 and 2 reader workers

Reported: examples/s and decoded GB/s (float32 bytes delivered), medians over the rounds, the cores
kept busy (process CPU seconds / wall seconds: zarr decodes a read's chunks on its own thread pool, so
one worker can already keep more than one core busy), and the ratios the issue asks for (reader /
limit, 8-bit / bfloat16, 2 workers / 1).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from read_cache.bench.common import metered
from read_cache.config import BenchConfig
from read_cache.errors import ReadCacheError
from read_cache.store import Split, open_cache, read_root_attrs
from read_cache.store.formats import get_format
from read_cache.store.transcode import transcode
from read_cache.training.reader import SplitReader, decode

FORMATS = ("bfloat16", "fp8", "int8", "int4")
WORKERS = (1, 2)


def format_caches(source: Path, root: Path) -> dict[str, Path]:
    """One cache per format, transcoded from `source` (kept between runs)."""
    attrs = read_root_attrs(source)
    if attrs is None:
        raise ReadCacheError(f"{source} holds no cache; run `read-cache bench ... --methods build` first")
    caches = {}
    for fmt in FORMATS:
        if attrs["float_dtype"] == fmt:
            caches[fmt] = source
            continue
        dest = root / fmt
        if not (dest / "zarr.json").is_file():
            transcode(source, dest, fmt)
        caches[fmt] = dest
    return caches


def _decoded_bytes(split: Split) -> int:
    g = split.cache.geometry
    states, cross = g.values(split.n_tokens, len(split))
    return 4 * (states + cross)


def limit(split: Split, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds to read and decode every chunk of the split once, in order: the bytes' and
    the codec's limit. Each read is one chunk of the states (with its scales and cross-attention), so
    nothing is decoded twice, as a reader's blocks do where they cut through a chunk."""
    g = split.cache.geometry
    scaled = g.format.compact
    pieces = [("encoder_hidden", "cross_attention" if g.cross_attention else None)]
    if g.cross_attention:
        pieces.append(("decoder_hidden", None))
    jobs = []
    for states, beside in pieces:
        rows, chunk = split.array(states).shape[0], split.array(states).chunks[0]
        jobs += [(states, beside, slice(a, min(a + chunk, rows))) for a in range(0, rows, chunk)]

    def one(job: tuple[str, str | None, slice]) -> None:
        states, beside, rows = job
        scale = split.array(f"{states}_scale")[rows] if scaled else None
        decode(split.array(states)[rows], scale, g.format)
        if beside is not None:
            decode(split.array(beside)[rows], None, get_format(g.cross_dtype))

    started, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for job in jobs:
            one(job)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, jobs))
    return time.perf_counter() - started, time.process_time() - cpu


def epoch(reader: SplitReader) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch's batches; CPU counts every thread, zarr's decoding pool included."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in reader.epoch(1):
        pass
    return time.perf_counter() - started, time.process_time() - cpu


def reader(cfg: BenchConfig, rounds: int = 3) -> dict[str, Any]:
    result, meter = metered(_measure, cfg, rounds)
    return {"meter": meter, "total_seconds": meter["wall_seconds"], **result}


def _measure(cfg: BenchConfig, rounds: int) -> dict[str, Any]:
    caches = format_caches(cfg.out / "cache", cfg.out / "reader-caches")
    splits = {fmt: open_cache(path)["train"] for fmt, path in caches.items()}
    readers = {}
    for fmt, split in splits.items():
        for workers in WORKERS:
            for mode in ("stream", "ram"):
                r = SplitReader(split, batch_size=cfg.batch_size, shuffle=True, seed=0, mode=mode, workers=workers, device="cpu")
                if mode == "ram":
                    r.load()
                readers[fmt, mode, workers] = r
    seconds: dict[str, list[tuple[float, float]]] = {}
    for round_ in range(rounds):
        order = FORMATS[round_ % len(FORMATS) :] + FORMATS[: round_ % len(FORMATS)]
        for fmt in order:
            for workers in WORKERS:
                seconds.setdefault(f"{fmt}/limit/{workers}", []).append(limit(splits[fmt], workers))
                for mode in ("stream", "ram"):
                    seconds.setdefault(f"{fmt}/{mode}/{workers}", []).append(epoch(readers[fmt, mode, workers]))
    rows = {}
    for key, values in seconds.items():
        fmt = key.split("/")[0]
        s = statistics.median(wall for wall, _ in values)
        split = splits[fmt]
        rows[key] = {
            "seconds": s, "examples_per_second": len(split) / s, "decoded_gb_per_second": _decoded_bytes(split) / s / 1e9,
            "cores_busy": statistics.median(cpu / wall for wall, cpu in values), "all_seconds": [wall for wall, _ in values],
        }
    ratios = {}
    for fmt in FORMATS:
        for workers in WORKERS:
            ratios[f"{fmt} stream/limit, {workers} worker(s)"] = rows[f"{fmt}/stream/{workers}"]["examples_per_second"] / rows[f"{fmt}/limit/{workers}"]["examples_per_second"]
        ratios[f"{fmt} stream 2 workers / 1"] = rows[f"{fmt}/stream/2"]["examples_per_second"] / rows[f"{fmt}/stream/1"]["examples_per_second"]
        ratios[f"{fmt} stream / bfloat16 stream, 1 worker"] = rows[f"{fmt}/stream/1"]["examples_per_second"] / rows["bfloat16/stream/1"]["examples_per_second"]
    disk = {fmt: {"disk_bytes": open_cache(path).disk_bytes("train"), "bytes_per_example": open_cache(path).disk_bytes("train") / len(splits[fmt])} for fmt, path in caches.items()}
    return {
        "rows": rows, "ratios": ratios, "disk": disk, "rounds": rounds,
        "examples": len(next(iter(splits.values()))), "load_average": os.getloadavg(),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Reader throughput, train split ({result['examples']:,} examples), one epoch, no training step; "
        f"medians of {result['rounds']} interleaved rounds; load average {', '.join(f'{x:.1f}' for x in result['load_average'])}",
        "",
        "| format | bytes/example on disk | source | workers | examples/s | decoded GB/s | of the limit | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for fmt in FORMATS:
        for workers in WORKERS:
            lim = rows[f"{fmt}/limit/{workers}"]["examples_per_second"]
            for source in ("limit", "stream", "ram"):
                r = rows[f"{fmt}/{source}/{workers}"]
                lines.append(
                    f"| {fmt} | {result['disk'][fmt]['bytes_per_example']:,.0f} | {source} | {workers} | {r['examples_per_second']:,.0f} | "
                    f"{r['decoded_gb_per_second']:.3f} | {r['examples_per_second'] / lim:.2f} | {r['cores_busy']:.2f} |"
                )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
