"""Streaming epochs of fresh readers (as a training run starts them) against `preadv` of the same files.

    python examples/stream_epochs.py CACHE --rounds 2
    python examples/stream_epochs.py CACHE --rounds 9 --workers 2 --devices cpu,meta   # host windows against staged
    (cd OLD_CHECKOUT && PYTHONPATH=. python /path/to/examples/stream_epochs.py CACHE)   # another version's reader

For 1 and 2 workers: the train split's chunk files read by `preadv` into reused buffers (the limit), then
one epoch of coded batches (codes + scales + offsets, batch 96) from a standing start (`cold`), and one
timed as training reads it (`steady`: after two untimed epochs, its first window read ahead during the
last of them, the next epoch's read during it and waited for). Each reader is made afresh, so its buffers are new memory,
as in a training run's first epochs. Runs on any version of read_cache whose `SplitReader` has
`epoch(e, next_epoch)` (docs/benchmarks.md compares two this way, alternating the versions).

`--devices cpu,meta` times both ways a stream lands its windows, alternating within each round: `cpu`
lands each window whole in host memory, `meta` stages every chunk through the reading thread's small
buffers to a window on torch's meta device, where the copy costs nothing (the host's share of feeding a
GPU: training.staging; versions with `SplitReader(stage=...)` only), with their ceilings (`window`,
`staged`: bench.reader.preadv_seconds) beside the limit. Each line also gives the median of the
per-round ratios to that round's limit.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

from read_cache.bench.reader import preadv_seconds, stored_files
from read_cache.store import open_cache
from read_cache.training.reader import SplitReader


def epoch_seconds(split, workers: int, steady: bool, device: str = "cpu") -> float:  # noqa: ANN001 - any version's Split
    # Batches and futures are never left bound to a name: a batch held past its epoch holds its window
    # too, and the reader would allocate fresh memory for the next one, inside the timed epoch.
    reader = SplitReader(split, batch_size=96, shuffle=True, seed=0, mode="stream", workers=workers, device=device, coded=True)
    if steady:  # two epochs before, as bench.reader.epoch: window slots reach their steady number in the second
        for warm in (0, 1):
            collections.deque(reader.epoch(warm, next_epoch=warm + 1), maxlen=0)
        [future.result() for future in list(reader._early.values())]  # the read ahead lands before the clock starts
    started = time.perf_counter()
    n = sum(len(batch["label"]) for batch in reader.epoch(2, next_epoch=3 if steady else None))
    [future.result() for future in list(reader._early.values())]
    assert n == len(split), (n, len(split))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--devices", default="cpu", help="comma list: cpu (host windows), meta (staged; see the module)")
    args = parser.parse_args()
    split = open_cache(args.cache)["train"]
    files = stored_files(split)
    nbytes = sum(f.stat().st_size for f in files)
    devices = args.devices.split(",")
    ceilings = {"cpu": "window", "meta": "staged"}
    gbps: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for workers in (int(w) for w in args.workers.split(",")):
            gbps.setdefault(f"preadv/{workers}", []).append(nbytes / preadv_seconds(files, workers) / 1e9)
            for device in devices if devices != ["cpu"] else []:  # older versions know only the plain limit
                gbps.setdefault(f"{ceilings[device]}/{workers}", []).append(nbytes / preadv_seconds(files, workers, ceilings[device]) / 1e9)
            for steady in (False, True):
                for device in devices:
                    key = f"stream-{'steady' if steady else 'cold'}-{device}/{workers}"
                    gbps.setdefault(key, []).append(nbytes / epoch_seconds(split, workers, steady, device) / 1e9)
    for key, values in sorted(gbps.items()):
        rate, limit = statistics.median(values), gbps[f"preadv/{key.split('/')[1]}"]
        share = statistics.median(v / lim for v, lim in zip(values, limit))
        print(f"{key:24s} median {rate:.2f} GB/s, {rate * 1e9 / nbytes * len(split):,.0f} examples/s, {share:.2f} of the round's preadv")


if __name__ == "__main__":
    main()
