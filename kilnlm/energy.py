"""Energy and CO2 of training and serving: measured where the machine lets us, estimated (and
labelled so) where it does not.

Sources, best first; a meter sums the GPU and CPU parts it can read:

* **GPU: NVML** (``pynvml``, when importable and a GPU is visible): each device's own energy
  counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver loaded), the
  same counter ``nvidia-smi`` reads. Measured, device-wide.
* **CPU: RAPL** (``/sys/class/powercap/intel-rapl:N/energy_uj``, where readable; Linux makes it
  root-only since CVE-2020-8694, and VMs rarely expose it): the CPU packages' own energy
  counters. Measured, machine-wide (every process on the package counts).
* **CPU: estimate**: busy CPU time × ``cpu_watts_per_core``. The default, 10 W per busy core,
  is a typical TDP per core of current CPUs (a 65 W 8-core desktop part: 8 W; a 280 W 64-core
  server part: 4.4 W; a 45 W 4-core laptop part: 11 W), rounded up because a busy core also
  draws on memory and uncore power. "process" scope counts this process's CPU time (a serving
  replica's own tokens), "machine" scope the whole machine's from ``/proc/stat`` (a training
  run: every Ray worker). An estimate, labelled ``estimated: true`` everywhere it appears.

CO2 = kWh × ``grid_g_per_kwh``: 475 g/kWh by default, the world's average carbon intensity of
electricity (IEA, 2023); set your grid's (e.g. France ≈ 55, Poland ≈ 650).

Why our own and not CodeCarbon: CodeCarbon measures the same sources (RAPL, NVML, a TDP table)
but writes CSV files and calls its own tracker API, pulls pandas and a network lookup of the
machine's region by default, and meters a whole process from a background thread; we need a
counter a replica can read inside its metrics loop and a training driver around one call, in
30 lines of standard library with no download. Figures from the two agree in method; ours
states its source.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

RAPL_ROOT = Path("/sys/class/powercap")
JOULES_PER_KWH = 3.6e6

Scope = Literal["process", "machine"]


@dataclass(frozen=True)
class EnergyConfig:
    """How energy becomes CO2, and how CPU time becomes energy when nothing measures it."""

    grid_g_per_kwh: float = 475.0
    """Carbon intensity of the electricity, grams CO2-equivalent per kWh (world average 2023)."""
    cpu_watts_per_core: float = 10.0
    """Power of one busy core for the estimate (see the module docstring for where 10 W comes from)."""

    def __post_init__(self) -> None:
        if not self.grid_g_per_kwh >= 0:
            raise ValueError(f"grid_g_per_kwh must be >= 0, got {self.grid_g_per_kwh}")
        if not self.cpu_watts_per_core > 0:
            raise ValueError(f"cpu_watts_per_core must be > 0, got {self.cpu_watts_per_core}")


@dataclass(frozen=True)
class EnergyReport:
    """Energy over one interval, and what it means in kWh and CO2."""

    joules: float
    seconds: float
    source: str
    """Which counters: "nvml", "rapl", "estimate" (CPU time × watts per core), joined by "+"."""
    estimated: bool
    kwh: float
    co2_g: float
    tokens: int | None = None
    kwh_per_1k_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        if self.source == "estimate":
            how = "estimated from CPU time"
        else:  # measured counters, perhaps with an estimated part ("rapl+estimate")
            how = self.source.replace("+estimate", " + an estimate")
        what = f"{self.kwh * 1000:.3f} Wh, {self.co2_g:.2f} g CO2 ({how})"
        if self.kwh_per_1k_tokens is not None:
            what += f"; {self.kwh_per_1k_tokens * 1000:.4f} Wh per 1,000 generated tokens"
        return what


def report(
    joules: float, seconds: float, source: str, config: EnergyConfig, tokens: int | None = None
) -> EnergyReport:
    kwh = joules / JOULES_PER_KWH
    per_1k = kwh * 1000 / tokens if tokens else None
    return EnergyReport(
        joules=joules, seconds=seconds, source=source, estimated="estimate" in source,
        kwh=kwh, co2_g=kwh * config.grid_g_per_kwh, tokens=tokens, kwh_per_1k_tokens=per_1k,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Counters: each returns cumulative joules (from an arbitrary origin), or None when unreadable


def _nvml_handles() -> list[Any] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        for h in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # Volta and newer only
        return handles or None
    except Exception:  # not importable, no driver, no GPU, or a GPU without the counter
        return None


def _rapl_files() -> list[tuple[Path, int]]:
    """(energy_uj, max_energy_range_uj) of each readable top-level package domain."""
    out = []
    for domain in sorted(RAPL_ROOT.glob("intel-rapl:[0-9]*")):
        if domain.name.count(":") != 1:  # sub-domains (core, dram) are inside the package
            continue
        try:
            int((domain / "energy_uj").read_text())
            out.append((domain / "energy_uj", int((domain / "max_energy_range_uj").read_text())))
        except (OSError, ValueError):
            return []
    return out


def busy_cpu_seconds(scope: Scope) -> float:
    """CPU time spent: this process (and its finished children), or the whole machine."""
    if scope == "process":
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class EnergyMeter:
    """Cumulative energy of this process or machine since the meter was made.

    ``read()`` returns joules so far; counters that wrap (RAPL) are followed between reads, so
    read at least once per wrap period (minutes to hours; the metrics loop reads every second).
    """

    def __init__(self, scope: Scope = "process", config: EnergyConfig | None = None) -> None:
        self.scope, self.config = scope, config or EnergyConfig()
        self._nvml = _nvml_handles()
        self._rapl = _rapl_files()
        can_read_proc = scope == "process" or Path("/proc/stat").is_file()
        parts = ["nvml"] if self._nvml else []
        parts.append("rapl" if self._rapl else ("estimate" if can_read_proc else "none"))
        self.source = "+".join(parts)
        self._start = time.monotonic()
        self._joules = 0.0
        self._last = self._sample()

    def _sample(self) -> dict[str, float]:
        s: dict[str, float] = {}
        if self._nvml:
            import pynvml

            s["nvml"] = sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._nvml) / 1e3
        if self._rapl:
            for i, (path, _) in enumerate(self._rapl):
                s[f"rapl{i}"] = int(path.read_text()) / 1e6
        elif "estimate" in self.source:
            s["cpu_s"] = busy_cpu_seconds(self.scope)
        return s

    def read(self) -> float:
        """Joules since the meter was made."""
        now = self._sample()
        for key, value in now.items():
            delta = value - self._last.get(key, value)
            if key.startswith("rapl") and delta < 0:  # the counter wrapped
                delta += self._rapl[int(key[4:])][1] / 1e6
            if key == "cpu_s":
                delta *= self.config.cpu_watts_per_core
            self._joules += max(delta, 0.0)
        self._last = now
        return self._joules

    def report(self, tokens: int | None = None) -> EnergyReport:
        joules = self.read()
        return report(joules, time.monotonic() - self._start, self.source, self.config, tokens)


__all__ = [
    "EnergyConfig",
    "EnergyMeter",
    "EnergyReport",
    "busy_cpu_seconds",
    "report",
]
