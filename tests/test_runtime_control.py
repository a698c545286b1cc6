"""Control loop: chunk swap without stall, timestamp alignment, watchdog hold on a stalled policy, Ctrl-C safe stop."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from molmoact2_edge.errors import SafetyError
from molmoact2_edge.runtimes.control import LoopConfig, action_index, run_episode
from molmoact2_edge.runtimes.telemetry import Telemetry
from molmoact2_edge.types import ActionChunk, Observation

HZ = 50.0


class LogGate:
    """Records what the loop sent, with the time it went out (stands in for safety + robot)."""

    def __init__(self, dim: int = 2) -> None:
        self.dim = dim
        self.sent: list[tuple[float, np.ndarray, bool]] = []
        self.observed: list[float] = []
        self.stopped = 0
        self.last = np.zeros(dim, np.float32)

    def observe(self, task: str) -> Observation:
        t = time.monotonic()
        self.observed.append(t)
        return Observation(images={}, state=self.last.copy(), task=task, timestamp=t)

    def send(self, target: np.ndarray) -> np.ndarray:
        self.last = np.asarray(target, np.float32)
        self.sent.append((time.monotonic(), self.last, False))
        return self.last

    def hold(self) -> np.ndarray:
        self.sent.append((time.monotonic(), self.last, True))
        return self.last

    def close(self) -> None:
        self.stopped += 1


class TimeRampPolicy:
    """Action k of a chunk encodes the time it is meant for: obs.timestamp + k / HZ (so alignment is checkable)."""

    def __init__(self, latency_s: float, length: int = 10, stall_after: int | None = None) -> None:
        self.latency_s, self.length, self.stall_after = latency_s, length, stall_after
        self.calls = 0
        self.release = threading.Event()

    def __call__(self, obs: Observation) -> ActionChunk:
        self.calls += 1
        if self.stall_after is not None and self.calls > self.stall_after:
            self.release.wait(10)
        time.sleep(self.latency_s)
        meant = obs.timestamp + np.arange(self.length) / HZ
        actions = np.stack([meant, np.full(self.length, self.calls)], axis=1).astype(np.float64)
        return ActionChunk(
            actions=actions,
            timestamp=obs.timestamp,
            timings={"flow": self.latency_s, "total": self.latency_s},
        )


def test_action_index_follows_elapsed_time() -> None:
    chunk = ActionChunk(actions=np.zeros((10, 2), np.float32), timestamp=100.0)
    assert action_index(chunk, 100.0, 30) == 0
    assert action_index(chunk, 100.0 + 4 / 30, 30) == 4
    assert action_index(chunk, 99.0, 30) == 0


def test_chunks_swap_without_stall_and_actions_align_to_their_time(tmp_path) -> None:
    policy = TimeRampPolicy(latency_s=0.06)  # 3 ticks of latency at 50 Hz, chunk of 10 ticks
    gate = LogGate()
    telemetry = Telemetry(tmp_path / "t.jsonl", control_hz=HZ)
    result = run_episode(
        policy, gate, LoopConfig(task="t", hz=HZ, duration_s=1.0, swap_threshold=0.6), telemetry
    )
    assert result.end == "duration" and gate.stopped == 1
    assert result.chunks >= 5
    first_action = next(i for i, (_, _, held) in enumerate(gate.sent) if not held)
    # only the ticks before the very first chunk exists are held; no hold at any chunk boundary after that
    assert not any(held for _, _, held in gate.sent[first_action:])
    assert 1 <= result.held_ticks == first_action <= 6
    # every action sent was the one meant for (about) the moment it went out: aligned, not replayed from k=0
    errors = [abs(t - a[0]) for t, a, held in gate.sent[first_action:]]
    assert max(errors) < 1.5 / HZ, max(errors)
    # chunks were replaced mid-way (several distinct chunk ids used) and the first action of a chunk was skipped
    used = [int(a[1]) for _, a, held in gate.sent[first_action:]]
    assert len(set(used)) >= 4
    summary = telemetry.close()
    # telemetry counts chunks computed; one may finish after the episode ended and never be used
    assert result.chunks <= summary["chunks"] <= result.chunks + 1 and summary["stages_ms"]["flow"][
        "p50"
    ] == pytest.approx(60.0)
    assert summary["loop"]["held"] == result.held_ticks


def test_stalled_inference_holds_then_stops_with_safety_error() -> None:
    policy = TimeRampPolicy(latency_s=0.01, stall_after=1)
    gate = LogGate()
    config = LoopConfig(task="t", hz=HZ, stall_timeout_s=0.3, duration_s=5.0)
    with pytest.raises(SafetyError, match="inference stalled"):
        run_episode(policy, gate, config)
    policy.release.set()
    held = [a for _, a, h in gate.sent if h]
    moving = [a for _, a, h in gate.sent if not h]
    assert len(held) >= 0.3 * HZ - 2 and gate.stopped == 1
    # the hold repeats the last commanded target exactly: no jump
    assert all(np.array_equal(h, moving[-1]) for h in held[-5:])


def test_policy_error_stops_the_robot_and_propagates() -> None:
    def broken(obs: Observation) -> ActionChunk:
        raise RuntimeError("graph exploded")

    gate = LogGate()
    with pytest.raises(RuntimeError, match="graph exploded"):
        run_episode(broken, gate, LoopConfig(task="t", hz=HZ, duration_s=2.0))
    assert gate.stopped == 1


def test_ctrl_c_stops_safely() -> None:
    gate = LogGate()
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    result = run_episode(TimeRampPolicy(latency_s=0.02), gate, LoopConfig(task="t", hz=HZ, duration_s=5.0))
    timer.join()
    assert result.end == "interrupted" and gate.stopped == 1
    assert 0.2 < result.duration_s < 1.0


def test_success_callback_ends_the_episode() -> None:
    gate = LogGate()
    result = run_episode(
        TimeRampPolicy(latency_s=0.01),
        gate,
        LoopConfig(task="t", hz=HZ, duration_s=5.0),
        success=lambda: len(gate.sent) >= 20,
    )
    assert result.success and result.ticks == 20


def test_loop_through_the_real_safety_layer_on_an_emulated_so101() -> None:
    """A policy asking for a 40-degree jump reaches the servos as rate-limited steps inside the envelope."""
    from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
    from tests._hardware_helpers import emulated_so101, goal_writes

    def far_policy(obs: Observation) -> ActionChunk:
        target = obs.state + np.array([40, 0, 0, 0, 0, 0], np.float32)
        return ActionChunk(actions=np.tile(target, (15, 1)), timestamp=obs.timestamp, timings={"total": 0.0})

    with emulated_so101() as (robot, emu):
        robot.connect()
        emu.write_log.clear()
        config = SafetyConfig(max_step=2.0, handle_signals=False)
        with SafetyLayer(robot, config) as layer:
            result = run_episode(far_policy, layer, LoopConfig(task="t", hz=30, duration_s=0.8))
        robot.disconnect()
        goals = goal_writes(emu, at_least=6 * result.ticks)
    pan = goals[0::6]  # sync writes carry the six joints in id order; shoulder_pan is id 1
    steps = np.abs(np.diff(pan))
    assert result.end == "duration" and result.chunks >= 1
    assert max(steps) <= 2.0 * 4096 / 360 + 1  # 2 degrees per tick, in servo steps (+1 for rounding)
    assert min(goals) >= 1000 and max(goals) <= 3000  # the calibrated envelope
    assert pan[-1] > pan[0] + 100  # it did move towards the target
