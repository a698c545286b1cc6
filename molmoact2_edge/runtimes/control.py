"""The closed loop: a fixed-rate control thread feeding a robot from action chunks that inference computes ahead.

Two threads, one job each:

- **control** (the caller's thread, so Ctrl-C lands here): at every absolute
  deadline ``start + i / hz`` it sends one action through the safety layer. The
  action is picked from the current chunk by *time*, not by count: index
  ``k = round((deadline - chunk.timestamp) * hz)``, where ``chunk.timestamp`` is
  when its observation was taken. A chunk that took 120 ms to compute therefore
  starts at its 4th action at 30 Hz, the one meant for now, instead of replaying
  stale motion from its start. When the remaining actions fall to
  ``swap_threshold * chunk length`` (LeRobot async inference's
  ``chunk_size_threshold``), the control thread takes a fresh observation (it
  owns the bus, so reads and writes never interleave across threads) and hands it
  to the inference thread; the finished chunk replaces the current one at the
  next tick, so there is no stall at chunk boundaries.
- **inference**: ``policy(observation) -> ActionChunk`` (``PolicySession.act`` or any
  callable), timed into telemetry. With ``LoopConfig.rtc`` it is called as
  ``policy(observation, prefix=CommittedPrefix)`` once a chunk is executing: the actions the loop
  keeps sending while inference runs, and the delay measured at the last swap (``runtimes/rtc.py``).
  Every swap is written to telemetry as ``{"type": "swap", "delay_ticks", "seam_jump", ...}``.

When the current chunk runs out before the next arrives (inference stalled), the
safety layer holds the last commanded target; after ``stall_timeout_s`` without
a usable chunk (``first_chunk_timeout_s`` for the first, which also warms the backend up) the
episode ends with a ``SafetyError``. An episode ends at
``duration_s``, when ``success()`` turns true, on Ctrl-C or on an error; every
exit goes through ``gate.close()`` (the torque policy) before returning or raising.
Deadlines use ``time.monotonic()`` (a Jetson's wall clock jumps at NTP sync).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from molmoact2_edge.errors import SafetyError
from molmoact2_edge.rtc import CommittedPrefix
from molmoact2_edge.runtimes.rtc import ChunkHandoff, tick_index
from molmoact2_edge.runtimes.telemetry import Telemetry
from molmoact2_edge.runtimes.telemetry_schema import tick_fields
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)

Policy = Callable[[Observation], ActionChunk]


class ActionGate(Protocol):
    """What the loop needs between it and the robot: ``hardware.safety.SafetyLayer`` (started) is one."""

    def observe(self, task: str) -> Observation:
        """A fresh observation from the robot."""
        ...

    def send(self, target: np.ndarray) -> np.ndarray:
        """Send one (s,) target through the limits; return what was actually sent."""
        ...

    def hold(self) -> np.ndarray:
        """Hold the last commanded target (the watchdog's action); return it."""
        ...

    def close(self) -> None:
        """End of episode: apply the torque policy. Safe to call twice; must not raise on a dead bus."""
        ...


class DryRunGate:
    """A gate with no robot: observations come from ``observe_fn``, targets go nowhere but ``sent``.

    For benchmarking the loop's timing with inference running (``molmo-edge bench``) and for
    rehearsing a bundle before a robot is attached.
    """

    def __init__(self, observe_fn: Callable[[str], Observation], state_dim: int) -> None:
        self.observe_fn = observe_fn
        self.last = np.zeros(state_dim, np.float32)
        self.sent = 0

    def observe(self, task: str) -> Observation:
        return self.observe_fn(task)

    def send(self, target: np.ndarray) -> np.ndarray:
        self.last = np.asarray(target, np.float32)
        self.sent += 1
        return self.last

    def hold(self) -> np.ndarray:
        return self.last

    def close(self) -> None:
        """Nothing to release."""


class Recorder(Protocol):
    """Where observations and the actions sent for them go (``data`` LeRobot-format writer)."""

    def add(self, observation: Observation, action: np.ndarray) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    """The control loop's knobs."""

    task: str
    hz: float = 30.0
    swap_threshold: float = 0.5  # ask for the next chunk when this fraction of the current one is left
    duration_s: float | None = None  # None: until success, Ctrl-C or an error
    stall_timeout_s: float = 2.0  # holding longer than this without a usable chunk ends the episode
    first_chunk_timeout_s: float = 15.0  # the first act() also warms the backend up (allocation, kernels)
    record_flush_s: float = 1.0  # a crash loses at most this much of a recording
    spin_s: float = 0.0005  # busy-wait the last half millisecond before a deadline (sleep overshoots)
    rtc: bool = False  # hand the policy the committed prefix (real-time chunking, runtimes/rtc.py)

    def __post_init__(self) -> None:
        if self.hz <= 0:
            raise ValueError(f"hz must be positive, got {self.hz}")
        if not 0.0 < self.swap_threshold <= 1.0:
            raise ValueError(f"swap_threshold must be in (0, 1], got {self.swap_threshold}")


@dataclass
class EpisodeResult:
    """How an episode went."""

    end: str  # duration | success | interrupted | error
    ticks: int = 0
    held_ticks: int = 0
    chunks: int = 0
    duration_s: float = 0.0
    sent: list[np.ndarray] = field(default_factory=list, repr=False)
    targets: list[np.ndarray] = field(default_factory=list, repr=False)  # what the policy asked for, per tick
    picks: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (chunk, action) per tick; -1 held
    swaps: list[dict[str, Any]] = field(default_factory=list, repr=False)  # delay_ticks and seam_jump per swap
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.end == "success"


class _InferenceWorker:
    """Runs the policy on one observation at a time; the control thread polls for the result."""

    def __init__(self, policy: Policy, telemetry: Telemetry | None) -> None:
        self.policy, self.telemetry = policy, telemetry
        self._request: Observation | None = None
        self._prefix: CommittedPrefix | None = None
        self._result: ActionChunk | None = None
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        """Running, or holding a result not yet taken: a request submitted now would overwrite that chunk
        (or race it) with one computed from an older current chunk, wasting an inference."""
        with self._cv:
            return self._busy or self._result is not None

    def submit(self, observation: Observation, prefix: CommittedPrefix | None = None) -> None:
        with self._cv:
            self._request, self._prefix, self._busy = observation, prefix, True
            self._cv.notify()

    def take(self) -> ActionChunk | None:
        with self._cv:
            result, self._result = self._result, None
            return result

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._request is not None or self._stopping)
                if self._stopping:
                    return
                observation, self._request, prefix = self._request, None, self._prefix
            assert observation is not None
            t0 = time.monotonic()
            try:
                chunk = self.policy(observation) if prefix is None else self.policy(observation, prefix=prefix)  # type: ignore[call-arg]
            except BaseException as err:  # handed to the control thread, which stops the robot and re-raises
                with self._cv:
                    self.error, self._busy = err, False
                return
            t1 = time.monotonic()
            if self.telemetry is not None:
                self.telemetry.chunk(
                    chunk.timings or {"total": t1 - t0}, t0, t1, chunk.info, chunk.actions, chunk.timestamp
                )
            with self._cv:
                self._result, self._busy = chunk, False

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        # a stalled policy may never return; the thread is a daemon and holds no bus, so do not wait long
        self.thread.join(timeout=1.0)
        if self.thread.is_alive():
            log.warning("inference thread still busy at stop; leaving it to finish in the background")


action_index = tick_index  # which action of a chunk is meant for a time (may be past its end)


def run_episode(
    policy: Policy,
    gate: ActionGate,
    config: LoopConfig,
    telemetry: Telemetry | None = None,
    success: Callable[[], bool] | None = None,
    recorder: Recorder | None = None,
) -> EpisodeResult:
    """Drive one episode; always ends with ``gate.close()``. Re-raises policy and safety errors after stopping."""
    period = 1.0 / config.hz
    worker = _InferenceWorker(policy, telemetry)
    handoff = ChunkHandoff(config.hz)
    result = EpisodeResult(end="duration")
    current: ActionChunk | None = None
    last_obs: Observation | None = None
    start = time.monotonic()
    last_good = start  # when a chunk last had an action for the tick
    last_flush = start
    try:
        worker.submit(last_obs := gate.observe(config.task))
        tick = 0
        while True:
            deadline = start + tick * period
            _sleep_until(deadline, config.spin_s)
            if worker.error is not None:
                raise worker.error
            fresh = worker.take()
            if fresh is not None:
                current = _checked(fresh, result.chunks)
                result.chunks += 1
                swap = handoff.swap(current, deadline, result.targets[-1] if result.targets else None)
                swap["rtc"] = config.rtc and handoff.prefix is not None
                result.swaps.append(swap)
                if telemetry is not None:
                    telemetry.event(
                        "swap",
                        tick=tick,
                        chunk=result.chunks - 1,
                        delay_ms=round((deadline - fresh.timestamp) * 1e3, 3),
                        start_action=action_index(fresh, deadline, config.hz),
                        **swap,  # delay_ticks, seam_jump, sent_during_inference, rtc (runtimes/rtc.py)
                    )
            k = action_index(current, deadline, config.hz) if current is not None else 0
            target = current.actions[k] if current is not None and k < len(current) else None
            if target is not None:
                sent, held = gate.send(target), False
                handoff.sent(target)
                result.targets.append(np.asarray(target, dtype=np.float32))
                result.picks.append((result.chunks - 1, k))
                last_good = deadline
            else:
                sent, held = gate.hold(), True
                result.targets.append(np.asarray(sent, dtype=np.float32))
                result.picks.append((-1, -1))
                result.held_ticks += 1
                limit = config.stall_timeout_s if result.chunks else config.first_chunk_timeout_s
                if deadline - last_good > limit:
                    raise SafetyError(
                        f"no action for {deadline - last_good:.2f} s (inference stalled or too slow for "
                        f"{config.hz:g} Hz); held position and stopped"
                    )
            sent_at = time.monotonic()
            if telemetry is not None:
                fields = tick_fields(
                    tick=tick, chunk=result.chunks - 1, action=k, target=target, sent=sent, held=held, gate=gate,
                    now=sent_at, chunk_t=current.timestamp if current is not None else None,
                )
                telemetry.tick(deadline, sent_at, held, fields)
            result.sent.append(np.asarray(sent, dtype=np.float32))
            result.ticks += 1
            if recorder is not None and last_obs is not None:
                recorder.add(last_obs, np.asarray(sent, dtype=np.float32))
                if sent_at - last_flush >= config.record_flush_s:
                    recorder.flush()
                    last_flush = sent_at
            remaining = len(current) - k if current is not None else 0
            need = current is None or remaining <= config.swap_threshold * len(current)
            if need and not worker.busy and fresh is None:
                last_obs = gate.observe(config.task)
                prefix = handoff.request(current, last_obs.timestamp, held)
                worker.submit(last_obs, prefix if config.rtc else None)
            elif recorder is not None:
                last_obs = gate.observe(config.task)
            if success is not None and success():
                result.end = "success"
                break
            if config.duration_s is not None and sent_at - start >= config.duration_s:
                break
            # absolute deadlines: after an overrun, skip the missed ticks instead of bursting to catch up
            tick = max(tick + 1, int((time.monotonic() - start) / period) + 1)
    except KeyboardInterrupt:
        result.end = "interrupted"
        log.warning("interrupted: stopping the robot through the safety layer")
    except BaseException as err:
        result.end, result.error = "error", f"{type(err).__name__}: {err}"
        _stop(gate, worker, recorder)
        raise
    result.duration_s = time.monotonic() - start
    _stop(gate, worker, recorder)
    return result


def _checked(chunk: ActionChunk, index: int) -> ActionChunk:
    actions = np.asarray(chunk.actions)
    if actions.ndim != 2 or len(chunk) == 0 or not np.all(np.isfinite(actions)):
        raise SafetyError(f"chunk {index}: expected finite (ah, ad) actions, got shape {actions.shape}")
    return chunk


def _stop(gate: ActionGate, worker: _InferenceWorker, recorder: Recorder | None) -> None:
    try:
        gate.close()
    finally:
        worker.stop()
        if recorder is not None:
            recorder.flush()


def _sleep_until(deadline: float, spin_s: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > spin_s:
        time.sleep(remaining - spin_s)
    while time.monotonic() < deadline:
        pass


def summarize(result: EpisodeResult) -> dict[str, Any]:
    """The episode as plain values (for the CLI and telemetry)."""
    return {
        "end": result.end,
        "success": result.success,
        "ticks": result.ticks,
        "held_ticks": result.held_ticks,
        "chunks": result.chunks,
        "duration_s": round(result.duration_s, 3),
        "error": result.error,
    }
