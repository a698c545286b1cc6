"""Measure a bundle: latency per stage on several backends (interleaved), loop jitter with inference running, power.

What each number includes (stated once, reported with every result):

- stage latencies are ``PolicySession.act``'s own timings (``vision``, ``prefill``,
  ``depth``, ``decode``, ``flow``) and ``total`` = the whole ``act`` including
  preprocessing, prompt building and un-normalization; warm-up calls are excluded;
- each backend runs in its own process (``bench_worker``), loaded once; they take turns in
  short rounds (A B, B A, A B, ...), one at a time, the others blocked: contenders never share
  cores or thread pools while timed (the CPU the waiting ones use is measured), and a slow phase
  of the machine hits all of them; medians and the spread are reported with the thread setting,
  and ratios are taken within this one run;
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
import math
import os
import subprocess
import sys
import tempfile
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


class _Worker:
    """One contender's process (``bench_worker``), loaded once and kept for every round of a comparison."""

    def __init__(self, bundle: str | Path, contender: Contender, warmup: int, threads: int | None) -> None:
        spec = {
            "bundle": contender.bundle or str(bundle), "backend": contender.backend, "options": contender.options,
            "threads": threads, "warmup": warmup, "checkpoint": contender.checkpoint,
        }  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        self.label = contender.label
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close()); a pipe could fill up and stall the worker
        self._process = subprocess.Popen(
            [sys.executable, "-m", "molmoact2_edge.runtimes.bench_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
        )  # fmt: skip
        self.describe: dict[str, Any] = self._reply()["ready"]

    def time(self, calls: int, seed: int) -> dict[str, list[float]]:
        """Per-stage seconds of ``calls`` timed calls (after one untimed call, in the worker)."""
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"calls": calls, "seed": seed}) + "\n")
        self._process.stdin.flush()
        return dict(self._reply()["stages"])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker process so far (Linux ``/proc``; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _reply(self) -> dict[str, Any]:
        """The worker's next JSON line (a line a library printed to stdout on the way is skipped)."""
        assert self._process.stdout is not None
        for line in iter(self._process.stdout.readline, ""):  # one line at a time, as the worker flushes them
            if line.startswith("{"):
                return dict(json.loads(line))
        self._process.wait()
        self._stderr.seek(0)
        raise BackendError(
            f"benchmark contender {self.label!r} failed (exit {self._process.returncode}):\n"
            f"{self._stderr.read().strip()[-2000:]}"
        )

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def compare_backends(
    bundle: str | Path,
    backends: Sequence[str | Contender],
    iterations: int = 20,
    warmup: int = 2,
    backend_options: dict[str, dict[str, Any]] | None = None,
    rounds: int | None = None,
    threads: int | None = None,
    resident: bool | None = None,
) -> dict[str, Any]:
    """Per-contender stage percentiles (ms), each contender in its own process, alternated over short rounds.

    Every contender's process is started and warmed up first, and kept (``resident``; None: when the machine's
    memory holds them all, ``fits_together``; else each turn starts its contender's process and ends it, as
    on a Jetson comparing backends of a model that fills its memory). ``iterations`` timed calls per
    contender are split over ``rounds`` (default: about 3 calls a round); in round r the contenders take
    turns (reversed order on odd rounds), one at a time, the others blocked waiting. This machine's speed
    drifts within seconds (a shared host), so short, adjacent turns are what makes the contenders of a round
    comparable: ``round_medians`` pairs them. A turn starts once every process is idle (``_settle``).
    ``speedup_vs_torch`` (torch p50 / p50) is added when a ``torch`` or ``eager`` contender ran, and
    ``speedup_vs_torch_paired``: the median over rounds of torch's round median / this contender's;
    ``spread_ms`` is the p25-p75 of ``total`` and the round medians;
    ``idle_cpu_ms`` is the CPU time the waiting contenders used while this one was timed (0: no sharing).
    """
    contenders = [
        c if isinstance(c, Contender) else Contender(c, c, (backend_options or {}).get(c, {})) for c in backends
    ]
    rounds = max(1, min(rounds or iterations // 3, iterations))
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    samples: dict[str, dict[str, list[float]]] = {c.label: {} for c in contenders}
    round_medians: dict[str, list[float]] = {c.label: [] for c in contenders}
    idle_cpu = dict.fromkeys(samples, 0.0)  # NaN where the OS does not tell a process's CPU time
    described: dict[str, Any] = {}
    resident = fits_together(bundle, contenders) if resident is None else resident
    kept: dict[str, _Worker] = {}
    try:
        for contender in contenders if resident else ():  # loading runs before any timing, never during one
            kept[contender.label] = _Worker(bundle, contender, warmup, threads)
        for r, count in enumerate(per_round):
            for contender in contenders if r % 2 == 0 else contenders[::-1]:
                worker = kept.get(contender.label) or _Worker(bundle, contender, warmup, threads)
                live = list(kept.values()) or [worker]
                others = [w for w in live if w is not worker]
                try:
                    _settle(live)
                    before = sum(w.cpu_seconds() for w in others)
                    timed = worker.time(count, seed=1000 * r)
                    idle_cpu[worker.label] += sum(w.cpu_seconds() for w in others) - before
                finally:
                    if not resident:  # this turn's process
                        worker.close()
                described[worker.label] = worker.describe
                for stage, values in timed.items():
                    samples[worker.label].setdefault(stage, []).extend(values)
                round_medians[worker.label].append(float(np.median(timed["total"])) * 1e3)
    finally:
        for worker in kept.values():
            worker.close()
    results: dict[str, Any] = {}
    for c in contenders:
        stages = {
            stage: percentiles(v, 1e3) for stage, v in samples[c.label].items() if any(x > 0 for x in v)
        }
        total = np.asarray(samples[c.label]["total"]) * 1e3
        idle = idle_cpu[c.label]
        results[c.label] = {
            "backend": described[c.label],
            "stages_ms": stages,
            "spread_ms": {
                "p25": float(np.percentile(total, 25)),
                "p75": float(np.percentile(total, 75)),
                "round_medians": [round(m, 2) for m in round_medians[c.label]],
            },
            "idle_cpu_ms": None if math.isnan(idle) else round(idle * 1e3, 1),
            "raw_s": samples[c.label],
        }
    reference = next((c.label for c in contenders if c.backend in ("torch", "eager")), None)
    if reference is not None:
        ref_p50 = results[reference]["stages_ms"]["total"]["p50"]
        ref_rounds = np.asarray(round_medians[reference])
        for label, result in results.items():
            result["speedup_vs_torch"] = ref_p50 / result["stages_ms"]["total"]["p50"]
            # per round: torch's median / this one's, timed within a second of each other, so a slow phase of
            # the machine divides out instead of landing in one contender's rounds only
            result["speedup_vs_torch_paired"] = float(np.median(ref_rounds / np.asarray(round_medians[label])))
    loading = (
        f"loaded and warmed up ({warmup} call(s)) before timing and kept"
        if resident
        else f"started, warmed up ({warmup} call(s)) and ended for each turn (the machine's memory does not hold "
        "all contenders at once)"
    )
    method = (
        f"each contender in its own process, {loading}; {rounds} alternated round(s) of "
        f"{min(per_round)}-{max(per_round)} timed call(s), each after one untimed call, starting once every "
        f"contender's process is idle (the others wait blocked); threads {threads if threads else 'backend default'}"
    )
    return {
        "iterations": iterations, "warmup": warmup, "rounds": rounds, "resident": resident, "method": method,
        "backends": results,
    }  # fmt: skip


# A worker holds its model's weights about twice over (the graphs as loaded, the backend's own copies: onnxruntime's
# CPU form, TensorRT engines, the flow's zero-prefix variant); resident workers must leave this share of memory free.
WORKER_BYTES_PER_MODEL_BYTE = 2.0
FREE_MEMORY_SHARE = 0.25


def fits_together(bundle: str | Path, contenders: Sequence[Contender]) -> bool:
    """Whether every contender's process can stay loaded at once: their models' bytes (the bundle's files, or the
    checkpoint's for eager) times WORKER_BYTES_PER_MODEL_BYTE within the available memory less a FREE_MEMORY_SHARE.
    True where the OS does not say how much memory is available (``/proc/meminfo``)."""
    available = _available_memory()
    if available is None:
        return True
    needed = sum(_folder_bytes(_model_folder(bundle, c)) for c in contenders)
    fits = needed * WORKER_BYTES_PER_MODEL_BYTE <= available * (1 - FREE_MEMORY_SHARE)
    if not fits:
        log.info(
            "benchmark: %d contenders' models (%.1f GB) do not stay loaded together in %.1f GB available; one "
            "process per turn", len(contenders), needed / 1e9, available / 1e9,
        )  # fmt: skip
    return fits


def _model_folder(bundle: str | Path, contender: Contender) -> Path:
    """What the contender's process loads: the eager reference's checkpoint, else its bundle."""
    if contender.backend == "eager" and contender.checkpoint:
        return Path(contender.checkpoint)
    return Path(contender.bundle or bundle)


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


# A process that just finished its turn may keep a core busy: OpenMP and onnxruntime pool threads spin
# after their work (libgomp, KMP_BLOCKTIME ~200 ms, onnxruntime's spinning option). The next turn starts
# only when every worker's CPU time stopped growing over SETTLE_S (the counters tick in 10 ms steps).
SETTLE_S = 0.05
SETTLE_MAX_S = 3.0


def _settle(workers: Sequence[_Worker]) -> None:
    """Wait until no worker uses CPU (or SETTLE_MAX_S passed: logged, and the idle CPU column shows it)."""
    deadline = time.monotonic() + SETTLE_MAX_S
    used = sum(w.cpu_seconds() for w in workers)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = sum(w.cpu_seconds() for w in workers)
        if now == used or math.isnan(now):
            return
        used = now
    log.warning("benchmark: the contenders' processes kept using CPU for %.0f s between turns", SETTLE_MAX_S)


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
    resident: bool | None = None,
) -> dict[str, Any]:
    """Everything ``molmo-edge bench`` reports, as one JSON-able dict. threads: CPU threads per backend."""
    options = thread_options(threads)
    monitor = PowerMonitor(detect_power_sampler()).start()
    try:
        report = compare_backends(
            bundle, backends, iterations, backend_options=options, rounds=rounds, threads=threads, resident=resident
        )
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
