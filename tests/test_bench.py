"""The benchmark reports every figure it promises, and an unreadable energy counter says so."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import write_glue

from read_cache.bench.run import run_bench
from read_cache.config import BenchConfig
from read_cache.errors import ReadCacheError
from read_cache.kinds import BENCH_METHODS as METHODS
from read_cache.util import energy

RATIOS = ("build_over_forward", "store_epoch_over_ram_epoch", "online_over_cached_total", "cached_over_full_peak_memory", "bytes_per_value")


def test_bench_reports_every_figure(tiny_t5: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No counter readable: no NVML library and no powercap tree.
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "no-powercap")
    out = tmp_path / "bench"
    cfg = BenchConfig(model=str(tiny_t5), task="sst2", out=out, data_dir=glue_dir, limit=30, epochs=3, slow_epochs=1, dim=16)
    report = run_bench(cfg, isolate=False)
    from read_cache import paths

    assert paths.last_cache() is None  # bench's own cache never becomes the user's "last cache built"
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["ratios"] == pytest.approx(report["ratios"])
    for name in RATIOS:
        assert on_disk["ratios"][name] > 0, name
    assert set(on_disk["methods"]) == set(METHODS)
    interleaved = on_disk["methods"]["interleaved"]
    assert interleaved["epochs_each"] > 0
    pairs = [s / r for s, r in zip(interleaved["epoch_seconds_all"]["stream"], interleaved["epoch_seconds_all"]["ram"])]
    assert on_disk["ratios"]["store_epoch_over_ram_epoch_paired"] == pytest.approx(statistics.median(pairs))  # epoch i with epoch i
    for mode, waited in interleaved["reading_seconds_all"].items():  # each epoch's wait for its batches, within the epoch
        epochs = interleaved["epoch_seconds_all"][mode]
        assert len(waited) == len(epochs) == interleaved["epochs_each"] and all(0 < w < e for w, e in zip(waited, epochs)), mode
    # The bare forward ran before and after the build, and build/forward is over the two runs' mean (A-B-A).
    forwards = on_disk["methods"]["forward"]["all_total_seconds"]
    assert len(forwards) == 2 and forwards[0] == on_disk["methods"]["forward"]["total_seconds"]
    assert on_disk["ratios"]["build_over_forward"] == pytest.approx(on_disk["methods"]["build"]["total_seconds"] / (sum(forwards) / 2))
    for name, result in on_disk["methods"].items():
        meter = result["meter"]
        assert meter["wall_seconds"] > 0 and meter["cpu_seconds"] > 0 and meter["peak_rss_bytes"] > 0, name
        if not energy_counters_readable():
            assert meter["energy_joules"] is None and meter["kwh"] is None
            assert meter["energy_source"].startswith("unavailable"), name
    for name in ("cached_store", "cached_ram", "online", "full"):
        assert on_disk["methods"][name]["trainable_parameters"] > 0
    # Online READ and full fine-tuning ran one epoch each and were scaled to three, and say so.
    assert on_disk["methods"]["online"]["scaled_from_epochs"] == 1 and on_disk["methods"]["online"]["epochs_run"] == 1
    assert on_disk["methods"]["cached_store"]["epochs_run"] == 3
    assert on_disk["gpu_prediction"]["assumptions"]
    # The reader's entry, per format: the fields, and both streams beside their own ceilings.
    for fmt, entry in on_disk["methods"]["reader"]["formats"].items():
        for field in ("limit_preadv_gbps", "window_gbps", "staged_gbps", "stream_of_limit", "stream_of_staged", "stream_host_of_window"):
            assert entry[field] > 0, (fmt, field)
        for path in ("stream", "stream-host", "stream-cold", "ram", "stream-float32"):
            assert entry[path]["stored_gbps"] > 0 and entry[path]["examples_per_second"] > 0, (fmt, path)
        rows = on_disk["methods"]["reader"]["rows"]
        fastest = {p: max((r for k, r in rows.items() if k.startswith(f"{fmt}/{p}/")), key=lambda r: r["stored_gbps"]) for p in ("preadv", "stream")}
        rounds = [t / s for t, s in zip(fastest["preadv"]["all_seconds"], fastest["stream"]["all_seconds"])]
        assert len(rounds) == on_disk["methods"]["reader"]["rounds"] and entry["stream_of_limit_rounds"] == pytest.approx(rounds), fmt
    bench_md = (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0 and "build_over_forward" in bench_md and "round by round" in bench_md


def energy_counters_readable() -> bool:
    with energy.Meter() as meter:
        pass
    return meter.reading.energy_joules is not None


def test_bench_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="--slow-epochs"):
        BenchConfig(model="m", task="sst2", out=tmp_path, epochs=2, slow_epochs=3).validate()
    with pytest.raises(ReadCacheError, match="unknown method"):
        BenchConfig(model="m", task="sst2", out=tmp_path, methods=("warp",)).validate()


def test_cli_lists_the_same_methods() -> None:
    from read_cache import cli

    assert cli.METHODS == METHODS


def test_the_gpu_race_script_runs_its_whole_path_on_a_cpu(tmp_path: Path) -> None:
    """examples/gpu_race.py is what a lent GPU runs, once, in a few minutes: its every step (synthetic caches, the
    tuned forward, the step, each tier's epoch) must work before it gets there. --tiny shrinks the shapes; the
    device tier runs on the CPU as the library's tests run it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_race", Path(__file__).resolve().parents[1] / "examples" / "gpu_race.py")
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)
    report = race.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--shapes", "t5-base", "--formats", "int8,int4"])
    assert json.loads((tmp_path / "gpu_race.json").read_text()) == json.loads(json.dumps(report))
    shape = report["shapes"]["t5-base"]
    assert shape["forward"]["best_batch"] in (8, 16) and shape["forward"]["examples_per_second"] > 0
    for fmt in ("int8", "int4"):
        result = shape[fmt]
        assert result["examples"] == race.TINY[-1] and result["bound"] > 1
        assert set(result["tiers"]) == set(race.TIERS)
        for tier, figures in result["tiers"].items():
            assert "error" not in figures and figures["examples_per_second"] > 0, (fmt, tier, figures)


def test_the_build_overhead_script_runs_every_arm_and_puts_the_build_back(tiny_t5: Path, tmp_path: Path) -> None:
    """examples/build_overhead.py times the build against the bare forward in one process by swapping the build's
    model loader and the forward's function; every arm must run, and both swaps must be undone after."""
    import importlib.util

    import read_cache.backbone.forward as forward_module
    import read_cache.build as build_module
    import read_cache.build.units as units_module

    spec = importlib.util.spec_from_file_location("build_overhead", Path(__file__).resolve().parents[1] / "examples" / "build_overhead.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = (build_module.load_backbone, forward_module.forward_batch, units_module.forward_batch)
    glue = write_glue(tmp_path / "glue", n_train=40, n_dev=16)
    report = script.main(["--model", str(tiny_t5), "--data-dir", str(glue), "--limit", "20", "--rounds", "1"])
    assert set(report) == {"build", "no-write"}
    for figures in report.values():
        assert figures["over_bare"] > 0 and figures["forward_batches_over_bare"] > 0 and len(figures["seconds"]) == 1
    assert (build_module.load_backbone, forward_module.forward_batch, units_module.forward_batch) == before
