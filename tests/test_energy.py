"""Offline tests of read_cache.util.energy: time, CPU, per-interval peak RSS, RAPL and NVML paths."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from read_cache.util import energy
from read_cache.util.energy import Meter, MeterReading, format_reading

MIB = 1024 * 1024


def _busy(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import pynvml` fail, as on a machine without the NVIDIA binding."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def _write(path: Path, value: int | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)  # atomic, so the sampling thread never sees a half-written file


def _fake_rapl(root: Path) -> dict[str, Path]:
    """A powercap tree: one package with a DRAM subzone, a psys zone and the control-type dir."""
    pkg = root / "intel-rapl:0"
    dram = pkg / "intel-rapl:0:0"
    core = pkg / "intel-rapl:0:1"
    psys = root / "intel-rapl:1"
    for d in (pkg, dram, core, psys, root / "intel-rapl"):
        d.mkdir(parents=True)
    for d, name, value in (
        (pkg, "package-0", 999_000),
        (dram, "dram", 10_000),
        (core, "core", 5_000),
        (psys, "psys", 123_456),
    ):
        _write(d / "name", name)
        _write(d / "energy_uj", value)
        _write(d / "max_energy_range_uj", 1_000_000)
    return {"pkg": pkg / "energy_uj", "dram": dram / "energy_uj", "core": core / "energy_uj", "psys": psys / "energy_uj"}


def _burn_cpu(seconds: float) -> tuple[float, float]:
    """Spin until this process has used `seconds` of CPU (however long a loaded machine takes to give
    them); returns the (CPU, wall) seconds that took, measured with clocks the meter does not use."""
    cpu0, wall0 = _cpu_now(), time.monotonic()
    while _cpu_now() - cpu0 < seconds:
        pass
    return _cpu_now() - cpu0, time.monotonic() - wall0


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def test_busy_loop_wall_and_cpu() -> None:
    """A fixed amount of CPU work, not a fixed time: on a loaded machine it takes longer, never less."""
    with Meter(sample_interval=0.02) as meter:
        cpu, wall = _burn_cpu(0.2)
    r = meter.reading
    assert isinstance(r, MeterReading)
    tick = 2 / os.sysconf("SC_CLK_TCK")  # os.times counts in clock ticks
    assert r.cpu_seconds >= cpu - tick >= 0.2 - tick  # the meter saw at least the work done inside it
    assert r.wall_seconds >= wall - 1e-3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert r.cpu_seconds <= r.wall_seconds * cores + tick  # no process uses more than its cores for the time
    assert r.peak_rss_bytes > 0


def test_peak_rss_is_per_interval() -> None:
    size = 256 * MIB
    with Meter(sample_interval=0.02) as first:
        big = np.ones(size // 8, dtype=np.float64)  # np.ones touches every page
        time.sleep(0.1)
    del big
    with Meter(sample_interval=0.02) as second:
        time.sleep(0.05)
    assert first.reading.peak_rss_bytes >= second.reading.peak_rss_bytes + size * 3 // 4


def test_peak_rss_by_sampling_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where /proc/self/clear_refs is not writable the sampling thread still sees the peak."""
    monkeypatch.setattr(energy, "PROC_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    size = 128 * MIB
    with Meter(sample_interval=0.01) as first:
        big = np.ones(size // 8, dtype=np.float64)
        time.sleep(0.1)
    del big
    with Meter(sample_interval=0.01) as second:
        time.sleep(0.05)
    assert first.reading.peak_rss_bytes >= second.reading.peak_rss_bytes + size * 3 // 4


def test_nested_meters_keep_the_outer_peak() -> None:
    size = 128 * MIB
    with Meter(sample_interval=0.5) as outer:
        big = np.ones(size // 8, dtype=np.float64)
        del big
        with Meter(sample_interval=0.5) as inner:  # resets VmHWM; the outer must not lose its peak
            pass
    assert outer.reading.peak_rss_bytes >= inner.reading.peak_rss_bytes + size * 3 // 4


def test_energy_on_this_machine_is_honest() -> None:
    with Meter(sample_interval=0.02) as meter:
        _busy(0.05)
    r = meter.reading
    if r.energy_joules is None:
        assert r.energy_source.startswith("unavailable: ")
        assert r.kwh is None
    else:
        assert r.energy_joules >= 0
        assert r.energy_source in {"nvml", "nvml-power-integral", "rapl"}
        assert r.kwh == pytest.approx(r.energy_joules / 3.6e6)


def test_unreadable_counters_report_unavailable(
    no_nvml: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "no-powercap")
    with Meter(sample_interval=0.02) as meter:
        _busy(0.02)
    r = meter.reading
    assert r.energy_joules is None
    assert r.kwh is None
    assert r.estimated_joules is None
    assert r.energy_source.startswith("unavailable: ")
    assert "no NVIDIA GPU" in r.energy_source and "does not exist" in r.energy_source
    assert "energy unavailable (" in format_reading(r)


def test_rapl_permission_denied_is_reported(
    no_nvml: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_rapl(tmp_path)
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    real_read_text = energy._read_text

    def deny_energy(path: Path) -> str:
        if Path(path).name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path)

    monkeypatch.setattr(energy, "_read_text", deny_energy)
    with Meter(sample_interval=0.02) as meter:
        pass
    r = meter.reading
    assert r.energy_joules is None and r.kwh is None
    assert r.energy_source.startswith("unavailable: ")
    assert "not readable (permission denied" in r.energy_source


def test_fake_rapl_wraparound(no_nvml: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = _fake_rapl(tmp_path)
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    with Meter(sample_interval=0.01) as meter:
        _write(files["pkg"], 500)  # wrapped: 1_000 uJ to the top of the range, then 500
        _write(files["dram"], 12_000)  # +2_000 uJ
        _write(files["core"], 9_000_000 % 1_000_000)  # core is inside the package: not counted
        _write(files["psys"], 999_999)  # platform domain would double count: not counted
        time.sleep(0.03)
    r = meter.reading
    assert r.energy_source == "rapl"
    assert r.energy_joules == pytest.approx((1_000 + 500 + 2_000) / 1e6)
    assert r.kwh == pytest.approx(r.energy_joules / 3.6e6)
    assert r.estimated_joules is None


class _FakeNvml(types.ModuleType):
    """Two GPUs at 100 W; GPU 0 at 50 % and GPU 1 at 100 % utilisation; counters +1 J/s-ish."""

    class NVMLError(Exception):
        pass

    def __init__(self, counter: bool = True) -> None:
        super().__init__("pynvml")
        self.counter = counter
        self.energy_mj = [1_000_000, 2_000_000]
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-0000000{h}-aaaa"

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 100_000  # milliwatts

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=50 if h == 0 else 100, memory=0)


def test_fake_nvml_counter_and_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    outside = time.perf_counter()
    with Meter(sample_interval=0.01) as meter:
        time.sleep(0.1)
        fake.energy_mj = [1_000_500, 2_001_500]  # +0.5 J and +1.5 J
    outside = time.perf_counter() - outside
    r = meter.reading
    assert r.energy_source == "nvml"
    assert r.energy_joules == pytest.approx(2.0)
    # Estimate: (0.5 * 100 W + 1.0 * 100 W) = 150 W over the sampled span, which holds the timed interval.
    within(r.estimated_joules, 150.0, r.wall_seconds, outside)
    assert fake.shutdowns == 1
    json.dumps(r.to_dict())


def test_fake_nvml_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with Meter(sample_interval=0.01) as meter:
        time.sleep(0.05)
        fake.energy_mj = [1_000_500, 2_001_500]
    assert meter.reading.energy_joules == pytest.approx(1.5)


def test_fake_nvml_power_integral(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(counter=False))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    outside = time.perf_counter()
    with Meter(sample_interval=0.01) as meter:
        time.sleep(0.1)
    outside = time.perf_counter() - outside
    r = meter.reading
    assert r.energy_source == "nvml-power-integral"
    within(r.energy_joules, 200.0, r.wall_seconds, outside)


def within(joules: float, watts: float, wall: float, outside: float) -> None:
    """A constant draw integrated from the meter's first sample (taken just before its clock starts) to its
    last (just after it stops): at least watts x the meter's wall time, at most watts x the time around the
    `with` block, however long a loaded machine stretches either."""
    assert watts * wall * (1 - 1e-9) <= joules <= watts * outside * (1 + 1e-9), (joules, watts * wall, watts * outside)


def test_to_dict_is_json_serialisable() -> None:
    with Meter(sample_interval=0.05) as meter:
        _busy(0.01)
    d = meter.reading.to_dict()
    text = json.dumps(d)
    back = json.loads(text)
    assert "kwh" in back and back["wall_seconds"] == pytest.approx(meter.reading.wall_seconds)
    assert set(back) >= {
        "wall_seconds",
        "cpu_seconds",
        "energy_joules",
        "energy_source",
        "estimated_joules",
        "peak_rss_bytes",
        "cuda_max_allocated_bytes",
        "kwh",
    }


def test_reading_before_exit_and_format() -> None:
    meter = Meter()
    with pytest.raises(RuntimeError):
        _ = meter.reading
    r = MeterReading(12.34, 20.1, None, "unavailable: no counters", None, int(1.2 * 1024**3), None)
    assert format_reading(r) == "wall 12.3 s, cpu 20.1 s, energy unavailable (no counters), peak RSS 1.2 GiB"
    r2 = MeterReading(1.0, 1.0, 7200.0, "nvml", 3600.0, 1024, 2048)
    line = format_reading(r2)
    assert "energy 7200.0 J" in line and "[nvml]" in line and "CUDA peak allocated 2.0 KiB" in line
    assert r2.kwh == pytest.approx(0.002)


def test_meter_survives_an_exception_in_the_body() -> None:
    meter = Meter(sample_interval=0.01)
    with pytest.raises(ZeroDivisionError):
        with meter:
            1 / 0  # noqa: B018
    assert meter.reading.wall_seconds >= 0
    assert meter not in energy._ACTIVE
