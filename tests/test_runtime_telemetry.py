"""Telemetry: percentiles and loop error, recorded Jetson sysfs trees and tegrastats lines, energy integration, JSONL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molmoact2_edge.runtimes.power import (
    PowerMonitor,
    PowerSample,
    PowerSampler,
    RaplSampler,
    SysfsRailsSampler,
    UnavailableSampler,
    detect_power_sampler,
    parse_tegrastats_line,
)
from molmoact2_edge.runtimes.telemetry import LoopStats, Telemetry, percentiles, read_jsonl

# Lines as tegrastats prints them (reference/toolchain.md §4.2: AGX Orin, newer inst/avg/max format; and the
# JetPack 5/6 Orin Nano inst/avg format).
AGX_ORIN_LINE = (
    "RAM 4722/62817MB (lfb 1x2MB) CPU [23%@2201,0%@2201,0%@2201,0%@2201] EMC_FREQ 3%@3199 "
    "GR3D_FREQ 12%@[1300,1300] cpu@52.968C gpu@47.625C VDD_GPU_SOC 5139mW/5139mW/5139mW "
    "VDD_CPU_CV 3268mW/3268mW/3268mW VIN_SYS_5V0 5500mW/5500mW/5500mW"
)
ORIN_NANO_LINE = (
    "RAM 2980/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,2%@729,0%@729,0%@729] "
    "EMC_FREQ 0% GR3D_FREQ 0% CPU@47.25C soc2@46.937C VDD_IN 4541mW/4541mW VDD_CPU_GPU_CV 476mW/476mW "
    "VDD_SOC 1388mW/1388mW"
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _hwmon(root: Path, addr: str, channels: dict[int, tuple[str, int, int]]) -> Path:
    """One INA3221 as the mainline hwmon driver lays it out: in<k>_label, in<k>_input mV, curr<k>_input mA."""
    hwmon = root / "sys/bus/i2c/drivers/ina3221" / addr / "hwmon/hwmon3"
    _write(hwmon / "name", "ina3221")
    for k, (label, mv, ma) in channels.items():
        _write(hwmon / f"in{k}_label", label)
        _write(hwmon / f"in{k}_input", str(mv))
        _write(hwmon / f"curr{k}_input", str(ma))
    _write(hwmon / "in7_input", "120")  # sum of shunt voltages (µV): must be ignored
    return hwmon


def test_percentiles_and_loop_error() -> None:
    stats = percentiles([0.001 * i for i in range(1, 101)], 1e3)
    assert stats["count"] == 100 and stats["max"] == pytest.approx(100.0)
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"count": 0}
    loop = LoopStats(period_s=1 / 30)
    for i in range(30):
        loop.add(deadline=i / 30, actual=i / 30 + (0.05 if i == 10 else 0.001))
    summary = loop.summary()
    assert summary["overruns"] == 1 and summary["ticks"] == 30
    assert summary["period_error_ms"]["max"] == pytest.approx(50.0)
    assert summary["period_error_ms"]["p50"] == pytest.approx(1.0)


def test_agx_orin_hwmon_tree_sums_module_rails(tmp_path: Path) -> None:
    _hwmon(
        tmp_path,
        "1-0040",
        {1: ("VDD_GPU_SOC", 19152, 268), 2: ("VDD_CPU_CV", 19152, 171), 3: ("VIN_SYS_5V0", 5000, 1100)},
    )
    _hwmon(tmp_path, "1-0041", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 60), 3: ("NC", 0, 0)})
    sampler = SysfsRailsSampler(tmp_path)
    sample = sampler.read()
    assert set(sample.rails_w) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert sample.rails_w["VDD_GPU_SOC"] == pytest.approx(19.152 * 0.268)
    assert sample.power_w == pytest.approx(sum(sample.rails_w.values()))
    assert sampler.describe()["total"].startswith("sum of rails")


def test_orin_nano_total_is_vdd_in_and_legacy_and_ina238_layouts(tmp_path: Path) -> None:
    _hwmon(
        tmp_path,
        "1-0040",
        {1: ("VDD_IN", 5072, 895), 2: ("VDD_CPU_GPU_CV", 5072, 94), 3: ("VDD_SOC", 5072, 273)},
    )
    nano = SysfsRailsSampler(tmp_path).read()
    assert nano.power_w == pytest.approx(5.072 * 0.895)
    # JetPack 4 iio layout (mW) and the Thor carrier INA238 (µW): VIN wins as the total
    legacy = tmp_path / "legacy"
    iio = legacy / "sys/bus/i2c/drivers/ina3221x/0-0040/iio:device0"
    _write(iio / "rail_name_0", "POM_5V_GPU")
    _write(iio / "in_power0_input", "1234")
    ina238 = legacy / "sys/bus/i2c/drivers/ina238/2-0044/hwmon/hwmon5"
    _write(ina238 / "in1_label", "VIN")
    _write(ina238 / "power1_input", "25500000")
    sample = SysfsRailsSampler(legacy).read()
    assert sample.rails_w == {"POM_5V_GPU": pytest.approx(1.234), "VIN": pytest.approx(25.5)}
    assert sample.power_w == pytest.approx(25.5)


def test_tegrastats_lines() -> None:
    assert parse_tegrastats_line(AGX_ORIN_LINE) == {
        "VDD_GPU_SOC": pytest.approx(5.139),
        "VDD_CPU_CV": pytest.approx(3.268),
        "VIN_SYS_5V0": pytest.approx(5.5),
    }
    nano = parse_tegrastats_line(ORIN_NANO_LINE)
    assert nano == {
        "VDD_IN": pytest.approx(4.541),
        "VDD_CPU_GPU_CV": pytest.approx(0.476),
        "VDD_SOC": pytest.approx(1.388),
    }
    assert "RAM" not in nano and "SWAP" not in nano


def test_rapl_counter_wraps(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(zone / "name", "package-0")
    _write(zone / "max_energy_range_uj", "1000000")
    _write(zone / "energy_uj", "900000")
    sampler = RaplSampler(tmp_path)
    _write(zone / "energy_uj", "100000")  # wrapped: +200000 µJ
    assert sampler.read().energy_j == pytest.approx(0.2)
    assert sampler.describe()["zones"] == ["package-0"]


def test_nothing_here_is_explicitly_unavailable(tmp_path: Path) -> None:
    sampler = detect_power_sampler(tmp_path, tegrastats=False)
    assert isinstance(sampler, UnavailableSampler)
    assert "ina3221-sysfs" in sampler.reason and "rapl" in sampler.reason and "nvml" in sampler.reason


class _Ramp(PowerSampler):
    """Power rising 1 W per second of a fake clock (known integral)."""

    name = "ramp"

    def __init__(self) -> None:
        self.t = 0.0

    def read(self) -> PowerSample:
        self.t += 0.01
        return PowerSample(t=self.t, power_w=self.t)


def test_energy_is_the_trapezoid_integral_over_the_window() -> None:
    monitor = PowerMonitor(_Ramp())
    monitor.samples = [monitor.sampler.read() for _ in range(300)]  # 0.01 .. 3.00 s
    assert monitor.energy_j(1.0, 2.0) == pytest.approx(1.5, rel=1e-6)  # ∫ t dt from 1 to 2
    assert monitor.mean_power_w(1.0, 2.0) == pytest.approx(1.5, rel=1e-6)
    counters = PowerMonitor(UnavailableSampler("x"))
    counters.samples = [PowerSample(t=float(i), energy_j=10.0 * i) for i in range(5)]
    assert counters.energy_j(1.0, 3.0) == pytest.approx(20.0)
    assert counters.energy_j(1.25, 1.75) == pytest.approx(5.0)  # interpolated inside one counter step
    assert not counters.available


def test_jsonl_records_every_chunk_and_a_summary(tmp_path: Path) -> None:
    monitor = PowerMonitor(_Ramp())
    monitor.samples = [monitor.sampler.read() for _ in range(300)]
    path = tmp_path / "run.jsonl"
    telemetry = Telemetry(path, control_hz=30, power=monitor, meta={"backend": {"backend": "onnxruntime"}})
    for i in range(3):
        telemetry.chunk(
            {"vision": 0.01, "prefill": 0.02, "flow": 0.03, "total": 0.06}, t0=1.0 + i * 0.5, t1=1.4 + i * 0.5
        )
    for i in range(40):
        telemetry.tick(deadline=i / 30, actual=i / 30 + 0.002, held=i == 5)
    summary = telemetry.close()
    telemetry.close()
    records = read_jsonl(path)
    assert [r["type"] for r in records][:1] == ["start"] and records[-1]["type"] == "summary"
    chunks = [r for r in records if r["type"] == "chunk"]
    assert [c["index"] for c in chunks] == [0, 1, 2]
    assert chunks[0]["timings_ms"]["prefill"] == pytest.approx(20.0)
    assert chunks[0]["energy_j"] == pytest.approx(0.5 * (1.0 + 1.4) * 0.4, rel=1e-6)
    assert any(r["type"] == "loop" for r in records)
    assert summary["stages_ms"]["flow"]["p50"] == pytest.approx(30.0)
    assert summary["loop"]["held"] == 1 and summary["power"]["available"]
    assert np.isfinite(summary["rss_peak_mb"])
    assert str(summary["gpu_memory_mb"]).startswith("unavailable")  # no NVML on this machine
