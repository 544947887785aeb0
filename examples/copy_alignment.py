"""Where a read buffer starts, and how fast `preadv` from the page cache fills it.

    python examples/copy_alignment.py CACHE --rounds 3

Reads every chunk file of the train split's `encoder_hidden` (from the page cache once warm) into one
reused buffer placed 0, 16, 64, 256, 2048 and 3000 bytes past a page, and prints GB/s per placement.
On the AMD EPYC VM of docs/benchmarks.md, 16 bytes past a page, where glibc's `malloc` (and so numpy and
bytearray) puts large blocks, ran ~2 GB/s and every other placement 6-8: why `util.aligned` exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from read_cache.bench.reader import stored_files
from read_cache.store import open_cache
from read_cache.util.aligned import PAGE, page_aligned

OFFSETS = (0, 16, 64, 256, 2048, 3000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = stored_files(open_cache(args.cache)["train"], ("encoder_hidden",))
    size = max(f.stat().st_size for f in files)
    memory = page_aligned(size + PAGE)
    rates: dict[int, list[float]] = {offset: [] for offset in OFFSETS}
    for _ in range(args.rounds):
        for offset in OFFSETS:
            started = time.perf_counter()
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.preadv(fd, [memory[offset : offset + os.fstat(fd).st_size]], 0)
                finally:
                    os.close(fd)
            rates[offset].append(sum(f.stat().st_size for f in files) / (time.perf_counter() - started) / 1e9)
    for offset, values in rates.items():
        print(f"{offset:5d} bytes past a page: median {statistics.median(values):.2f} GB/s ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
