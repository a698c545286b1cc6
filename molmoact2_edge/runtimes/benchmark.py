"""Measure a bundle: latency per stage on several backends (interleaved), loop jitter with inference running, power.

What each number includes (stated once, reported with every result):

- stage latencies are ``PolicySession.act``'s own timings (``vision``, ``prefill``,
  ``depth``, ``decode``, ``flow``) and ``total`` = the whole ``act`` including
  preprocessing, prompt building and un-normalization; warm-up calls are excluded;
- backends are interleaved per iteration (A, B, A, B, ...) so a noisy machine slows
  all of them alike, and ratios are taken within this one run;
- loop jitter is ``|send time - deadline|`` of a fixed-rate control loop driving a
  ``DryRunGate`` (no robot) while the first backend computes chunks in its thread;
- Think bundles: the depth stage with the cache vs without (graph calls per frame, stage p50,
  cells re-predicted, drafts rejected) on a moving scene, ``depth_benchmark``;
- energy per chunk needs a power sampler (``power.detect_power_sampler``); without
  one the result says ``available: false`` and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.runtimes.control import DryRunGate, LoopConfig, run_episode
from molmoact2_edge.runtimes.power import PowerMonitor, detect_power_sampler
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.runtimes.telemetry import Telemetry, percentiles
from molmoact2_edge.types import Observation

log = logging.getLogger(__name__)

DEFAULT_TASK = "pick up the red cube"


def synthetic_observation(session: PolicySession, seed: int = 0, task: str = DEFAULT_TASK) -> Observation:
    """A fixed random observation with the bundle's cameras at twice its image size (so resizing is timed)."""
    rng = np.random.default_rng(seed)
    h, w = session.image_size
    images = {name: rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8) for name in session.camera_order}
    state = np.asarray(session.norm.unnormalize_state(np.zeros(session.state_dim, np.float32)), np.float32)
    return Observation(images=images, state=state, task=task, timestamp=time.monotonic())


def compare_backends(
    bundle: str | Path,
    backends: Sequence[str],
    iterations: int = 20,
    warmup: int = 2,
    backend_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per-backend stage percentiles (ms) from interleaved ``act`` calls, and ``speedup_vs_torch`` when torch ran."""
    sessions = {
        name: PolicySession(bundle, name, **(backend_options or {}).get(name, {})) for name in backends
    }
    try:
        first = next(iter(sessions.values()))
        obs = synthetic_observation(first)
        timings: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
        for i in range(warmup + iterations):
            for name, session in sessions.items():
                session.reset()
                chunk = session.act(obs, seed=i)
                if i < warmup:
                    continue
                for stage, seconds in chunk.timings.items():
                    timings[name].setdefault(stage, []).append(seconds)
        results: dict[str, Any] = {}
        for name, session in sessions.items():
            stages = {
                stage: percentiles(v, 1e3) for stage, v in timings[name].items() if any(x > 0 for x in v)
            }
            results[name] = {
                "backend": session.backend.describe(),
                "stages_ms": stages,
                "raw_s": timings[name],
            }
        if "torch" in results:
            torch_p50 = results["torch"]["stages_ms"]["total"]["p50"]
            for result in results.values():
                result["speedup_vs_torch"] = torch_p50 / result["stages_ms"]["total"]["p50"]
        return {"iterations": iterations, "warmup": warmup, "backends": results}
    finally:
        for session in sessions.values():
            session.close()


def thread_options(threads: int | None) -> dict[str, dict[str, Any]]:
    """Per-backend options that pin CPU threads to ``threads`` (None: each backend's own default)."""
    if threads is None:
        return {}
    ort = {"intra_op_threads": threads}
    return {"onnxruntime": ort, "auto": ort, "torch": {"threads": threads}}


def loop_jitter(
    bundle: str | Path,
    backend: str,
    seconds: float = 5.0,
    hz: float = 30.0,
    telemetry_path: str | Path | None = None,
    power: PowerMonitor | None = None,
    backend_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the control loop at ``hz`` for ``seconds`` on a DryRunGate with ``backend`` inferring; the summary."""
    with PolicySession(bundle, backend, **(backend_options or {})) as session:
        obs = synthetic_observation(session)

        def observe(task: str) -> Observation:
            return Observation(images=obs.images, state=obs.state, task=task, timestamp=time.monotonic())

        telemetry = Telemetry(
            telemetry_path, control_hz=hz, power=power, meta={"backend": session.backend.describe()}
        )
        gate = DryRunGate(observe, session.state_dim)
        result = run_episode(
            session.act, gate, LoopConfig(task=obs.task, hz=hz, duration_s=seconds), telemetry
        )
        summary = telemetry.close()
    summary["episode"] = {"ticks": result.ticks, "held_ticks": result.held_ticks, "chunks": result.chunks}
    summary["period_errors_ms"] = [e * 1e3 for e in telemetry.loop.errors_s]
    return summary


def run_benchmark(
    bundle: str | Path,
    backends: Sequence[str],
    iterations: int = 20,
    loop_seconds: float = 5.0,
    hz: float = 30.0,
    telemetry_path: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Everything ``molmo-edge bench`` reports, as one JSON-able dict. threads: CPU threads per backend."""
    options = thread_options(threads)
    monitor = PowerMonitor(detect_power_sampler()).start()
    try:
        report = compare_backends(bundle, backends, iterations, backend_options=options)
        report["threads"] = threads
        report["loop"] = loop_jitter(
            bundle, backends[0], loop_seconds, hz, telemetry_path, monitor, options.get(backends[0])
        )
        report["power"] = report["loop"].pop("power")
        report["power_trace"] = monitor.trace()
    finally:
        monitor.stop()
    report.update(think_depth(bundle, backends[0], options.get(backends[0])))
    return report


def think_depth(bundle: str | Path, backend: str, backend_options: dict[str, Any] | None) -> dict[str, Any]:
    """``{"depth": ...}`` for a Think bundle (``depth_benchmark``: with vs without the cache), else ``{}``."""
    from molmoact2_edge.runtimes.bundle import Bundle
    from molmoact2_edge.runtimes.depth_benchmark import depth_benchmark

    opened = Bundle.open(bundle)
    if not opened.model.get("depth"):
        return {}
    options = backend_options or {}
    with PolicySession(opened, backend, **options) as cached, PolicySession(opened, backend, **options) as uncached:
        return {"depth": depth_benchmark(cached, uncached, synthetic_observation(cached))}
