"""Several processes, one job: the build, the sweep and training under torchrun.

    torchrun --nproc-per-node 8 -m read_cache build --model t5-base --task qqp
    torchrun --nproc-per-node 8 -m read_cache sweep --rnn gru,lstm --dim 128,256 --out sweeps/qqp
    torchrun --nproc-per-node 8 -m read_cache train --rnn gru --dim 256

No launcher of our own: torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK (`env`);
`group` joins its process group (gloo on CPU, nccl on CUDA) and holds the few collectives used (barrier,
gather, broadcast, and errors every rank agrees on); `shard` says which rank does what; `lock` makes a
launch one writer of a store; `progress` lets rank 0 count every rank's build work from the store.
One process outside torchrun is rank 0 of 1, and every helper is then a no-op. docs/distributed.md has
the commands for one node and several, and how resume works.

Only `env` is imported eagerly (it is torch-free, so the CLI can ask for the rank before torch loads).
"""

from __future__ import annotations

import importlib
from typing import Any

from read_cache.distributed.env import SINGLE, Launch, detect

_LAZY = {
    "session": "group", "rank_device": "group", "barrier": "group", "gather": "group", "broadcast": "group",
    "any_rank": "group", "peers_alive": "group", "agree": "group", "on_main": "group", "check_same_arguments": "group", "RankError": "group",
    "round_robin": "shard", "balanced": "shard", "launch_lock": "lock", "LAUNCH_RECORD": "lock", "UnitPoller": "progress",
}

__all__ = ["SINGLE", "Launch", "detect", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"read_cache.distributed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'read_cache.distributed' has no attribute {name!r}")
