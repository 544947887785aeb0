"""read-cache: READ (Recurrent Adaptation, arXiv 2305.15348) trained from a cache of a frozen backbone.

    read-cache build --model t5-base --task sst2      # run the backbone once, write a Zarr store
    read-cache train --rnn gru --dim 256              # train side networks from the store alone

From Python: `read_cache.open_cache(path)["train"][0].encoder_hidden`, or batches for a loop of your own:
`DataLoader(read_cache.CacheDataset(path, split="train"), batch_size=None)` (docs/your-own-loop.md).
"""

__version__ = "0.1.0"

from read_cache.store import Cache, Example, Split, open_cache  # noqa: E402

__all__ = ["Cache", "CacheDataset", "Example", "Split", "open_cache", "__version__"]


def __getattr__(name: str) -> object:
    # Lazily: `import read_cache` (every CLI command) must not import torch before its flags are checked.
    if name == "CacheDataset":
        from read_cache.training.dataset import CacheDataset

        return CacheDataset
    raise AttributeError(f"module 'read_cache' has no attribute {name!r}")
