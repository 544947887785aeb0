"""The `read-cache` command: a thin layer that turns flags into the library's configs.

    read-cache build --model t5-small --task sst2 --data-dir ../shared/glue --limit 2000
    read-cache train --rnn gru --dim 256
    read-cache inspect

One module per group of commands (build; train; predict; inspect and caches; bench; sweep and glue), each
a plain function registered below, in the order `--help` lists them; `common` holds what they share.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from rich.logging import RichHandler

from read_cache.cli import bench, build, inspect, predict, sweep, train
from read_cache.cli.common import console, is_main_rank
from read_cache.kinds import BENCH_METHODS as METHODS

__all__ = ["METHODS", "app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="READ side networks trained from a cache of a frozen transformer: build once, train many.",
)


def setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    level = logging.DEBUG if verbose else logging.INFO if is_main_rank() else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"read-cache {version('read-cache')}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    setup_logging(verbose)
    # transformers and huggingface_hub read these when (and only if) a command imports them: importing
    # transformers here to set them would cost every command, even a rejected flag, seconds.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Plain functions, registered in the order `read-cache --help` lists them.
for _command in (build.build, train.train, predict.predict, inspect.inspect, inspect.caches, bench.bench, sweep.sweep, sweep.glue):
    app.command()(_command)


def main() -> None:
    app(prog_name="read-cache")
