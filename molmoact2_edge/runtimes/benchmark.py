"""Measure a bundle: latency per stage on several backends (interleaved), loop jitter with inference running, power.

What each number includes (stated once, reported with every result):

- stage latencies are ``PolicySession.act``'s own timings (``vision``, ``prefill``,
  ``depth``, ``decode``, ``flow``) and ``total`` = the whole ``act`` including
  preprocessing, prompt building and un-normalization; warm-up calls are excluded;
- each backend runs in its own process (``bench_worker``), one at a time, alternated over
  rounds (A B, B A, A B, ...): contenders never share cores or thread pools while timed,
  and a noisy phase of the machine hits all of them; medians and the spread are reported
  with the thread setting, and ratios are taken within this one run;
- loop jitter is ``|send time - deadline|`` of a fixed-rate control loop driving a
  ``DryRunGate`` (no robot) while the first backend computes chunks in its thread;
- Think bundles: the depth stage with the cache vs without (graph calls per frame, stage p50,
  cells re-predicted, drafts rejected) on a moving scene, ``depth_benchmark``;
- energy per chunk needs a power sampler (``power.detect_power_sampler``); without
  one the result says ``available: false`` and why.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.errors import BackendError
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


@dataclass(frozen=True)
class Contender:
    """One thing to time: a backend of the bundle with its options, or ``eager`` (the PyTorch reference)."""

    label: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # eager only: the checkpoint the bundle came from
    bundle: str | None = None  # another bundle than the comparison's (e.g. another precision of it)


def run_contender(
    bundle: str | Path, contender: Contender, iterations: int, warmup: int, threads: int | None, seed: int
) -> dict[str, Any]:
    """Time ``contender`` in a fresh process (``bench_worker``); its per-stage seconds and ``describe``."""
    spec = {
        "bundle": contender.bundle or str(bundle), "backend": contender.backend, "options": contender.options, "threads": threads,
        "iterations": iterations, "warmup": warmup, "seed": seed, "checkpoint": contender.checkpoint,
    }  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "molmoact2_edge.runtimes.bench_worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BackendError(f"benchmark contender {contender.label!r} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_backends(
    bundle: str | Path,
    backends: Sequence[str | Contender],
    iterations: int = 20,
    warmup: int = 2,
    backend_options: dict[str, dict[str, Any]] | None = None,
    rounds: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Per-contender stage percentiles (ms), each contender in its own process, alternated over rounds.

    ``iterations`` timed calls per contender are split over ``rounds`` (default: up to 5); in round r
    the contenders run one after another (reversed order on odd rounds), so slow phases of a loaded
    machine hit all of them. ``speedup_vs_torch`` (torch p50 / p50) is added when a ``torch`` or
    ``eager`` contender ran; ``spread_ms`` is the p25-p75 of ``total`` and the range of round medians.
    """
    contenders = [
        c if isinstance(c, Contender) else Contender(c, c, (backend_options or {}).get(c, {})) for c in backends
    ]
    rounds = max(1, min(rounds or 5, iterations))
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    samples: dict[str, dict[str, list[float]]] = {c.label: {} for c in contenders}
    round_medians: dict[str, list[float]] = {c.label: [] for c in contenders}
    described: dict[str, Any] = {}
    for r, count in enumerate(per_round):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for contender in order:
            result = run_contender(bundle, contender, count, warmup, threads, seed=1000 * r)
            described[contender.label] = result["describe"]
            for stage, values in result["stages"].items():
                samples[contender.label].setdefault(stage, []).extend(values)
            round_medians[contender.label].append(float(np.median(result["stages"]["total"])) * 1e3)
    results: dict[str, Any] = {}
    for c in contenders:
        stages = {
            stage: percentiles(v, 1e3) for stage, v in samples[c.label].items() if any(x > 0 for x in v)
        }
        total = np.asarray(samples[c.label]["total"]) * 1e3
        results[c.label] = {
            "backend": described[c.label],
            "stages_ms": stages,
            "spread_ms": {
                "p25": float(np.percentile(total, 25)),
                "p75": float(np.percentile(total, 75)),
                "round_medians": [round(m, 2) for m in round_medians[c.label]],
            },
            "raw_s": samples[c.label],
        }
    reference = next((c.label for c in contenders if c.backend in ("torch", "eager")), None)
    if reference is not None:
        ref_p50 = results[reference]["stages_ms"]["total"]["p50"]
        for result in results.values():
            result["speedup_vs_torch"] = ref_p50 / result["stages_ms"]["total"]["p50"]
    method = (
        f"each contender in its own process, {rounds} alternated round(s), {warmup} warm-up call(s) per process, "
        f"threads {threads if threads else 'backend default'}"
    )
    return {"iterations": iterations, "warmup": warmup, "rounds": rounds, "method": method, "backends": results}


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
    rounds: int | None = None,
) -> dict[str, Any]:
    """Everything ``molmo-edge bench`` reports, as one JSON-able dict. threads: CPU threads per backend."""
    options = thread_options(threads)
    monitor = PowerMonitor(detect_power_sampler()).start()
    try:
        report = compare_backends(bundle, backends, iterations, backend_options=options, rounds=rounds, threads=threads)
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
