"""What a build costs over the bare forward, measured in one process with the model loaded once.

    python examples/build_overhead.py --model ./t5-small-random --data-dir ../shared/glue --limit 1000 --rounds 5

`read-cache bench --methods forward,build` runs each method in a fresh process, and there the bare forward alone
varies by +-10% from process to process on a 2-core VM (docs/benchmarks.md, thirteenth session). Here the three
arms share one process and one warm model, rotated round by round:

  bare      the bench's bare forward (`bench.methods.split_tokens`, then `bare_forward`)
  build     `build_cache` of the same examples into a fresh cache (its `load_backbone` returns the loaded model)
  no-write  the same build with every unit's chunk writes and fsyncs left out (units are only marked done)

Prints each round, then the medians of the per-round ratios to `bare`: the whole arm, and the time inside the
forward batches alone (the build's include the channel fit's). Returns them as a dict (`main(argv)`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import read_cache.backbone.forward as forward_module
import read_cache.build as build_module
import read_cache.build.units as units_module
from read_cache.backbone.load import load_backbone
from read_cache.bench.methods import bare_forward, split_tokens
from read_cache.config import BuildConfig
from read_cache.store.writer import CacheWriter
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task

ARMS = ("bare", "build", "no-write")


class ForwardClock:
    """Seconds spent inside `forward_batch`, wherever it is called from (the bare forward and the build's units)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._forward_batch = forward_module.forward_batch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._forward_batch(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        forward_module.forward_batch = units_module.forward_batch = self
        try:
            yield
        finally:
            forward_module.forward_batch = units_module.forward_batch = self._forward_batch


def mark_only(writer: CacheWriter, split: str, unit: Any, tokens: dict, examples: dict) -> None:
    """`CacheWriter.write_unit` without the unit's chunks: the split still completes."""
    writer.group[split]["units_done"][unit.index] = 1


@contextlib.contextmanager
def given_model(backbone: Any) -> Iterator[None]:
    """`build_cache` loads `backbone` (already loaded) instead of loading the model again."""
    loader = build_module.load_backbone
    build_module.load_backbone = lambda *a, **k: backbone
    try:
        yield
    finally:
        build_module.load_backbone = loader


def arms(args: argparse.Namespace, backbone: Any, out: Path) -> dict[str, Callable[[], None]]:
    """The three arms over `args`' examples, the builds into `out`."""
    task = get_task(args.task)
    data = load_glue(task, args.data_dir, args.limit)
    write_unit = CacheWriter.write_unit

    def bare() -> None:
        bare_forward(backbone, split_tokens(backbone, task, data))

    def build(write: bool) -> None:
        CacheWriter.write_unit = write_unit if write else mark_only
        shutil.rmtree(out, ignore_errors=True)
        cfg = BuildConfig(model=args.model, task=args.task, data_dir=args.data_dir, out=out, limit=args.limit, progress=False, remember=False)
        try:
            build_module.build_cache(cfg)
        finally:
            CacheWriter.write_unit = write_unit

    return {"bare": bare, "build": lambda: build(True), "no-write": lambda: build(False)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    clock, backbone = ForwardClock(), load_backbone(args.model, device="cpu")
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    inside: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as scratch, clock.installed(), given_model(backbone):
        run = arms(args, backbone, Path(scratch) / "cache")
        for r in range(args.rounds):
            for arm in ARMS[r % 3 :] + ARMS[: r % 3]:  # rotated: no arm always runs first
                clock.seconds, started = 0.0, time.perf_counter()
                run[arm]()
                wall[arm].append(time.perf_counter() - started)
                inside[arm].append(clock.seconds)
                print(f"round {r} {arm:8s} {wall[arm][-1]:6.2f} s, of which forward batches {clock.seconds:6.2f} s", flush=True)
    report = {
        arm: {
            "over_bare": statistics.median(b / a for a, b in zip(wall["bare"], wall[arm])),
            "forward_batches_over_bare": statistics.median(b / a for a, b in zip(inside["bare"], inside[arm])),
            "seconds": wall[arm],
        }
        for arm in ARMS[1:]
    }
    for arm, figures in report.items():
        print(f"{arm} / bare: {figures['over_bare']:.3f} (forward batches {figures['forward_batches_over_bare']:.3f}), medians of the per-round ratios")
    return report


if __name__ == "__main__":
    main()
