"""The process group and the few collectives read-cache needs: barrier, gather, broadcast, agree.

    with session(cfg.device) as launch:     # SINGLE outside torchrun: every call below is then local
        launch = ...
        out = on_main(launch, lambda: claim(out))   # rank 0 does it; its result or error reaches every rank
        agree(launch, lambda: open_cache(path))     # every rank does it; any rank's error stops all of them

Errors are collective on purpose: a rank that fails alone would leave the others waiting in the next
barrier until the timeout. `agree` and `on_main` gather every rank's ReadCacheError and raise one
`RankError` on every rank, whose message names the ranks; rank 0 prints it, the others exit quietly.
Only small Python objects travel (configs, reports, validation logits), through torch's object collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from read_cache.config import record
from read_cache.distributed.env import Launch, detect
from read_cache.errors import ReadCacheError

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = datetime.timedelta(hours=2)
"""How long a collective waits for a slow rank. Ranks meet only at split and epoch ends, and a rank
that dies takes the launch down (torchrun stops the others; gloo notices a closed peer at once), so
this bounds only a rank that hangs."""

TEARDOWN_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a rank waits at the end of a session for the others to finish their collectives and leave (see
`leave`). Ranks arrive there together but for the work rank 0 alone does after the last collective (reports,
charts), so this bounds only a rank killed in between; when it passes, the rank leaves unordered."""

_sessions = itertools.count()
"""Numbers each session of this process, so a session's teardown keys are its own: torchrun's agent store
outlives a process group, and every rank runs the same sessions in the same order."""

# Flags whose names differ from their config field, for error messages.
FLAGS = {"float_dtype": "--store-dtype", "memory_budget_gb": "--memory-budget", "progress": "--no-progress"}


class RankError(ReadCacheError):
    """A ReadCacheError raised on every rank of a launch; rank 0 prints it, the others stay quiet."""


# --------------------------------------------------------------------------------------------------
# The process group


@contextlib.contextmanager
def session(device: str | None) -> Iterator[Launch]:
    """Join torchrun's process group for the block (gloo on CPU, nccl on CUDA); SINGLE outside torchrun."""
    launch = detect()
    if not launch.distributed:
        yield launch
        return
    picked = rank_device(device, launch)
    backend = "nccl" if picked.type == "cuda" else "gloo"
    launch = dataclasses.replace(launch, device=str(picked), backend=backend)
    if dist.is_initialized():  # the caller runs its own group (a script around the library calls)
        yield launch
        return
    if picked.type == "cuda":
        torch.cuda.set_device(picked)
    # torch.distributed.nn.functional binds `group.WORLD` as a default argument of 10 functions when first
    # imported. Imported inside the group (transformers' model imports pull it in), those defaults keep the
    # group alive after destroy_process_group: its gloo threads then ran on until the process exited, and a rank
    # could abort there ("terminate called without an active exception"). Imported first, they bind None.
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=picked if picked.type == "cuda" else None)
    log.debug("joined the process group as %s on %s (%s)", launch.describe(), picked, backend)
    # The store the group met through (torch has no public getter): it outlives the group, so the ranks can
    # still order their leaving once their sockets are closed.
    store = dist.distributed_c10d._get_default_store()
    in_step = False  # whether every rank leaves from the same point: a normal end, or an error all ranks agreed on
    try:
        yield launch
        in_step = True
    except RankError:
        in_step = True
        raise
    finally:
        leave(launch, store, f"read-cache/teardown/{next(_sessions)}", in_step=in_step)


def leave(launch: Launch, store: dist.Store, prefix: str, *, in_step: bool, destroy: Callable[[], None] = dist.destroy_process_group) -> None:
    """Destroy this rank's process group, in an order that closes no socket under a rank still using it.

    Left to themselves, the ranks tear down at once: one closes its gloo connections while another is still
    finishing its last collective or destroying its own group, and that rank can abort (SIGABRT) instead of
    exiting; and rank 0, which hosts the store of a launch started without torchrun's agent, could leave
    before the others are done with it. So a rank that ends in step with the others (`in_step`) waits, through
    the store, until every rank has finished its collectives, then until every rank above it has destroyed its
    group: the highest rank goes first and rank 0 last. A rank that fails alone (`in_step` false: a bug, a
    dead peer, Ctrl-C) never waits, since the others may be mid-work; it marks itself so that no rank waits
    for it, and leaves.
    """
    def key(what: str, rank: int) -> str:
        return f"{prefix}/{what}/{rank}"

    try:
        store.set(key("arrived", launch.rank), "in step" if in_step else "failed")
        if in_step:
            store.wait([key("arrived", rank) for rank in range(launch.world_size)], TEARDOWN_TIMEOUT)
            above = [key("left", rank) for rank in range(launch.rank + 1, launch.world_size)]
            if above:  # all of them, not just the next: a rank that failed alone is marked left early
                store.wait(above, TEARDOWN_TIMEOUT)
    except RuntimeError as e:  # the store's host is gone, or a rank never came (killed): leave unordered
        log.debug("%s leaves without waiting for the others: %s", launch.describe(), e)
    finally:  # Ctrl-C while waiting still tears the group down
        destroy()
    if launch.rank > 0:  # rank 0 is last: no one waits for it
        with contextlib.suppress(RuntimeError):
            store.set(key("left", launch.rank), "1")


def rank_device(device: str | None, launch: Launch) -> torch.device:
    """cuda:LOCAL_RANK where the user asked for CUDA (or nothing, and a GPU is here), else the CPU."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cpu":
        return torch.device("cpu")
    if not want.startswith("cuda"):
        raise ReadCacheError(f"--device {want} is not supported under torchrun; use cuda (each rank takes cuda:LOCAL_RANK) or cpu")
    if want != "cuda":
        raise ReadCacheError(f"--device {want} would put every rank on one GPU; pass --device cuda and each rank takes cuda:LOCAL_RANK")
    if not torch.cuda.is_available():
        raise ReadCacheError("--device cuda asked for CUDA but torch sees no GPU here; use --device cpu")
    if launch.local_rank >= torch.cuda.device_count():
        raise ReadCacheError(
            f"{launch.describe()} has no GPU of its own ({torch.cuda.device_count()} visible); "
            f"launch at most {torch.cuda.device_count()} processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


# --------------------------------------------------------------------------------------------------
# Collectives (each a local no-op for one process)


@contextlib.contextmanager
def _peers_alive(launch: Launch) -> Iterator[None]:
    """A collective that fails because another rank died becomes one clear line, not a gloo/nccl traceback."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and gloo's "Connection closed by peer" are RuntimeErrors
        if not peer_failure(e):
            raise
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ReadCacheError(
            f"{launch.describe()}: another rank of this launch stopped ({reason[-160:]}); its own output says why. "
            "What a build wrote is durable: rerun the same command to resume"
        ) from e


def peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (not a bug in this one)."""
    text = str(error).lower()
    return isinstance(error, dist.DistBackendError) or any(s in text for s in ("closed by peer", "connection reset", "broken pipe", "timed out"))


def peers_alive(launch: Launch) -> contextlib.AbstractContextManager[None]:
    """Around work that runs collectives of its own (DDP's gradient all-reduce): a dead peer becomes one line."""
    return _peers_alive(launch) if launch.distributed else contextlib.nullcontext()


def barrier(launch: Launch) -> None:
    if launch.distributed:
        with _peers_alive(launch):
            dist.barrier()


def gather(launch: Launch, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not launch.distributed:
        return [value]
    values: list[Any] = [None] * launch.world_size
    with _peers_alive(launch):
        dist.all_gather_object(values, value)
    return values


def broadcast(launch: Launch, value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not launch.distributed:
        return value
    box = [value]
    with _peers_alive(launch):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(launch: Launch, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return any(gather(launch, bool(flag)))


# --------------------------------------------------------------------------------------------------
# Errors every rank agrees on


def agree(launch: Launch, work: Callable[[], T], *, main_only: bool = False) -> T | None:
    """Run `work` on every rank (or rank 0 alone); if it raised ReadCacheError anywhere, raise on every rank.

    One process simply runs `work`; its error passes through unchanged.
    """
    if not launch.distributed:
        return work()
    result, error = None, None
    if launch.is_main or not main_only:
        try:
            result = work()
        except RankError:
            raise
        except ReadCacheError as e:
            error = str(e)
    errors = gather(launch, (launch.describe(), error))
    failed = [(who, message) for who, message in errors if message]
    if failed:
        raise RankError(_explain(failed, launch.world_size))
    return result


def on_main(launch: Launch, work: Callable[[], T]) -> T:
    """Rank 0 runs `work`; every rank gets its result, or raises its error."""
    result = agree(launch, work, main_only=True)
    return broadcast(launch, result)


def _explain(failed: list[tuple[str, str]], world_size: int) -> str:
    if len(failed) == 1 and failed[0][0].startswith("rank 0 "):
        return failed[0][1]  # rank 0's own error reads as it would in one process
    by_message: dict[str, list[str]] = {}
    for who, message in failed:
        by_message.setdefault(message, []).append(who)
    return "; ".join(f"{', '.join(ranks)}: {message}" for message, ranks in by_message.items())


def check_same_arguments(launch: Launch, cfg: Any) -> None:
    """Refuse a launch whose ranks were given different configs (compares a hash of the whole config, secrets
    included; the message names the flags with secrets masked, through `config.record`)."""
    if not launch.distributed:
        return
    digest = hashlib.sha256(_text(record(cfg, masked=False)).encode()).hexdigest()
    every = gather(launch, (digest, record(cfg)))
    reference_digest, reference = every[0]
    differing = []
    for rank, (other, values) in enumerate(every[1:], 1):
        if other == reference_digest:
            continue
        keys = [k for k in sorted(set(values) | set(reference)) if _text(values.get(k)) != _text(reference.get(k))]
        shown = ", ".join(f"{FLAGS.get(k, '--' + k.replace('_', '-'))} {values.get(k)!r} where rank 0 has {reference.get(k)!r}" for k in keys)
        differing.append(f"rank {rank} has {shown or 'other --storage-options secrets (masked)'}")
    if differing:
        raise RankError(f"the ranks of this launch were given different arguments ({'; '.join(differing)}); launch every rank with the same command")


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
