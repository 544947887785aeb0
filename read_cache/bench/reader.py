"""`read-cache bench --methods reader`: how fast each store format feeds training, with no training step.

For every format (bfloat16, fp8, int8, int4; each a transcode of the bench's cache, so the same
states) and in one process, formats interleaved round by round so they share the machine's moods:

  limit    memcpy of a window-sized buffer, and `preadv` of every chunk file of the train split's stored
           arrays from the page cache into a reused page-aligned buffer (1 and 2 threads; the faster is
           the limit)
  window   the same files read into their own places of a window-sized buffer, each CRC32C computed
           there: what a checked read into a window held in host memory must do at least (`stream-host`'s
           ceiling)
  staged   the same files read in pieces of up to 4 MB through two small buffers per thread, the CRC32C
           over the pieces: what a checked read staged to a device must do at least (`stream`'s ceiling)
  engines  the states array read whole, block by block, through zarr-python's pipeline, the `zarrs`
           pipeline, tensorstore and store.direct (preadv + crc32c): which engine the reader uses, by data
  stream   one shuffled epoch of `SplitReader` batches from the store, as a GPU gets them (`coded`, staged):
           every chunk read and checked through the reading thread's small host buffers and handed to its
           place in the device's window (training.staging), and each batch's offsets into the window (a
           `WindowBatch`: the device gathers the tokens, training.pools), 1 and 2 workers. The device here
           is torch's `meta`, on which the copy costs nothing: on a GPU the copy engine does it, not the
           host, so this is the host's whole share (a projection of the GPU's side: docs/benchmarks.md).
           Timed as training reads it once under way: after two untimed epochs (a reader's window slots
           settle in its second), its first window read ahead during the epoch before, the next epoch's
           read during it. `stream-host` is the same epoch with each window landed whole in host
           memory (how a CPU run reads, and a GPU's stream did before staging); `stream-cold` the staged
           epoch from a fresh reader, as a run's first epoch: its first window read while nothing else
           runs; `stream-float32` the steady epoch gathered and dequantised to float32 on the host, as a
           CPU run trains on it
  ram      the same epoch from RAM, as the RAM tier feeds a GPU: each batch's codes + scales gathered on
           the host into a reused buffer (a `CodedBatch`)

Reported (medians over the rounds): examples/s, GB/s of stored bytes (the chunk files' sizes: what an
epoch reads), the cores kept busy (process CPU seconds / wall), and per format the bench.json entry the
issue names: `limit_preadv_gbps` and, per path (`stream`, `ram`, best worker count), `stored_gbps` and
`examples_per_second`; beside them the two ceilings (`window_gbps`, `staged_gbps`) and each stream's share of its own,
and `stream_of_limit_rounds`: the stream's share of the limit in each round (a single run's spread).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from read_cache.bench.common import metered
from read_cache.config import BenchConfig
from read_cache.errors import ReadCacheError
from read_cache.store import Split, open_cache, read_root_attrs
from read_cache.store.direct import checksum
from read_cache.store.engines import ENGINES, engine_readers
from read_cache.store.transcode import transcode
from read_cache.training.pools import STORED
from read_cache.training.reader import SHUFFLE_BYTES, SplitReader
from read_cache.training.staging import BUFFERS, STAGE_BYTES
from read_cache.util.aligned import PAGE, page_aligned

FORMATS = ("bfloat16", "fp8", "int8", "int4")
WORKERS = (1, 2)
PATHS = ("stream", "stream-host", "stream-cold", "ram", "stream-float32")
"""`stream`, `stream-host` and `stream-float32` in steady state (see `epoch`), `stream-cold` an epoch read from a standing start."""
STEADY = ("stream", "stream-host", "stream-float32")
STAGED = ("stream", "stream-cold")
"""The paths that stage windows to a device (`meta`: the host's share of feeding a GPU, see the module)."""


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


def stored_files(split: Split, names: Iterable[str] = STORED.values()) -> list[Path]:
    """The chunk files of the split's stored arrays (by default all a training epoch reads)."""
    root = split.cache.location.path / split.name
    return [f for name in names if (root / name / "c").is_dir() for f in sorted((root / name / "c").rglob("*")) if f.is_file()]


LIMITS = ("preadv", "window", "staged")
"""What `preadv_seconds` lands into: the issue's limit, and the least the two ways of streaming must do."""


def preadv_seconds(files: list[Path], threads: int, target: str = "preadv") -> float:
    """Wall seconds to `preadv` every file from the page cache (once warm), `threads` at a time, into
    page-aligned memory, as the reader's buffers are (at 16 bytes past a page, where a plain bytearray
    lands, the same reads ran ~4x slower: util.aligned). `target`:

      preadv   each thread reuses one file-sized buffer, which stays in the core's cache: the issue's limit
      window   every file lands at its own place in a window-sized buffer, as a window held in host memory
               must hold its chunks, and its CRC32C is computed there: the ceiling of `stream-host`
      staged   each file read in STAGE_BYTES pieces, in turn into each thread's BUFFERS small buffers, the
               CRC32C running over the pieces: the ceiling of the staged `stream` (training.staging)
    """
    sizes = [f.stat().st_size for f in files]
    piece = STAGE_BYTES if target == "staged" else max(sizes)
    if target == "window":
        places = np.cumsum([0] + [-(-size // PAGE) * PAGE for size in sizes[:-1]]) % SHUFFLE_BYTES
        buffers = [[page_aligned(SHUFFLE_BYTES + max(sizes))]] * threads
    else:
        places = np.zeros(len(files), np.int64)
        buffers = [[page_aligned(piece) for _ in range(BUFFERS if target == "staged" else 1)] for _ in range(threads)]
    for mine in buffers:
        for buffer in mine:
            buffer.fill(0)  # touched before the clock starts, as the reader's reused buffers are: first touches are slow here

    def read(thread: int) -> None:
        turn = 0
        for i in range(thread, len(files), threads):
            fd = os.open(files[i], os.O_RDONLY)
            try:
                crc = 0
                for at in range(0, sizes[i], piece):
                    data = buffers[thread][turn % len(buffers[thread])][places[i] : places[i] + min(piece, sizes[i] - at)]
                    turn += 1
                    os.preadv(fd, [data], at)
                    if target != "preadv":
                        crc = checksum(data, crc)
            finally:
                os.close(fd)

    started = time.perf_counter()
    if threads == 1:
        read(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(threads)))
    return time.perf_counter() - started


def memcpy_gbps(nbytes: int = 128 << 20, repeats: int = 5) -> float:
    src, dst = page_aligned(nbytes), page_aligned(nbytes)
    src.fill(1)
    np.copyto(dst, src)
    started = time.perf_counter()
    for _ in range(repeats):
        np.copyto(dst, src)
    return nbytes * repeats / (time.perf_counter() - started) / 1e9


def engine_seconds(read: Callable[[int, int], Any], rows: int, chunk_rows: int, block_chunks: int = 8) -> float:
    """Wall seconds to read every row of an array in blocks of whole chunks (a reader's reads)."""
    step = chunk_rows * block_chunks
    started = time.perf_counter()
    for a in range(0, rows, step):
        read(a, min(rows, a + step))
    return time.perf_counter() - started


def epoch(reader: SplitReader, steady: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch's batches; CPU counts every thread, the reader's pools included.
    `steady` times an epoch as training reads it once under way: two untimed epochs before it, the last
    reading this one's first window ahead, and the next epoch's first window read during it (timed, and
    waited for). Two, because a reader's window slots reach their steady number only in its second epoch
    (the first starts with no window read ahead), and a slot allocated inside the timed epoch is fresh
    memory, which this VM first touches at ~0.5 GB/s: that one-time cost is `stream-cold`'s, not a steady
    epoch's. Batches are dropped as they come: one held past its epoch would hold its window, and the next
    would take fresh memory."""
    if steady:
        for warm in (0, 1):
            collections.deque(reader.epoch(warm, next_epoch=warm + 1), maxlen=0)
        reader.wait_read_ahead()
    started, cpu = time.perf_counter(), time.process_time()
    collections.deque(reader.epoch(2, next_epoch=3 if steady else None), maxlen=0)
    reader.wait_read_ahead()
    return time.perf_counter() - started, time.process_time() - cpu


def reader(cfg: BenchConfig, rounds: int = 3) -> dict[str, Any]:
    result, meter = metered(_measure, cfg, rounds)
    return {"meter": meter, "total_seconds": meter["wall_seconds"], **result}


def _reader(split: Split, path: str, workers: int, batch_size: int) -> SplitReader:
    mode, device = "ram" if path == "ram" else "stream", "meta" if path in STAGED else "cpu"
    return SplitReader(split, batch_size=batch_size, shuffle=True, seed=0, mode=mode, workers=workers, device=device, coded=path != "stream-float32")


def _ram_readers(splits: dict[str, Split], batch_size: int) -> dict[tuple[str, int], SplitReader]:
    """The RAM tier's readers, loaded once. Streaming readers are made per epoch timed instead: each keeps its
    window buffers (~0.5 GB), and two dozen kept at once squeezed the page cache the bench reads from."""
    readers = {}
    for fmt, split in splits.items():
        for workers in WORKERS:
            readers[fmt, workers] = _reader(split, "ram", workers, batch_size)
            readers[fmt, workers].load()
    return readers


def _measure(cfg: BenchConfig, rounds: int) -> dict[str, Any]:
    caches = format_caches(cfg.out / "cache", cfg.out / "reader-caches")
    splits = {fmt: open_cache(path)["train"] for fmt, path in caches.items()}
    files = {fmt: stored_files(split) for fmt, split in splits.items()}
    stored = {fmt: sum(f.stat().st_size for f in fs) for fmt, fs in files.items()}
    ram = _ram_readers(splits, cfg.batch_size)
    engines = {fmt: engine_readers(split) for fmt, split in splits.items()}
    seconds: dict[str, list[tuple[float, float]]] = {}
    memcpy = []
    for round_ in range(rounds):
        memcpy.append(memcpy_gbps())
        for fmt in FORMATS[round_ % len(FORMATS) :] + FORMATS[: round_ % len(FORMATS)]:
            for workers in WORKERS:
                for limit in LIMITS:
                    wall = preadv_seconds(files[fmt], workers, limit)
                    seconds.setdefault(f"{fmt}/{limit}/{workers}", []).append((wall, wall))
                for path in PATHS:
                    steady = path in STEADY
                    reader = ram[fmt, workers] if path == "ram" else _reader(splits[fmt], path, workers, cfg.batch_size)
                    seconds.setdefault(f"{fmt}/{path}/{workers}", []).append(epoch(reader, steady))
                    del reader
            array = splits[fmt].array("encoder_hidden")
            for engine, read in engines[fmt].items():
                wall = engine_seconds(read, array.shape[0], array.chunks[0])
                seconds.setdefault(f"{fmt}/engine-{engine}/1", []).append((wall, wall))
    rows = {}
    for key, values in seconds.items():
        fmt = key.split("/")[0]
        s = statistics.median(wall for wall, _ in values)
        nbytes = _engine_bytes(splits[fmt]) if "/engine-" in key else stored[fmt]
        rows[key] = {
            "seconds": s, "examples_per_second": len(splits[fmt]) / s, "stored_gbps": nbytes / s / 1e9,
            "cores_busy": statistics.median(cpu / wall for wall, cpu in values), "all_seconds": [wall for wall, _ in values],
        }
    formats = {fmt: _format_entry(fmt, rows, stored[fmt], len(splits[fmt])) for fmt in FORMATS}
    return {
        "rows": rows, "formats": formats, "memcpy_gbps": statistics.median(memcpy), "rounds": rounds,
        "examples": len(next(iter(splits.values()))), "load_average": os.getloadavg(), "cores": os.cpu_count(),
    }


def _engine_bytes(split: Split) -> int:
    return sum(f.stat().st_size for f in stored_files(split, ("encoder_hidden",)))


def _format_entry(fmt: str, rows: dict[str, Any], stored: int, examples: int) -> dict[str, Any]:
    """bench.json's per-format entry: the preadv limit, and each path at its best worker count."""
    def fastest(path: str) -> dict[str, Any]:  # the path's row at its best worker count
        return max((rows[f"{fmt}/{path}/{w}"] for w in WORKERS), key=lambda r: r["stored_gbps"])

    def best(path: str) -> dict[str, Any]:
        r = fastest(path)
        return {"stored_gbps": r["stored_gbps"], "examples_per_second": r["examples_per_second"]}

    limit, window, staged = (fastest(target)["stored_gbps"] for target in LIMITS)
    entry = {"limit_preadv_gbps": limit, "window_gbps": window, "staged_gbps": staged, "stored_bytes": stored, "stored_bytes_per_example": stored / examples}
    entry.update({path: best(path) for path in PATHS})
    entry["stream_of_limit"] = entry["stream"]["stored_gbps"] / limit
    # The same share round by round (the same bytes, so limit seconds over stream seconds): runs of the same code
    # differ by about +-0.09 here, and the rounds show how much of that one run holds.
    entry["stream_of_limit_rounds"] = [t / s for t, s in zip(fastest("preadv")["all_seconds"], fastest("stream")["all_seconds"])]
    entry["stream_of_staged"] = entry["stream"]["stored_gbps"] / staged
    entry["stream_host_of_limit"] = entry["stream-host"]["stored_gbps"] / limit
    entry["stream_host_of_window"] = entry["stream-host"]["stored_gbps"] / window
    entry["engines_gbps"] = {e: rows[f"{fmt}/engine-{e}/1"]["stored_gbps"] for e in ENGINES if f"{fmt}/engine-{e}/1" in rows}
    return entry


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Reader throughput, train split ({result['examples']:,} examples), one epoch, no training step; "
        f"medians of {result['rounds']} interleaved rounds; memcpy {result['memcpy_gbps']:.1f} GB/s; "
        f"load average {', '.join(f'{x:.1f}' for x in result['load_average'])}",
        "",
        "| format | stored B/example | path | workers | examples/s | stored GB/s | of preadv | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for fmt in FORMATS:
        entry = result["formats"][fmt]
        for workers in WORKERS:
            for path in (*LIMITS, *PATHS):
                r = rows[f"{fmt}/{path}/{workers}"]
                lines.append(
                    f"| {fmt} | {entry['stored_bytes_per_example']:,.0f} | {path} | {workers} | {r['examples_per_second']:,.0f} | "
                    f"{r['stored_gbps']:.2f} | {r['stored_gbps'] / entry['limit_preadv_gbps']:.2f} | {r['cores_busy']:.2f} |"
                )
    lines += ["", "Stream of the preadv limit, round by round (each round's stream against its own limit):", ""]
    lines += [f"- {fmt}: " + ", ".join(f"{r:.2f}" for r in result["formats"][fmt]["stream_of_limit_rounds"]) for fmt in FORMATS]
    lines += ["", "Engines (encoder_hidden read whole in 8-chunk blocks, 1 thread, stored GB/s):", "",
              "| format | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
    for fmt in FORMATS:
        e = result["formats"][fmt]["engines_gbps"]
        lines.append(f"| {fmt} | " + " | ".join(f"{e[k]:.2f}" if k in e else "-" for k in ENGINES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
