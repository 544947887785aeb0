"""Which codec per store format: ratio and one-thread encode/decode speed on real cached states (docs/storage.md).

    python examples/codec_choice.py CACHE [--tokens 16384]

Takes the first train tokens of CACHE (any format; decoded to float32), stores them in every format,
and compresses the codes with each candidate: blosc zstd-1 (byte shuffle, the default), blosc lz4-1
(byte shuffle), blosc zstd-1 with bit shuffle, and none. Speeds are one thread (blosc nthreads=1),
the median of 5 runs. Decode MB/s are of raw (code) bytes out, i.e. what the reader gets per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numcodecs
import numpy as np
from numcodecs import Blosc

import read_cache
from read_cache.store.formats import STORE_DTYPES, dequantise, get_format, quantise

CODECS = {
    "zstd-1 shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "zstd-1 bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "lz4-1 shuffle": Blosc(cname="lz4", clevel=1, shuffle=Blosc.SHUFFLE),
    "none": None,
}


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    numcodecs.blosc.set_nthreads(1)
    split = read_cache.open_cache(args.cache)["train"]
    fmt0 = split.cache.geometry.format
    rows = slice(0, min(args.tokens, split.n_tokens))
    scale = split.array("encoder_hidden_scale")[rows] if fmt0.compact else None
    x = dequantise(split.array("encoder_hidden")[rows], scale, fmt0)
    print(f"{x.shape[0]:,} tokens x {x.shape[1]} layers x {x.shape[2]} of {args.cache}\n")
    print("| format | codec | codes ratio | bytes/value (codes + scales) | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|")
    for name in STORE_DTYPES:
        fmt = get_format(name)
        codes, scales = quantise(x, fmt)
        raw = codes.tobytes()
        scale_bytes = 0 if scales is None else len(Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=0).encode(scales.tobytes()))
        for label, codec in CODECS.items():
            if codec is None:
                size, enc, dec = len(raw), 0.0, 0.0
            else:
                codec = Blosc(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle)
                blob = codec.encode(np.frombuffer(raw, dtype=codes.dtype))
                size = len(blob)
                enc = len(raw) / timed(lambda: codec.encode(np.frombuffer(raw, dtype=codes.dtype))) / 1e6
                dec = len(raw) / timed(lambda: codec.decode(blob)) / 1e6
            per_value = (size + scale_bytes) / x.size
            speed = ("-", "-") if codec is None else (f"{enc:,.0f}", f"{dec:,.0f}")
            print(f"| {name} | {label} | {len(raw) / size:.3f} | {per_value:.3f} | {speed[0]} | {speed[1]} |")


if __name__ == "__main__":
    main()
