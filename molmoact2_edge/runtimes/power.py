"""Power samplers: Jetson INA3221/INA238 sysfs, tegrastats, NVML, Intel RAPL, or an explicit "unavailable".

Every sampler answers ``read() -> PowerSample``: a time, and either an
instantaneous power (sysfs rails, tegrastats) or a cumulative energy counter
(NVML, RAPL), or both. ``PowerMonitor`` samples one in a background thread and
answers energy and mean power over any window (trapezoid rule on power, or the
counter's difference), which is how energy per action chunk is computed.

Where the numbers come from (``reference/toolchain.md`` §4.2-4.4):

- INA3221 (JetPack >= 5, mainline hwmon driver): ``/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/``
  with ``in<k>_label`` (rail), ``in<k>_input`` (mV), ``curr<k>_input`` (mA); labels with "NC" are unconnected.
  INA238 (Thor carrier ``VIN``): same hwmon layout under ``drivers/ina238`` with ``power1_input`` in µW.
  JetPack 4 (``ina3221x``): ``iio:device<N>/rail_name_<k>`` and ``in_power<k>_input`` (mW).
- Total power as jtop computes it: ``VIN`` -> ``POM_5V_IN`` -> ``VDD_IN``, otherwise the sum of rails
  (on AGX Orin the module rails exclude the carrier board; ``describe()`` says which definition is used).
- tegrastats lines: ``NAME <inst>mW/<avg>mW[/<max>mW]``, parsed with jtop's regex.
- NVML: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load), ``nvmlDeviceGetPowerUsage`` (mW).
- RAPL: ``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (µJ, wraps at ``max_energy_range_uj``).

None of these exist on the dev machine; tests feed recorded sysfs trees and tegrastats lines.
"""

from __future__ import annotations

import abc
import bisect
import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TOTAL_RAIL_PREFERENCE = ("VIN", "POM_5V_IN", "VDD_IN")


@dataclass(frozen=True)
class PowerSample:
    """One reading. t: time.monotonic() seconds; power_w: total watts; energy_j: a cumulative counter."""

    t: float
    power_w: float | None = None
    energy_j: float | None = None
    rails_w: dict[str, float] = field(default_factory=dict)


class PowerSampler(abc.ABC):
    """A source of power readings. ``read`` must be cheap enough to call at 100 Hz."""

    name: str = "sampler"

    @abc.abstractmethod
    def read(self) -> PowerSample:
        """The current reading."""

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name}

    def close(self) -> None:  # noqa: B027 - most samplers hold nothing to release
        """Release files or processes. Safe to call twice."""


def total_power(rails_w: dict[str, float]) -> tuple[float, str]:
    """(watts, definition): the preferred input rail when present, else the sum of all rails."""
    for rail in TOTAL_RAIL_PREFERENCE:
        if rail in rails_w:
            return rails_w[rail], f"rail {rail}"
    return sum(rails_w.values()), "sum of rails " + "+".join(sorted(rails_w))


def _read_number(path: Path) -> float:
    return float(path.read_text().strip())


class SysfsRailsSampler(PowerSampler):
    """Jetson INA3221 / INA238 power monitors read straight from sysfs (no daemon, 100 Hz+)."""

    name = "ina3221-sysfs"

    def __init__(self, root: str | Path = "/") -> None:
        self.root = Path(root)
        # rail -> the files read for it on every sample (sysfs values are live), and their units
        self.rails: dict[str, tuple[Path, ...]] = {}
        self._kinds: dict[str, str] = {}
        self._discover()
        if not self.rails:
            raise FileNotFoundError(
                f"no INA3221/INA238 rails under {self.root / 'sys/bus/i2c/drivers'} (not a Jetson, or the "
                "ina3221 driver is not loaded)"
            )
        _, self.definition = total_power(dict.fromkeys(self.rails, 0.0))

    def _discover(self) -> None:
        drivers = self.root / "sys/bus/i2c/drivers"
        for hwmon in sorted(drivers.glob("ina3221/*/hwmon/hwmon*")):
            for label in sorted(hwmon.glob("in*_label")):
                k = label.name[2:-6]
                rail = label.read_text().strip()
                # channels 1-3 only: in4-6 are shunt voltages and in7 their sum, in µV (kernel ina3221.rst)
                if k not in ("1", "2", "3") or "NC" in rail.split("_") or rail == "NC":
                    continue
                volt, curr = hwmon / f"in{k}_input", hwmon / f"curr{k}_input"
                if volt.exists() and curr.exists():
                    self.rails[rail], self._kinds[rail] = (volt, curr), "mV*mA"
        for hwmon in sorted(drivers.glob("ina238/*/hwmon/hwmon*")):
            power = hwmon / "power1_input"
            if power.exists():
                label = hwmon / "in1_label"
                rail = label.read_text().strip() if label.exists() else "VIN"
                self.rails[rail], self._kinds[rail] = (power,), "uW"
        for iio in sorted(drivers.glob("ina3221x/*/iio:device*")):
            for name_file in sorted(iio.glob("rail_name_*")):
                k = name_file.name.rsplit("_", 1)[1]
                rail = name_file.read_text().strip()
                power = iio / f"in_power{k}_input"
                if power.exists() and rail != "NC":
                    self.rails[rail], self._kinds[rail] = (power,), "mW"

    def read(self) -> PowerSample:
        t = time.monotonic()
        rails_w: dict[str, float] = {}
        for rail, files in self.rails.items():
            kind = self._kinds[rail]
            if kind == "mV*mA":
                rails_w[rail] = _read_number(files[0]) * _read_number(files[1]) / 1e6
            elif kind == "uW":
                rails_w[rail] = _read_number(files[0]) / 1e6
            else:
                rails_w[rail] = _read_number(files[0]) / 1e3
        watts, _ = total_power(rails_w)
        return PowerSample(t=t, power_w=watts, rails_w=rails_w)

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "rails": sorted(self.rails), "total": self.definition}


# jtop's regex (core/tegrastats.py): NAME <value><unit>W/<value><unit>W; extra "/max" fields are ignored.
_TEGRA_POWER = re.compile(r"\b(\w+) ([0-9.]+)(\w?)W?\/([0-9.]+)(\w?)W?\b")
_UNIT_SCALE = {"": 1.0, "m": 1e-3, "u": 1e-6}


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """Rail -> instantaneous watts from one tegrastats line (JetPack 4-7 formats)."""
    rails: dict[str, float] = {}
    for name, value, unit, _avg, _avg_unit in _TEGRA_POWER.findall(line):
        if unit in _UNIT_SCALE:
            rails[name] = float(value) * _UNIT_SCALE[unit]
    return rails


class TegrastatsSampler(PowerSampler):
    """Runs ``tegrastats --interval <ms>`` and keeps the latest parsed line (at most one interval stale)."""

    name = "tegrastats"

    def __init__(self, interval_ms: int = 100, command: str = "tegrastats") -> None:
        exe = shutil.which(command)
        if exe is None:
            raise FileNotFoundError(f"'{command}' is not on PATH (not a Jetson, or L4T tools not installed)")
        self.interval_ms = interval_ms
        self._proc = subprocess.Popen(
            [exe, "--interval", str(interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._latest = PowerSample(t=time.monotonic())
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_lines, name="tegrastats", daemon=True)
        self._reader.start()

    def _read_lines(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            rails = parse_tegrastats_line(line)
            if rails:
                watts, _ = total_power(rails)
                with self._lock:
                    self._latest = PowerSample(t=time.monotonic(), power_w=watts, rails_w=rails)

    def read(self) -> PowerSample:
        with self._lock:
            latest = self._latest
        return PowerSample(t=time.monotonic(), power_w=latest.power_w, rails_w=latest.rails_w)

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "interval_ms": self.interval_ms, "rails": sorted(self._latest.rails_w)}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=2)


class NvmlSampler(PowerSampler):
    """A desktop/server NVIDIA GPU through NVML: the total-energy counter (Volta+) and board power."""

    name = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise FileNotFoundError("pynvml is not installed (pip install nvidia-ml-py)") from err
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as err:
            raise FileNotFoundError(
                f"NVML unavailable: {err} (no NVIDIA driver, or a Jetson, which has no NVML)"
            ) from err
        self._nvml = pynvml

    def read(self) -> PowerSample:
        t = time.monotonic()
        energy_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        power_mw = self._nvml.nvmlDeviceGetPowerUsage(self._handle)
        return PowerSample(
            t=t, power_w=power_mw / 1e3, energy_j=energy_mj / 1e3, rails_w={"GPU": power_mw / 1e3}
        )

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class RaplSampler(PowerSampler):
    """Intel RAPL package energy through powercap (bare-metal x86; usually root-only to read)."""

    name = "rapl"

    def __init__(self, root: str | Path = "/") -> None:
        base = Path(root) / "sys/class/powercap"
        self.zones = [z for z in sorted(base.glob("intel-rapl:*")) if z.name.count(":") == 1]
        if not self.zones:
            raise FileNotFoundError(
                f"no RAPL zones under {base} (not bare-metal Intel, or powercap not loaded)"
            )
        try:
            self._range = [_read_number(z / "max_energy_range_uj") for z in self.zones]
            self._last = [_read_number(z / "energy_uj") for z in self.zones]
        except PermissionError as err:
            raise FileNotFoundError(
                f"{err.filename} is not readable (RAPL is root-only since 2020; run as root)"
            ) from err
        self._total_uj = 0.0

    def read(self) -> PowerSample:
        t = time.monotonic()
        for i, zone in enumerate(self.zones):
            now = _read_number(zone / "energy_uj")
            delta = now - self._last[i]
            self._total_uj += delta if delta >= 0 else delta + self._range[i]  # the counter wrapped
            self._last[i] = now
        return PowerSample(t=t, energy_j=self._total_uj / 1e6)

    def describe(self) -> dict[str, Any]:
        names = [(z / "name").read_text().strip() if (z / "name").exists() else z.name for z in self.zones]
        return {"sampler": self.name, "zones": names}


class UnavailableSampler(PowerSampler):
    """No power source on this machine; ``reason`` says what was tried and why each failed."""

    name = "unavailable"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self) -> PowerSample:
        return PowerSample(t=time.monotonic())

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "reason": self.reason}


def detect_power_sampler(root: str | Path = "/", tegrastats: bool = True) -> PowerSampler:
    """The best sampler this machine has (sysfs rails > tegrastats > NVML > RAPL), or an explicit unavailable."""
    attempts: list[tuple[str, Any]] = [
        ("ina3221-sysfs", lambda: SysfsRailsSampler(root)),
        ("nvml", NvmlSampler),
        ("rapl", lambda: RaplSampler(root)),
    ]
    if tegrastats:
        attempts.insert(1, ("tegrastats", TegrastatsSampler))
    reasons = []
    for name, make in attempts:
        try:
            sampler: PowerSampler = make()
        except (FileNotFoundError, OSError) as err:
            reasons.append(f"{name}: {err}")
            continue
        log.info("power sampler: %s", sampler.describe())
        return sampler
    return UnavailableSampler("; ".join(reasons))


class PowerMonitor:
    """Samples a ``PowerSampler`` at ``hz`` in a daemon thread; answers energy and power over time windows."""

    def __init__(self, sampler: PowerSampler, hz: float = 100.0, keep_s: float = 600.0) -> None:
        self.sampler, self.period = sampler, 1.0 / hz
        self.samples: list[PowerSample] = []
        self._max = int(keep_s * hz)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return not isinstance(self.sampler, UnavailableSampler)

    def start(self) -> PowerMonitor:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="power-monitor", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                sample = self.sampler.read()
            except OSError as err:  # a rail vanished (driver reload): stop sampling, say why once
                log.warning("power sampler %s failed, sampling stopped: %s", self.sampler.name, err)
                return
            with self._lock:
                self.samples.append(sample)
                if len(self.samples) > self._max:
                    del self.samples[: len(self.samples) - self._max]
            next_t += self.period
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sampler.close()

    def window(self, t0: float, t1: float) -> list[PowerSample]:
        """Samples with t in [t0, t1] (plus one on each side, so short windows can be interpolated)."""
        with self._lock:
            samples = list(self.samples)
        times = [s.t for s in samples]
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
        return samples[max(0, lo - 1) : hi + 1]

    def energy_j(self, t0: float, t1: float) -> float | None:
        """Energy in joules over [t0, t1]; None when the sampler is unavailable or has too few samples."""
        samples = self.window(t0, t1)
        counters = [s for s in samples if s.energy_j is not None]
        if len(counters) >= 2:
            # the counter interpolated at both window edges (RAPL/NVML update every few ms)
            times = [s.t for s in counters]
            joules = [float(s.energy_j) for s in counters if s.energy_j is not None]
            return float(np.interp(t1, times, joules) - np.interp(t0, times, joules))
        powered = [s for s in samples if s.power_w is not None]
        if len(powered) < 2:
            return None
        energy = 0.0
        for a, b in zip(powered, powered[1:], strict=False):
            lo, hi = max(a.t, t0), min(b.t, t1)
            if hi > lo:
                energy += 0.5 * (a.power_w + b.power_w) * (hi - lo)  # type: ignore[operator]
        return energy

    def mean_power_w(self, t0: float, t1: float) -> float | None:
        energy = self.energy_j(t0, t1)
        return energy / (t1 - t0) if energy is not None and t1 > t0 else None

    def trace(self) -> list[tuple[float, float]]:
        """(t, watts) for plots; RAPL/NVML counters are differentiated between samples."""
        with self._lock:
            samples = list(self.samples)
        if samples and samples[0].power_w is None:
            return [
                (b.t, (b.energy_j - a.energy_j) / (b.t - a.t))  # type: ignore[operator]
                for a, b in zip(samples, samples[1:], strict=False)
                if b.t > a.t
            ]
        return [(s.t, s.power_w) for s in samples if s.power_w is not None]

    def describe(self) -> dict[str, Any]:
        return self.sampler.describe()
