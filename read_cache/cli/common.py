"""What the commands share: the consoles, the options several commands take, and the error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from read_cache.errors import ReadCacheError

console = Console(stderr=True)
out_console = Console()


# Options shared by several commands.
CacheArg = Annotated[Optional[str], typer.Option("--cache", help="Cache folder or URL (s3://bucket/prefix, gs://, az://...); default: the last one built.")]
StorageOptions = Annotated[
    Optional[str],
    typer.Option("--storage-options", help="JSON options for a cache URL (obstore's from_url keys for s3/gs/az, fsspec's for others); credentials usually come from the environment."),
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars (logs stay).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Examples per step (the paper: 96).")]
Reader = Annotated[str, typer.Option("--reader", help="auto (the GPU, then RAM, where the splits fit the budgets), device (codes on the GPU), ram, or stream.")]
MemoryBudget = Annotated[float, typer.Option("--memory-budget", help="GB of RAM the decoded splits may take.")]
DeviceMemoryBudget = Annotated[
    Optional[float], typer.Option("--device-memory-budget", help="GB of GPU memory --reader device/auto may fill with codes; default: 0.8 of the free memory.")
]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N; default: CUDA when present.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="bf16 or fp32 autocast; default: bf16 where it pays.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch; default: all cores but one (one feeds the reader).")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="t5 (T5's label words) or lst (Ladder Side-Tuning's splits and label digits, as the paper ran it).")]
DropLayers = Annotated[int, typer.Option("--drop-last-layers", help="Drop the model's last K encoder and decoder layers before caching (READ-large: 4).")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="paper: batch 96, up to 30 epochs, stop at the first epoch without a better validation score, Table 9's learning rates.")]
Seeds = Annotated[int, typer.Option("--seeds", help="Run each configuration with this many seeds (--seed, --seed+1, ...): mean and std.")]
NoRecurrence = Annotated[bool, typer.Option("--no-recurrence", help="A separate RNN cell per layer instead of one shared cell (the paper's Table 2 ablation).")]
ReportTo = Annotated[
    str, typer.Option("--report-to", help="Comma list of where each epoch's loss, validation score and examples/s go: tensorboard (RUN/tensorboard/), wandb, or none.")
]
ReaderWorkers = Annotated[Optional[int], typer.Option("--reader-workers", help="Threads decoding chunks in parallel; default: from the core count.")]


# What the same command resumes from after Ctrl-C (or kill -9); other commands keep nothing to resume.
RESUMES = {
    "build": "from its last durable unit",
    "train": "from its last finished epoch (each epoch end is checkpointed)",
    "sweep": "from its last finished epoch (each epoch end is checkpointed)",
}


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a ReadCacheError as one line and exit 2; Ctrl-C exits 130 with how to resume."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ReadCacheError as e:
            if not _quiet_rank(e):
                # Escaped: an install hint's "read-cache[extra]" would otherwise be taken for rich markup and vanish.
                console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            how = RESUMES.get(command.__name__)
            console.print(f"[yellow]interrupted[/]: rerun the same command to resume {how}" if how else "[yellow]interrupted[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def _quiet_rank(error: ReadCacheError) -> bool:
    """Under torchrun, an error every rank agreed on is printed by rank 0 alone."""
    from read_cache.distributed import detect

    group = sys.modules.get("read_cache.distributed.group")  # loaded by then wherever ranks can agree
    return group is not None and isinstance(error, group.RankError) and not detect().is_main


def is_main_rank() -> bool:
    """False on every torchrun rank but 0: they log only warnings and print no tables."""
    from read_cache.distributed import detect

    return detect().is_main


def print_command(command: str) -> None:
    """A command to copy, on its own line and never wrapped, whatever the terminal's width."""
    typer.echo(f"  {command}")
