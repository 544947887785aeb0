"""Which process of which launch this is, read from the variables torchrun sets (torch-free).

    >>> from read_cache.distributed.env import detect
    >>> detect()            # Launch(rank=0, world_size=1, ...) outside torchrun

torchrun (`python -m torch.distributed.run`) starts one process per device and tells each who it is
through RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/MASTER_PORT and, with an elastic
rendezvous, TORCHELASTIC_RUN_ID (a static rendezvous sets it to 'none'). Nothing here talks to the
other processes: that is `read_cache.distributed.group`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in a launch; one process alone is rank 0 of 1."""

    rank: int = 0
    """Global rank, 0..world_size-1; rank 0 creates the store, writes the reports and prints."""
    world_size: int = 1
    """Processes in the launch, over every node."""
    local_rank: int = 0
    """Rank on this node: the GPU this process takes (cuda:LOCAL_RANK)."""
    local_world_size: int = 1
    """Processes on this node: they share its CPU cores."""
    run_id: str | None = None
    """TORCHELASTIC_RUN_ID ('none' or absent with a static rendezvous)."""
    device: str | None = None
    """The device this rank works on, once `group.session` has picked it."""
    backend: str | None = None
    """'gloo' (CPU) or 'nccl' (CUDA) once the process group is up; None for one process."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def host(self) -> str:
        return socket.gethostname()

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} on {self.host})"


SINGLE = Launch()


def detect(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch torchrun's variables describe, or SINGLE when they are absent."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        from read_cache.errors import ReadCacheError

        raise ReadCacheError(
            f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} are not whole numbers; launch with torchrun, which sets them"
        ) from None
    return Launch(rank, world, local_rank, local_world, env.get("TORCHELASTIC_RUN_ID"))
