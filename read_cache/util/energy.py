"""Energy, time and memory meter for the build, the training runs and the benchmark.

READ (arXiv 2305.15348, Table 4) reports GPU energy estimated per its equations 15-16 as the sum
over sampling intervals of (GPU utilisation fraction x board power draw x interval length). This
module reports that estimate *and*, wherever the hardware exposes one, a measured figure:

* ``"nvml"``: the delta of NVML's total-energy counter (millijoules, Volta and newer), summed over
  the GPUs visible to this process;
* ``"nvml-power-integral"``: where the counter is unsupported but the power draw is readable, the
  trapezoidal integral of the sampled board power over the interval;
* ``"rapl"``: on machines without an NVIDIA GPU, the delta of the RAPL package (and DRAM) energy
  counters under ``/sys/class/powercap`` (Intel, and AMD Zen through the same driver), with
  counter wraparound handled;
* ``"unavailable: <why>"``: otherwise. The meter never invents a number: ``energy_joules`` and
  ``kwh`` are then ``None``.

Peak resident memory is the peak *during the interval*: on Linux the kernel's high-water mark is
reset by writing ``5`` to ``/proc/self/clear_refs`` when the interval starts and ``VmHWM`` is read
when it ends; a background thread also samples RSS (the only method where ``clear_refs`` is not
writable), and the larger of the two is reported.

Usage::

    with Meter() as meter:
        train()
    logger.info("%s", format_reading(meter.reading))
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Root of the powercap sysfs tree where RAPL energy counters live (a constant so tests can move it).
RAPL_ROOT = Path("/sys/class/powercap")
#: Writing "5" here resets the process's peak-RSS high-water mark (Linux >= 4.0).
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
#: Holds ``VmHWM`` (peak RSS) and ``VmRSS`` of this process on Linux.
PROC_STATUS = Path("/proc/self/status")

JOULES_PER_KWH = 3.6e6

_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")
_SUB_ZONE = re.compile(r"^intel-rapl:\d+:\d+$")
_VMHWM = re.compile(r"^VmHWM:\s+(\d+)\s*kB", re.MULTILINE)
_VMRSS = re.compile(r"^VmRSS:\s+(\d+)\s*kB", re.MULTILINE)


@dataclass
class MeterReading:
    """What a :class:`Meter` measured over one interval.

    Attributes:
        wall_seconds: Elapsed wall-clock time.
        cpu_seconds: User + system CPU time of this process (all its threads, not its children).
        energy_joules: Measured energy (see ``energy_source``), or ``None`` when nothing could be
            measured. Never an estimate.
        energy_source: ``"nvml"``, ``"nvml-power-integral"``, ``"rapl"``, or
            ``"unavailable: <why>"``.
        estimated_joules: The READ paper's estimate (eqs. 15-16): the integral over the interval
            of GPU utilisation fraction x board power, summed over visible GPUs. ``None`` without
            a readable NVIDIA GPU.
        peak_rss_bytes: Peak resident memory of this process during the interval.
        cuda_max_allocated_bytes: Peak bytes allocated by torch's CUDA caching allocator during
            the interval (summed over devices' peaks), or ``None`` when this process did not
            use CUDA through torch.
    """

    wall_seconds: float
    cpu_seconds: float
    energy_joules: float | None
    energy_source: str
    estimated_joules: float | None
    peak_rss_bytes: int
    cuda_max_allocated_bytes: int | None

    @property
    def kwh(self) -> float | None:
        """The measured energy in kilowatt-hours, or ``None`` when it was not measured."""
        return None if self.energy_joules is None else self.energy_joules / JOULES_PER_KWH

    @property
    def estimated_kwh(self) -> float | None:
        """The paper-style estimate in kilowatt-hours, or ``None`` when there is none."""
        return None if self.estimated_joules is None else self.estimated_joules / JOULES_PER_KWH

    @property
    def energy_available(self) -> bool:
        """Whether ``energy_joules`` holds a measured number."""
        return self.energy_joules is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field plus ``kwh`` and ``estimated_kwh``."""
        out = asdict(self)
        out["kwh"] = self.kwh
        out["estimated_kwh"] = self.estimated_kwh
        return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """Read a small (sysfs/procfs) file; a separate function so tests can simulate failures."""
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read()


def _read_int(path: Path) -> int:
    return int(_read_text(path).strip())


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024.0 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    return f"{n} B"  # pragma: no cover - unreachable


def _format_joules(j: float) -> str:
    if j >= 3.6e5:  # 0.1 kWh and up reads better in kWh
        return f"{j / JOULES_PER_KWH:.3f} kWh"
    if j >= 1e4:
        return f"{j / 1e3:.1f} kJ ({j / JOULES_PER_KWH:.4g} kWh)"
    return f"{j:.1f} J ({j / JOULES_PER_KWH:.3g} kWh)"


def format_reading(r: MeterReading) -> str:
    """One human-readable line, e.g.
    ``"wall 12.3 s, cpu 20.1 s, energy unavailable (no NVIDIA GPU ...), peak RSS 1.2 GiB"``."""
    parts = [f"wall {r.wall_seconds:.1f} s", f"cpu {r.cpu_seconds:.1f} s"]
    if r.energy_joules is not None:
        parts.append(f"energy {_format_joules(r.energy_joules)} [{r.energy_source}]")
    else:
        why = r.energy_source
        if why.startswith("unavailable:"):
            why = why[len("unavailable:") :].strip()
        parts.append(f"energy unavailable ({why})")
    if r.estimated_joules is not None:
        parts.append(f"estimated (util x power) {_format_joules(r.estimated_joules)}")
    parts.append(f"peak RSS {_human_bytes(r.peak_rss_bytes)}")
    if r.cuda_max_allocated_bytes is not None:
        parts.append(f"CUDA peak allocated {_human_bytes(r.cuda_max_allocated_bytes)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Peak RSS
# --------------------------------------------------------------------------------------------


def _current_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or the platform refuses; fall back below
        pass
    try:  # no psutil: Linux's /proc still has the current RSS
        match = _VMRSS.search(_read_text(PROC_STATUS))
    except (OSError, ValueError):
        return None
    return int(match.group(1)) * 1024 if match else None


def _read_vmhwm() -> int | None:
    """The kernel's peak-RSS high-water mark in bytes, or None where /proc is not there."""
    try:
        match = _VMHWM.search(_read_text(PROC_STATUS))
    except (OSError, ValueError):
        return None
    return int(match.group(1)) * 1024 if match else None


# Meters that are running: when one resets a process-wide high-water mark (VmHWM, torch's CUDA
# peak), the peaks seen so far are first folded into every running meter, so nested meters stay
# correct.
_ACTIVE: set[Meter] = set()
_ACTIVE_LOCK = threading.Lock()


def _reset_hwm() -> bool:
    """Fold the current VmHWM into running meters, then reset it. True if the reset worked."""
    with _ACTIVE_LOCK:
        current = _read_vmhwm()
        if current is not None:
            for meter in _ACTIVE:
                if meter._hwm_reset:  # otherwise VmHWM may predate that meter's interval
                    meter._fold_rss(current)
        try:
            with open(PROC_CLEAR_REFS, "w", encoding="ascii") as handle:
                handle.write("5")
        except OSError as exc:
            logger.debug("cannot reset the peak-RSS mark via %s (%s); sampling RSS only", PROC_CLEAR_REFS, exc)
            return False
        return _read_vmhwm() is not None


# --------------------------------------------------------------------------------------------
# CUDA (torch) peak memory; torch is never imported here, only used if the caller already did
# --------------------------------------------------------------------------------------------


def _torch_cuda() -> Any | None:
    """``torch.cuda`` if torch is already imported and CUDA is initialised in this process."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if cuda.is_available() and cuda.is_initialized():
            return cuda
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not break the meter
        logger.debug("torch.cuda could not be queried", exc_info=True)
    return None


def _cuda_peak(cuda: Any) -> int:
    return sum(int(cuda.max_memory_allocated(d)) for d in range(cuda.device_count()))


def _reset_cuda_peak() -> None:
    with _ACTIVE_LOCK:
        cuda = _torch_cuda()
        if cuda is None:
            return
        try:
            peak = _cuda_peak(cuda)
            for meter in _ACTIVE:
                meter._fold_cuda(peak)
            for d in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(d)
        except Exception:  # noqa: BLE001
            logger.debug("could not reset torch's CUDA peak-memory statistics", exc_info=True)


# --------------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------------


def _visible_indices(count: int, uuids: list[str]) -> list[int]:
    """NVML indices of the GPUs that CUDA_VISIBLE_DEVICES leaves visible.

    NVML ignores CUDA_VISIBLE_DEVICES. Integer entries are taken as NVML (PCI bus) indices, which
    matches CUDA's numbering under CUDA_DEVICE_ORDER=PCI_BUS_ID and on machines with identical
    GPUs; ``GPU-<uuid>`` prefixes are matched against device UUIDs. As in CUDA, parsing stops at
    the first invalid entry. An entry that cannot be mapped (e.g. a MIG UUID) makes every GPU
    count, since NVML's counters are per board anyway.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    chosen: list[int] = []
    for token in (t.strip() for t in env.split(",")):
        if re.fullmatch(r"\d+", token):
            index = int(token)
            if index >= count:
                break
            if index not in chosen:
                chosen.append(index)
        elif token.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(token)]
            if len(matches) != 1:
                break
            if matches[0] not in chosen:
                chosen.append(matches[0])
        elif token.startswith("MIG-"):
            logger.debug("CUDA_VISIBLE_DEVICES names MIG instances; metering every GPU board")
            return list(range(count))
        else:
            break
    return chosen


class _Nvml:
    """NVML state for one interval: handles, counter start values and the sampled integrals."""

    def __init__(self, pynvml: Any, handles: list[Any], indices: list[int]) -> None:
        self.pynvml = pynvml
        self.handles = handles
        self.indices = indices
        self.counter_start: list[int] | None = None
        self.counter_error: str | None = None
        self.power_ok = False
        self.power_error: str | None = None
        self._prev_t: float | None = None
        self._prev_power: float | None = None
        self._prev_util_power: float | None = None
        self._prev_up_t: float | None = None
        self.power_integral = 0.0
        self.estimate = 0.0
        self.estimate_samples = 0

    def read_counters(self) -> list[int]:
        return [int(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]

    def start(self) -> None:
        try:
            self.counter_start = self.read_counters()
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported on pre-Volta boards
            self.counter_error = str(exc) or type(exc).__name__
            logger.debug("NVML energy counter unavailable: %s", self.counter_error)
        try:
            for h in self.handles:
                self.pynvml.nvmlDeviceGetPowerUsage(h)
            self.power_ok = True
        except Exception as exc:  # noqa: BLE001
            self.power_error = str(exc) or type(exc).__name__
            logger.debug("NVML power draw unavailable: %s", self.power_error)
        self.sample()

    def sample(self) -> None:
        """One sample of power and utilisation; trapezoidal integration between samples."""
        if not self.power_ok:
            return
        now = time.perf_counter()
        try:
            watts = [self.pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for h in self.handles]
        except Exception:  # noqa: BLE001 - skip a failed sample, integrate across the gap
            logger.debug("NVML power sample failed", exc_info=True)
            return
        power = sum(watts)
        if self._prev_t is not None and self._prev_power is not None:
            self.power_integral += 0.5 * (self._prev_power + power) * (now - self._prev_t)
        self._prev_t, self._prev_power = now, power
        try:
            utils = [self.pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0 for h in self.handles]
        except Exception:  # noqa: BLE001
            logger.debug("NVML utilisation sample failed", exc_info=True)
            return
        util_power = sum(u * w for u, w in zip(utils, watts))
        if self._prev_up_t is not None and self._prev_util_power is not None:
            self.estimate += 0.5 * (self._prev_util_power + util_power) * (now - self._prev_up_t)
        self._prev_up_t, self._prev_util_power = now, util_power
        self.estimate_samples += 1

    def close(self) -> None:
        try:
            self.pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            logger.debug("nvmlShutdown failed", exc_info=True)


def _open_nvml() -> tuple[_Nvml | None, str]:
    """Initialise NVML and pick the visible GPUs; ``(None, why)`` when there are none."""
    try:
        import pynvml
    except ImportError:
        return None, "no NVIDIA GPU (pynvml from nvidia-ml-py is not installed)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"no NVIDIA GPU (NVML: {exc})"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handles_all = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids: list[str] = []
        for h in handles_all:
            try:
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
            except Exception:  # noqa: BLE001
                uuids.append("")
    except Exception as exc:  # noqa: BLE001
        _shutdown_quietly(pynvml)
        return None, f"NVML could not enumerate GPUs ({exc})"
    if count == 0:
        _shutdown_quietly(pynvml)
        return None, "no NVIDIA GPU (NVML reports 0 devices)"
    indices = _visible_indices(count, uuids)
    if not indices:
        _shutdown_quietly(pynvml)
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        return None, f"no visible NVIDIA GPU (CUDA_VISIBLE_DEVICES={cvd!r})"
    return _Nvml(pynvml, [handles_all[i] for i in indices], indices), ""


def _shutdown_quietly(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------
# RAPL
# --------------------------------------------------------------------------------------------


@dataclass
class _RaplDomain:
    energy_path: Path
    max_range_uj: int
    name: str


class _Rapl:
    """Accumulates RAPL counter deltas, handling one wraparound between consecutive reads.

    Reads happen at the start, at every sample and at the end, so a counter that wraps several
    times over a long interval is still counted correctly as long as it wraps at most once per
    sample interval (the smallest ranges wrap after tens of seconds at full package power).
    """

    def __init__(self, domains: list[_RaplDomain], start: list[int]) -> None:
        self.domains = domains
        self.last = list(start)
        self.total_uj = [0] * len(domains)

    def update(self) -> None:
        for i, domain in enumerate(self.domains):
            value = _read_int(domain.energy_path)
            delta = value - self.last[i]
            if delta < 0:
                delta = domain.max_range_uj - self.last[i] + value
            self.total_uj[i] += delta
            self.last[i] = value

    def sample(self) -> None:
        try:
            self.update()
        except (OSError, ValueError):
            logger.debug("RAPL sample failed", exc_info=True)

    @property
    def joules(self) -> float:
        return sum(self.total_uj) / 1e6


def _discover_rapl(root: Path) -> tuple[list[_RaplDomain], list[int], str]:
    """The package (and DRAM) RAPL domains under ``root`` and their current counters.

    Returns ``(domains, start_values, "")`` or ``([], [], why)``. ``psys`` (platform) domains are
    skipped: they include the packages and would count them twice.
    """
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], [], f"{root} does not exist"
    except PermissionError:
        return [], [], f"{root} is not readable (permission denied)"
    except OSError as exc:
        return [], [], f"{root} is not readable ({exc})"

    zones: list[tuple[Path, str]] = []
    for entry in entries:
        if not _TOP_LEVEL_ZONE.match(entry):
            continue
        zone = root / entry
        name = _zone_name(zone)
        if name.startswith("psys"):
            continue
        zones.append((zone, name))
        try:
            children = sorted(os.listdir(zone))
        except OSError:
            children = []
        for child in children:
            if _SUB_ZONE.match(child) and _zone_name(zone / child) == "dram":
                zones.append((zone / child, f"{name}/dram"))
    if not zones:
        return [], [], f"no RAPL package domains under {root}"

    domains: list[_RaplDomain] = []
    start: list[int] = []
    for zone, name in zones:
        energy = zone / "energy_uj"
        try:
            value = _read_int(energy)
        except PermissionError:
            return [], [], (
                f"{energy} exists but is not readable (permission denied; RAPL counters need root "
                "or a chmod/udev rule)"
            )
        except (OSError, ValueError) as exc:
            return [], [], f"{energy} could not be read ({exc})"
        try:
            max_range = _read_int(zone / "max_energy_range_uj")
        except (OSError, ValueError) as exc:
            return [], [], f"{zone / 'max_energy_range_uj'} could not be read ({exc})"
        domains.append(_RaplDomain(energy, max_range, name))
        start.append(value)
    return domains, start, ""


def _zone_name(zone: Path) -> str:
    try:
        return _read_text(zone / "name").strip()
    except (OSError, ValueError):
        return ""


# --------------------------------------------------------------------------------------------
# The meter
# --------------------------------------------------------------------------------------------


class Meter:
    """Measures wall time, CPU time, energy and peak memory of the code inside a ``with`` block.

    Args:
        sample_interval: Seconds between background samples of RSS, GPU power/utilisation and
            RAPL counters.

    The meter never raises because a counter is missing or unreadable; it reports why instead.
    ``reading`` is available after the block exits (or after :meth:`stop`).
    """

    def __init__(self, sample_interval: float = 0.1) -> None:
        if not sample_interval > 0:
            raise ValueError(f"sample_interval must be positive, got {sample_interval!r}")
        self.sample_interval = float(sample_interval)
        self._reading: MeterReading | None = None
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._peak_rss = 0
        self._hwm_reset = False
        self._cuda_peak_folded = 0
        self._nvml: _Nvml | None = None
        self._nvml_why = ""
        self._rapl: _Rapl | None = None
        self._rapl_why = ""
        self._t0 = 0.0
        self._cpu0 = 0.0

    # -- public API --------------------------------------------------------------------------

    @property
    def reading(self) -> MeterReading:
        """The measurement of the last completed interval."""
        if self._reading is None:
            raise RuntimeError("Meter.reading is available only after the interval has ended")
        return self._reading

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Begin an interval (what ``__enter__`` does)."""
        if self._running:
            raise RuntimeError("this Meter is already running")
        self._reading = None
        self._stop_event = threading.Event()
        self._peak_rss = 0
        self._cuda_peak_folded = 0
        self._nvml, self._nvml_why = None, ""
        self._rapl, self._rapl_why = None, ""

        # Energy sources first (their setup is the slowest part), then the clocks.
        self._setup_energy()
        self._hwm_reset = _reset_hwm()
        _reset_cuda_peak()
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
        self._running = True
        self._sample()
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="read-cache-meter", daemon=True)
        self._thread.start()

    def stop(self) -> MeterReading:
        """End the interval and return (and store) its reading (what ``__exit__`` does)."""
        if not self._running:
            if self._reading is not None:
                return self._reading
            raise RuntimeError("this Meter was never started")
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu0
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.sample_interval))
            if self._thread.is_alive():
                logger.warning("the meter's sampling thread did not stop in time; leaving it (daemon)")
        self._thread = None
        try:
            self._sample()
            energy, source, estimate = self._finish_energy()
            peak_rss = self._finish_rss()
            cuda_peak = self._finish_cuda()
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)
            self._running = False
            if self._nvml is not None:
                self._nvml.close()
        self._reading = MeterReading(
            wall_seconds=wall,
            cpu_seconds=cpu,
            energy_joules=energy,
            energy_source=source,
            estimated_joules=estimate,
            peak_rss_bytes=peak_rss,
            cuda_max_allocated_bytes=cuda_peak,
        )
        logger.debug("meter: %s", format_reading(self._reading))
        return self._reading

    # -- internals -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop_event.wait(self.sample_interval):
            self._sample()

    def _sample(self) -> None:
        try:
            rss = _current_rss()
            if rss is not None:
                self._fold_rss(rss)
            if self._nvml is not None:
                self._nvml.sample()
            if self._rapl is not None:
                self._rapl.sample()
        except Exception:  # noqa: BLE001 - sampling must never take the program down
            logger.debug("meter sample failed", exc_info=True)

    def _fold_rss(self, value: int) -> None:
        with self._lock:
            if value > self._peak_rss:
                self._peak_rss = value

    def _fold_cuda(self, value: int) -> None:
        with self._lock:
            if value > self._cuda_peak_folded:
                self._cuda_peak_folded = value

    def _setup_energy(self) -> None:
        try:
            nvml, why = _open_nvml()
        except Exception as exc:  # noqa: BLE001
            nvml, why = None, f"NVML failed ({exc})"
        if nvml is not None:
            nvml.start()
            if nvml.counter_start is not None or nvml.power_ok:
                self._nvml = nvml
                return
            why = (
                "NVML can read neither the energy counter "
                f"({nvml.counter_error}) nor the power draw ({nvml.power_error})"
            )
            nvml.close()
        self._nvml_why = why
        try:
            domains, start, rapl_why = _discover_rapl(Path(RAPL_ROOT))
        except Exception as exc:  # noqa: BLE001
            domains, start, rapl_why = [], [], f"RAPL discovery failed ({exc})"
        if domains:
            self._rapl = _Rapl(domains, start)
        self._rapl_why = rapl_why

    def _finish_energy(self) -> tuple[float | None, str, float | None]:
        nvml = self._nvml
        if nvml is not None:
            estimate = nvml.estimate if nvml.estimate_samples >= 2 else None
            if nvml.counter_start is not None:
                try:
                    end = nvml.read_counters()
                    millijoules = sum(e - s for e, s in zip(end, nvml.counter_start))
                    return millijoules / 1000.0, "nvml", estimate
                except Exception as exc:  # noqa: BLE001
                    logger.debug("NVML energy counter failed at the end", exc_info=True)
                    if not nvml.power_ok:
                        return None, f"unavailable: NVML energy counter failed at the end ({exc})", estimate
            return nvml.power_integral, "nvml-power-integral", estimate
        if self._rapl is not None:
            try:
                self._rapl.update()
                return self._rapl.joules, "rapl", None
            except (OSError, ValueError) as exc:
                return None, f"unavailable: RAPL counters failed at the end ({exc})", None
        return None, f"unavailable: {self._nvml_why} and {self._rapl_why}", None

    def _finish_rss(self) -> int:
        if self._hwm_reset:
            hwm = _read_vmhwm()
            if hwm is not None:
                self._fold_rss(hwm)
        return int(self._peak_rss)

    def _finish_cuda(self) -> int | None:
        cuda = _torch_cuda()
        if cuda is None:
            return None
        try:
            # CUDA initialised inside the interval: its peak since initialisation is the interval's.
            return max(_cuda_peak(cuda), self._cuda_peak_folded)
        except Exception:  # noqa: BLE001
            logger.debug("torch.cuda.max_memory_allocated failed", exc_info=True)
            return None
