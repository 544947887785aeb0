"""`read-cache bench`: cached READ against online READ, full fine-tuning and the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from read_cache.cli.common import BatchSize, out_console, user_errors
from read_cache.config import BenchConfig
from read_cache.kinds import BENCH_METHODS as METHODS


@user_errors
def bench(
    model: Annotated[str, typer.Option(help="Hub id or local model folder.")],
    task: Annotated[str, typer.Option(help="GLUE task.")],
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md, bench.png, the cache and runs.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Local GLUE folder; default: the hub.")] = None,
    limit: Annotated[int, typer.Option(help="Examples per split.")] = BenchConfig.limit,
    epochs: Annotated[int, typer.Option(help="E: epochs of every training method.")] = BenchConfig.epochs,
    slow_epochs: Annotated[Optional[int], typer.Option(help="Epochs actually run for online READ and full fine-tuning, scaled to E.")] = None,
    rnn: Annotated[str, typer.Option(help="Side network RNN.")] = BenchConfig.rnn,
    dim: Annotated[int, typer.Option(help="Side network size r.")] = BenchConfig.dim,
    lr: Annotated[float, typer.Option(help="Side network learning rate.")] = BenchConfig.lr,
    full_lr: Annotated[float, typer.Option(help="Full fine-tuning learning rate.")] = BenchConfig.full_lr,
    batch_size: BatchSize = BenchConfig.batch_size,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: CUDA when present.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated subset of the methods (default all), and baselines: lora-8, lora-32, prompt-20, adapter-64, bitfit, lst-8...; others are kept from an earlier run in --out.")] = ",".join(METHODS),
) -> None:
    """Cached READ against online READ, full fine-tuning and the baselines of the paper's Table 1: score, time, energy, memory."""
    cfg = BenchConfig(
        model=model, task=task, out=out, data_dir=data_dir, limit=limit, epochs=epochs, slow_epochs=slow_epochs,
        rnn=rnn, dim=dim, lr=lr, full_lr=full_lr, batch_size=batch_size, device=device, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
    )
    cfg.validate()
    from read_cache.bench.run import run_bench

    run_bench(cfg)
    out_console.print((out / "bench.md").read_text(), markup=False, highlight=False)
    out_console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench-scores.png'}")
