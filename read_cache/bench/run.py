"""The benchmark: cached READ against the paper's online READ, full fine-tuning and the baselines of Table 1, on the same examples.

    read-cache bench --model ./t5-small-random --task sst2 --data-dir ../shared/glue --limit 2000 --epochs 10 --out bench/

Each method runs in a fresh subprocess (`python -m read_cache.bench.run METHOD SPEC`), so its peak memory
is its own and not the leftovers of the method before it. With both `forward` and `build` asked, the bare forward runs
again after the build, and build/forward is the build against the mean of the two forwards (A-B-A: this
machine's speed drifts by more than the goal's margin within minutes). Every method is metered the same way
(`read_cache.util.energy.Meter`): wall and CPU seconds, energy where a counter exists, peak RSS and CUDA
memory, and the test score where the method trains one. `--methods` also takes the baselines of
`read_cache.methods` (lora-8, lora-32, prompt-20, adapter-64, bitfit, lst-8, ...): one row each in
bench.json and bench.md, and a point each in bench-scores.png (score against energy and against peak
memory, the paper's Figure 1). Online READ and the methods on the live backbone repeat identical epochs, so `--slow-epochs K` times K of
them and scales to `--epochs` (flagged in bench.json) when E full epochs would take too long.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from read_cache.config import BenchConfig, record
from read_cache.errors import ReadCacheError
from read_cache.kinds import BENCH_METHODS as METHODS
from read_cache.store import read_root_attrs
from read_cache.util.files import write_json
from read_cache.util.plots import pyplot, save

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The driver (parent process)


def run_bench(cfg: BenchConfig, *, isolate: bool = True) -> dict[str, Any]:
    """Run every method in its own process (or in this one, for tests), then write bench.json, bench.md and bench.png."""
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    spec = cfg.out / "spec.json"
    write_json(spec, record(cfg))
    if cfg.epochs < 2:
        log.warning("--epochs %d: one epoch reads the cache once, so it cannot show a saving over the online method; "
                    "the saving grows with the epochs (the paper trains up to 30)", cfg.epochs)
    results: dict[str, Any] = {}
    wanted = bench_names(cfg.methods)
    for method in [*METHODS, *baselines_in(cfg.out, wanted)]:
        if method not in wanted:
            # Re-measuring a subset keeps the other methods' figures from an earlier run in --out.
            earlier = cfg.out / f"{method}.json"
            if earlier.is_file():
                results[method] = json.loads(earlier.read_text())
            continue
        results[method] = run_method(method, spec, isolate)
        if method == "build" and "forward" in wanted:  # not a forward kept from an earlier run in --out
            # The bare forward again, after the build: build/forward then compares the build with the forward on
            # both sides of it (A-B-A), not with one run a minute earlier on a machine whose speed drifts.
            again = run_method("forward", spec, isolate)
            results["forward"]["all_total_seconds"] = [results["forward"]["total_seconds"], again["total_seconds"]]
            write_json(cfg.out / "forward.json", results["forward"])
    report = {"config": json.loads(spec.read_text()), "methods": results, "ratios": ratios(results, cfg.epochs)}
    attrs = read_root_attrs(cfg.out / "cache") or {}
    sizes = {split: status["n_examples"] for split, status in attrs.get("splits", {}).items()} or None
    report["gpu_prediction"] = gpu_prediction(results, cfg.epochs, sizes)
    (cfg.out / "bench.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "bench.md").write_text(markdown(report))
    chart(report, cfg.out / "bench.png")
    score_chart(report, cfg.out / "bench-scores.png")
    return report


def run_method(method: str, spec: Path, isolate: bool) -> dict[str, Any]:
    """One method in a fresh process (or this one, for tests); returns what it wrote to METHOD.json."""
    log.info("bench: %s", method)
    if isolate:
        proc = subprocess.run([sys.executable, "-m", "read_cache.bench.run", method, str(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ReadCacheError(f"bench method {method} failed: {tail[0]}")
    else:
        main(method, str(spec))
    result = json.loads((spec.parent / f"{method}.json").read_text())
    log.info("bench: %s done in %.1f s", method, result["meter"]["wall_seconds"])
    return result


def bench_names(methods: tuple[str, ...]) -> list[str]:
    """--methods entries under their file names: bench's own as they are, baselines canonical ('lora' -> 'lora-8')."""
    from read_cache.kinds import parse_method

    return [m if m in METHODS else parse_method(m).label for m in methods]


def baselines_in(out: Path, wanted: list[str]) -> list[str]:
    """The baselines to report: those asked for, then those an earlier run left in --out (kept, as bench's own are)."""
    from read_cache.kinds import is_method

    asked = [m for m in wanted if m not in METHODS]
    earlier = sorted(p.stem for p in out.glob("*.json") if is_method(p.stem) and p.stem not in METHODS and p.stem not in asked)
    return asked + earlier


def ratios(results: dict[str, Any], epochs: int) -> dict[str, float | None]:
    def wall(method: str) -> float | None:
        return results[method]["total_seconds"] if method in results else None

    out: dict[str, float | None] = {}
    if "build" in results and "forward" in results:  # against the forward before and after the build, where both ran
        forward = results["forward"].get("all_total_seconds", [wall("forward")])
        out["build_over_forward"] = wall("build") / (sum(forward) / len(forward))
    if "interleaved" in results:  # the robust figure: both readers timed in alternation, one process
        out["store_epoch_over_ram_epoch"] = results["interleaved"]["store_over_ram"]
        out["store_epoch_over_ram_epoch_paired"] = results["interleaved"].get("store_over_ram_paired")  # absent in older bench.json
    elif "cached_store" in results and "cached_ram" in results:
        out["store_epoch_over_ram_epoch"] = results["cached_store"]["epoch_seconds"] / results["cached_ram"]["epoch_seconds"]
    if "cached_store" in results and "cached_ram" in results:
        out["store_epoch_over_ram_epoch_separate_runs"] = results["cached_store"]["epoch_seconds"] / results["cached_ram"]["epoch_seconds"]
    if {"build", "cached_store", "online"} <= results.keys():
        out["online_over_cached_total"] = wall("online") / (wall("build") + wall("cached_store"))
    if "cached_store" in results and "full" in results:
        out["cached_over_full_peak_memory"] = results["cached_store"]["meter"]["peak_rss_bytes"] / results["full"]["meter"]["peak_rss_bytes"]
    if "build" in results:
        out["bytes_per_value"] = results["build"]["disk_bytes"] / results["build"]["cached_values"]
        out["compression_ratio"] = results["build"]["raw_bytes"] / results["build"]["disk_bytes"]
    return out


def gpu_prediction(results: dict[str, Any], epochs: int, split_sizes: dict[str, int] | None) -> dict[str, Any] | None:
    """What the same measurement predicts where compute, not the host, sets the pace (a GPU).

    Assumptions, stated in the output: the backbone's forward and the side network's steps speed up by
    the same factor on the GPU (so their measured ratio carries over), the store is read at least as
    fast as the GPU consumes it (the prefetching reader hides it), and online READ pays one backbone
    forward per example per epoch on top of the same side-network step.
    """
    if not {"forward", "cached_ram", "online"} <= results.keys() or split_sizes is None:
        return None
    forward = results["forward"]["compute_seconds"]  # one backbone pass over every split
    side = results["cached_ram"]["epoch_seconds"]  # one cached epoch, compute-bound (RAM)
    # Online READ runs the backbone over train (to train) and validation (to early-stop) every epoch.
    online_forward = forward * (split_sizes["train"] + split_sizes["validation"]) / sum(split_sizes.values())
    online_epoch = online_forward + side
    ratio = (epochs * online_epoch) / (forward + epochs * side)
    return {
        "online_over_cached_total": ratio,
        "assumptions": [
            "backbone forward and side-network steps speed up by the same factor on the GPU",
            "reading the store keeps up with the GPU (prefetch hides it), so a cached epoch costs its compute",
            "online READ runs one backbone forward per example per epoch plus the same side-network step",
        ],
        "inputs": {"forward_seconds": forward, "online_forward_seconds": online_forward, "cached_epoch_seconds": side, "epochs": epochs},
    }


# --------------------------------------------------------------------------------------------------
# The methods (each in its own process)


def main(method: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = BenchConfig(**{**spec, "out": Path(spec["out"]), "data_dir": Path(spec["data_dir"]) if spec["data_dir"] else None, "methods": tuple(spec["methods"])})
    from read_cache.bench.methods import REGISTRY, baseline

    result = REGISTRY[method](cfg) if method in REGISTRY else baseline(cfg, method)
    (cfg.out / f"{method}.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------------
# Reports


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| method | test score | trainable params | % of backbone | wall s | epochs run | s / epoch | energy | peak RSS MB | CUDA peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    backbone = backbone_size(report["methods"])
    for name, r in with_read_total(report["methods"]).items():
        m = r["meter"]
        energy = f"{m['energy_joules']:.0f} J" if m.get("energy_joules") is not None else "unavailable"
        cuda = f"{m['cuda_max_allocated_bytes'] / 2**20:,.0f}" if m.get("cuda_max_allocated_bytes") else "-"
        per_epoch = f"{r['epoch_seconds']:.2f}" if r.get("epoch_seconds") else "-"
        test = r.get("test")
        score_text = f"{test['score']:.4f} ({test['metric']})" if isinstance(test, dict) else "-"
        n = r.get("trainable_parameters")
        params = f"{n:,}" if isinstance(n, int) else "-"
        share = f"{100 * n / backbone:.3f}%" if isinstance(n, int) and backbone else "-"
        wall = f"{r['total_seconds']:.1f}{' (scaled)' if r.get('scaled_from_epochs') else ''}"
        rows.append(f"| {name} | {score_text} | {params} | {share} | {wall} | {r.get('epochs_run', '-')} | {per_epoch} | {energy} | {m['peak_rss_bytes'] / 2**20:,.0f} | {cuda} |")
    ratio_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in report["ratios"].items() if v is not None)
    gpu = report.get("gpu_prediction")
    gpu_text = f"\nPredicted online/cached total on a GPU: {gpu['online_over_cached_total']:.2f}x ({'; '.join(gpu['assumptions'])}).\n" if gpu else ""
    text = "\n".join(rows) + "\n\n| ratio | value |\n|---|---|\n" + ratio_rows + "\n" + gpu_text
    if "reader" in report["methods"]:
        from read_cache.bench.reader import markdown as reader_markdown

        text += "\n" + reader_markdown(report["methods"]["reader"])
    return text


def with_read_total(methods: dict[str, Any]) -> dict[str, Any]:
    """The rows plus READ's whole cost, build + cached training (what a user of the cache pays once), for comparison."""
    if "build" not in methods or "cached_store" not in methods:
        return methods
    build, cached = methods["build"], methods["cached_store"]
    joules = [r["meter"].get("energy_joules") for r in (build, cached)]
    cuda = [r["meter"].get("cuda_max_allocated_bytes") or 0 for r in (build, cached)]
    meter = {
        "energy_joules": sum(joules) if None not in joules else None,
        "peak_rss_bytes": max(build["meter"]["peak_rss_bytes"], cached["meter"]["peak_rss_bytes"]),
        "cuda_max_allocated_bytes": max(cuda) or None,
    }
    total = {**cached, "meter": meter, "total_seconds": build["total_seconds"] + cached["total_seconds"], "epoch_seconds": None}
    return {**methods, "READ = build + cached_store": total}


def backbone_size(methods: dict[str, Any]) -> int | None:
    """The backbone's parameter count, as any baseline measured it (READ's rows share the backbone)."""
    return next((r["backbone_parameters"] for r in methods.values() if r.get("backbone_parameters")), None)


def score_chart(report: dict[str, Any], path: Path) -> None:
    """The paper's Figure 1: test score against energy (wall time where no counter exists) and against peak memory."""
    plt = pyplot()
    import matplotlib.ticker

    scored = {n: r for n, r in with_read_total(report["methods"]).items() if isinstance(r.get("test"), dict) and n != "cached_store"}
    if not scored:
        return
    energy_known = all(r["meter"].get("energy_joules") is not None for r in scored.values())
    cuda_known = all(r["meter"].get("cuda_max_allocated_bytes") for r in scored.values())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, cost, label in (
        (axes[0], (lambda r: r["meter"]["energy_joules"]) if energy_known else (lambda r: r["total_seconds"]),
         "energy (J)" if energy_known else "wall time (s; no energy counter here)"),
        (axes[1], (lambda r: r["meter"]["cuda_max_allocated_bytes"] / 2**20) if cuda_known else (lambda r: r["meter"]["peak_rss_bytes"] / 2**20),
         "CUDA peak memory (MiB)" if cuda_known else "peak RSS (MiB)"),
    ):
        for name, r in scored.items():
            ax.scatter(cost(r), r["test"]["score"], s=40)
            ax.annotate(name, (cost(r), r["test"]["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        costs = [cost(r) for r in scored.values()]
        if min(costs) > 0 and max(costs) / min(costs) > 20:  # a log axis only where costs span orders of magnitude
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {next(iter(scored.values()))['test']['metric']}")
    model = "/".join(Path(report["config"]["model"]).parts[-2:])  # a package's `.../name/model` says more than `model`
    fig.suptitle(f"{report['config']['task']} on {model}: test score against cost, one point per method")
    save(fig, path)


def chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    names = list(report["methods"])
    walls = [report["methods"][n]["total_seconds"] for n in names]
    peaks = [report["methods"][n]["meter"]["peak_rss_bytes"] / 2**20 for n in names]
    energy = [report["methods"][n]["meter"].get("energy_joules") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, walls, color="tab:blue")
    axes[0].set_title("wall time (s)")
    axes[1].bar(names, peaks, color="tab:orange")
    axes[1].set_title("peak RSS (MiB)")
    if any(e is not None for e in energy):
        axes[2].bar(names, [e or 0 for e in energy], color="tab:green")
        axes[2].set_title("energy (J)")
    else:
        axes[2].text(0.5, 0.5, "energy: no counter readable\non this machine", ha="center", va="center")
        axes[2].set_axis_off()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    save(fig, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
