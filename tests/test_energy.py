"""kilnlm.energy: the meter's arithmetic against independent readings of the same counters."""

from __future__ import annotations

import pytest

from kilnlm import energy
from kilnlm.energy import EnergyConfig, EnergyMeter, busy_cpu_seconds, report


def _burn(n: int = 300_000) -> int:
    return sum(i * i % 7 for i in range(n))


def test_process_estimate_is_cpu_time_times_watts(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)  # an empty powercap: no RAPL here
    before = busy_cpu_seconds("process")
    meter = EnergyMeter("process", EnergyConfig(cpu_watts_per_core=7.0))
    _burn()
    joules = meter.read()
    after = busy_cpu_seconds("process")
    assert meter.source in ("estimate", "nvml+estimate")
    if meter.source == "estimate":
        assert 0 < joules <= (after - before) * 7.0 + 1e-9
    assert meter.report().estimated


def test_machine_scope_reads_proc_stat(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    before = busy_cpu_seconds("machine")
    meter = EnergyMeter("machine")
    _burn()
    joules = meter.read()
    after = busy_cpu_seconds("machine")
    if meter.source == "estimate":
        assert 0 < joules <= (after - before) * meter.config.cpu_watts_per_core + 1e-9


def test_rapl_counters_are_followed_across_a_wrap(monkeypatch, tmp_path):
    """Real files in the layout the kernel uses (a package domain and a sub-domain)."""
    pkg = tmp_path / "intel-rapl:0"
    (pkg / "intel-rapl:0:0").mkdir(parents=True)
    (pkg / "max_energy_range_uj").write_text("1000000\n")  # wraps every joule
    (pkg / "energy_uj").write_text("900000\n")
    (pkg / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    meter = EnergyMeter("machine")
    assert meter.source.endswith("rapl") and not meter.report().estimated
    (pkg / "energy_uj").write_text("950000\n")
    assert meter.read() == pytest.approx(0.05)
    (pkg / "energy_uj").write_text("150000\n")  # wrapped: 50 000 + 150 000 µJ more
    assert meter.read() == pytest.approx(0.25)


def test_report_converts_to_kwh_co2_and_per_1k_tokens():
    r = report(7.2e6, 3600.0, "estimate", EnergyConfig(grid_g_per_kwh=400.0), tokens=4000)
    assert (r.kwh, r.co2_g, r.kwh_per_1k_tokens) == (2.0, 800.0, 0.5)
    assert r.estimated and "estimate" in r.format()


@pytest.mark.parametrize("kw", [{"grid_g_per_kwh": -1}, {"cpu_watts_per_core": 0}])
def test_config_refuses_nonsense(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        EnergyConfig(**kw)
