"""Run telemetry: per-stage latency percentiles, control-loop period error, memory, power and energy, as JSONL.

``Telemetry`` is fed by the control loop (one ``tick`` per control period) and
by the inference thread (one ``chunk`` per ``act()``), keeps every value in
memory for the summary, and appends JSONL records as they happen, flushed line
by line so a crash loses nothing already written:

- ``{"type": "start", "schema", "control_hz", "backend": {...}, "power": {...}, ...}``
- ``{"type": "episode_start", "episode", "joint_names", ...}`` from ``begin_episode``
- ``{"type": "tick", "episode", "tick", "t", "deadline", "period_error_ms", "held", ...}`` every tick,
  with the loop's per-tick fields (state, target, sent, safety rule, chunk and action index)
- ``{"type": "chunk", "index", "t", "timings_ms": {stage: ms}, "energy_j", "mean_power_w", "info", "actions"}``
- ``{"type": "swap", ...}`` and other events from ``event``
- ``{"type": "loop", "ticks", "period_error_ms": {p50, p90, p99, max}, "overruns", "held"}`` once per second,
  with ``{"type": "power", "t": [...], "w": [...]}`` (the samples since the last one) when power is measured
- ``{"type": "summary", ...}`` at ``close()``: ``summary()``'s dict

The full schema, versioned, is ``docs/telemetry.md``; ``telemetry_schema.load_telemetry`` reads it
back as arrays. ``observers`` (callables) see every record as it is written, file or not: live
progress and the rerun display are observers.

Period error is ``actual send time - deadline`` of each tick (absolute-deadline
scheduling, so it does not accumulate); an overrun is a tick that started a
whole period or more late. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from molmoact2_edge.runtimes.power import PowerMonitor
from molmoact2_edge.runtimes.telemetry_schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

STAGES = ("vision", "prefill", "depth", "decode", "flow", "total")

Observer = Callable[[Mapping[str, Any]], None]


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """{count, mean, p50, p90, p99, max} of ``values`` times ``scale`` (e.g. 1e3 for s -> ms); empty -> count 0."""
    if len(values) == 0:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
    }


def rss_mb() -> float:
    """Resident set size of this process in MiB (peak on platforms without /proc)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def gpu_memory_mb(device_index: int = 0) -> float | str:
    """GPU memory in use (MiB) through NVML, or why it cannot be read.

    A Jetson has no NVML and no separate GPU memory: its GPU allocations show in the process RSS.
    """
    try:
        import pynvml
    except ImportError:
        return "unavailable: pynvml not installed (pip install nvidia-ml-py); on a Jetson GPU memory is in the RSS"
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_index))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as err:
        return f"unavailable: {err}"
    return float(info.used) / (1024 * 1024)


class LoopStats:
    """Period error and overruns of a fixed-rate loop."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.errors_s: list[float] = []
        self.overruns = 0
        self.held = 0

    def add(self, deadline: float, actual: float, held: bool = False) -> None:
        error = actual - deadline
        self.errors_s.append(error)
        self.overruns += error >= self.period_s
        self.held += held

    def summary(self, since: int = 0) -> dict[str, Any]:
        errors = self.errors_s[since:]
        return {
            "ticks": len(errors),
            "period_ms": self.period_s * 1e3,
            "period_error_ms": percentiles(np.abs(errors).tolist() if errors else [], 1e3),
            "overruns": self.overruns,
            "held": self.held,
        }


class Telemetry:
    """Collects stage latencies, loop timing, power and memory for one run; optionally writes JSONL.

    Thread-safe: the control thread calls ``tick``, the inference thread ``chunk``.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        control_hz: float = 30.0,
        power: PowerMonitor | None = None,
        meta: Mapping[str, Any] | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.observers = list(observers)
        self.episode = 0
        self._episode_ticks = 0
        self._power_reported = float("-inf")
        self.loop = LoopStats(1.0 / control_hz)
        self.stages: dict[str, list[float]] = {}
        self.energy_per_chunk: list[float] = []
        self.power = power
        self.chunks = 0
        self.rss_peak_mb = rss_mb()
        self._lock = threading.Lock()
        self._ticks_reported = 0
        self._last_loop_record: float | None = None
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)  # line-buffered: each record lands on write
        power_info = power.describe() if power is not None else {"sampler": "none", "reason": "not requested"}
        start = {"type": "start", "schema": SCHEMA_VERSION, "t": time.monotonic(), "control_hz": control_hz}
        self.write({**start, "pid": os.getpid(), "power": power_info, **(meta or {})})

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
        for observer in self.observers:
            observer(record)

    def begin_episode(self, episode: int, **info: Any) -> None:
        """Tag the records that follow with ``episode`` (tick numbers restart at 0)."""
        with self._lock:
            self.episode, self._episode_ticks = episode, 0
        self.write({"type": "episode_start", "episode": episode, "t": time.monotonic(), **info})

    def event(self, kind: str, **fields: Any) -> None:
        """A one-off record of this episode (e.g. a chunk swap)."""
        self.write({"type": kind, "episode": self.episode, "t": time.monotonic(), **fields})

    def chunk(
        self,
        timings_s: Mapping[str, float],
        t0: float,
        t1: float,
        info: Mapping[str, Any] | None = None,
        actions: np.ndarray | None = None,
        obs_t: float | None = None,
    ) -> None:
        """Record one ``act()`` that ran from t0 to t1 (monotonic s) with its per-stage timings in seconds.

        actions: the chunk's (ah, ad) targets; obs_t: when its observation was taken.
        """
        energy = self.power.energy_j(t0, t1) if self.power is not None else None
        with self._lock:
            index = self.chunks
            self.chunks += 1
            for stage, seconds in timings_s.items():
                self.stages.setdefault(stage, []).append(float(seconds))
            if energy is not None:
                self.energy_per_chunk.append(energy)
            self.rss_peak_mb = max(self.rss_peak_mb, rss_mb())
        self.write(
            {
                "type": "chunk",
                "index": index,
                "episode": self.episode,
                "t": t1,
                "t0": t0,
                "obs_t": obs_t,
                "timings_ms": {k: round(v * 1e3, 4) for k, v in timings_s.items()},
                "energy_j": energy,
                "mean_power_w": energy / (t1 - t0) if energy is not None and t1 > t0 else None,
                "info": dict(info or {}),
                "actions": np.round(np.asarray(actions, np.float64), 4) if actions is not None else None,
            }
        )

    def tick(
        self, deadline: float, actual: float, held: bool = False, fields: Mapping[str, Any] | None = None
    ) -> None:
        """Record one control tick: its deadline, when the action actually went out, and the loop's
        per-tick ``fields`` (``telemetry_schema.tick_fields``: state, target, sent, safety rule, ...)."""
        with self._lock:
            self.loop.add(deadline, actual, held)
            tick_record = {
                "type": "tick",
                "episode": self.episode,
                "tick": self._episode_ticks,
                "t": actual,
                "deadline": deadline,
                "period_error_ms": round((actual - deadline) * 1e3, 4),
                "held": held,
                **(fields or {}),
            }
            self._episode_ticks += 1
            if self._last_loop_record is None:
                self._last_loop_record = actual
            due = actual - self._last_loop_record >= 1.0
            if due:
                record = {"type": "loop", "t": actual, **self.loop.summary(since=self._ticks_reported)}
                self._ticks_reported = len(self.loop.errors_s)
                self._last_loop_record = actual
        self.write(tick_record)
        if due:
            self.write(record)
            self._write_power()

    def _write_power(self) -> None:
        """The power samples taken since the last power record."""
        if self.power is None or not self.power.available:
            return
        samples = [(t, w) for t, w in self.power.trace() if t > self._power_reported]
        if samples:
            self._power_reported = samples[-1][0]
            self.write(
                {"type": "power", "t": [round(t, 4) for t, _ in samples], "w": [round(w, 4) for _, w in samples]}
            )

    def summary(self) -> dict[str, Any]:
        with self._lock:
            stages = {stage: percentiles(values, 1e3) for stage, values in self.stages.items()}
            summary: dict[str, Any] = {
                "chunks": self.chunks,
                "stages_ms": stages,
                "loop": self.loop.summary(),
                "rss_peak_mb": round(self.rss_peak_mb, 1),
                "gpu_memory_mb": gpu_memory_mb(),  # at summary time: NVML init per chunk would cost ms
            }
            if self.power is None or not self.power.available:
                summary["power"] = {"available": False, **(self.power.describe() if self.power else {})}
            else:
                summary["power"] = {
                    "available": True,
                    **self.power.describe(),
                    "energy_per_chunk_j": percentiles(self.energy_per_chunk),
                }
        return summary

    def close(self) -> dict[str, Any]:
        """Write the summary record, close the file and return the summary. Safe to call twice."""
        summary = self.summary()
        if self._file is not None:
            self.write({"type": "summary", "t": time.monotonic(), **summary})
            self._file.close()
            self._file = None
        return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a telemetry file (for plots, reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
