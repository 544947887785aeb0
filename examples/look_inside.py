"""Open a cache and look at what the frozen backbone computed, one example at a time.

    python examples/look_inside.py caches/mrpc-t5-small [--split validation] [--index 3]

Prints each token with its cross-attention weight (how much the decoder's first position read it,
per decoder layer) and the norm of its hidden state at every encoder layer: the growth of T5's
residual stream is why READ's joiner normalises its input.
"""

from __future__ import annotations

import argparse

import numpy as np

import read_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()

    cache = read_cache.open_cache(args.cache)
    print(cache)
    split = cache[args.split]
    ex = split[args.index]
    words = cache.attrs["task"]["label_words"]
    label = words[int(ex.label)] if words else f"{ex.label:.2f}"
    print(f"{args.split}[{args.index}]: {len(ex.input_ids)} tokens, label {label}, original row {ex.index}")
    norms = np.linalg.norm(ex.encoder_hidden, axis=-1)  # [m, N_E]
    print("token id | " + " ".join(f"|h{layer + 1}|" for layer in range(norms.shape[1])) + " | cross-attention by decoder layer")
    for t, token in enumerate(ex.input_ids):
        cross = "" if ex.cross_attention is None else " ".join(f"{w:.2f}" for w in np.atleast_1d(ex.cross_attention[t]).ravel())
        print(f"{token:8d} | " + " ".join(f"{n:5.1f}" for n in norms[t]) + f" | {cross}")


if __name__ == "__main__":
    main()
