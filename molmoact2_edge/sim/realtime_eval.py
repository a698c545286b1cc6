"""Closed-loop evaluation in real time: the control loop, the safety layer and an inference thread on ``SimEnv``.

``molmo-edge eval --inject-latency-ms MS --rtc MODE`` runs this instead of the open-loop
``training/evaluation.py`` protocol. Each episode runs the device's control loop
(``runtimes/control.run_episode``) at the sim's control rate against wall-clock deadlines; every
tick sends one target through the real ``SafetyLayer`` to ``SimEnvRobot``, which advances the
physics by exactly one control period per command (so simulated time and loop ticks agree).
Inference runs on the loop's inference thread and sleeps ``latency_ms`` after every ``act`` (a real
sleep: the loop sees the real delay, the chunk keeps its observation's timestamp).

``clock="virtual"`` replaces wall-clock time by tick counting, for benchmarks on a machine too
slow or too loaded to run the policy in real time: inference is called synchronously and its chunk
takes over ``floor(latency * hz) + 1`` ticks after its observation (the latency is then the whole
inference delay, compute included), exactly as the real loop would see it; the prefix, delay and
swap bookkeeping are the loop's own (``runtimes/rtc.ChunkHandoff``) and every tick still goes
through the safety layer. ``run_virtual_episode`` mirrors ``run_episode``'s tick body for that.

Per episode it keeps the loop's per-tick picks and targets; ``seam_statistics`` splits the largest
arm-joint change between consecutive ticks into seam jumps (the chunk changed) and within-chunk
steps, in degrees (the gripper, in 0-100 units, is left out). Flow noise of chunk j in episode k is
seeded ``(seed + k) * 1000 + j`` as in the open-loop protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from molmoact2_edge.hardware.robots.base import JointLimits, Robot
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
from molmoact2_edge.rtc import CommittedPrefix
from molmoact2_edge.runtimes.control import EpisodeResult, LoopConfig, run_episode
from molmoact2_edge.runtimes.rtc import ChunkHandoff, seam_statistics, tick_index
from molmoact2_edge.runtimes.telemetry import percentiles
from molmoact2_edge.sim.env import SimEnv
from molmoact2_edge.sim.scene import CAMERA_NAMES, JOINT_NAMES, RenderConfig
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)

ARM_JOINTS = slice(0, len(JOINT_NAMES) - 1)  # degrees; the last joint is the gripper (0-100)
SO101_MAX_STEP = (3.0, 5.0)  # the SO-101 driver's default per-tick step at 30 Hz: arm degrees, gripper units


class PrefixPolicy(Protocol):
    def act(
        self, observation: Observation, seed: int | None = None, noise: Any = None, prefix: CommittedPrefix | None = None
    ) -> ActionChunk: ...

    def reset(self) -> None: ...


class SimEnvRobot(Robot):
    """``SimEnv`` as a ``Robot`` for the safety layer: each command holds for one control period of physics."""

    name = "sim-so101-env"
    joint_names = JOINT_NAMES

    def __init__(self, env: SimEnv, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.env, self.clock = env, clock
        self.streak = 0
        self.finished = False
        self._observation = env.observe()

    def _connect_bus(self) -> None:
        """No bus: the physics is in-process."""

    def _disconnect_bus(self, disable_torque: bool) -> None:
        """Nothing to release."""

    def read_state(self) -> np.ndarray:
        return self.env.scene.joint_positions().astype(np.float32)

    def _write_targets(self, target: np.ndarray) -> np.ndarray:
        self._observation, success, done = self.env.step(target)
        self.streak = self.streak + 1 if success else 0
        self.finished = self.finished or done
        return self.env.scene.joint_targets().astype(np.float32)

    def set_torque(self, enabled: bool) -> None:
        """The simulated servos are always on."""

    def check_faults(self) -> None:
        """Simulated servos do not fault."""

    def limits(self) -> JointLimits:
        rad = self.env.scene.joint_range
        lower, upper = np.rad2deg(rad[:, 0]).astype(np.float32), np.rad2deg(rad[:, 1]).astype(np.float32)
        lower[-1], upper[-1] = 0.0, 100.0  # gripper in 0-100 units
        step = np.array([SO101_MAX_STEP[0]] * (len(JOINT_NAMES) - 1) + [SO101_MAX_STEP[1]], np.float32)
        return JointLimits(JOINT_NAMES, lower, upper, step, control_hz=30.0)

    def get_observation(self, task: str, max_camera_age_ms: float | None = None) -> Observation:
        """The frame rendered after the last physics step, stamped now (when the loop reads it)."""
        obs = self._observation
        return Observation(images=obs.images, state=obs.state, task=task, timestamp=self.clock())

    def episode_over(self) -> bool:
        """The env's success hold or its step cap was reached (the loop's ``success`` callback)."""
        return self.finished

    @property
    def succeeded(self) -> bool:
        return self.streak >= self.env.task.hold_steps


class DelayedPolicy:
    """``policy.act`` on the inference thread plus a real ``latency_s`` sleep; seeds each chunk's noise."""

    def __init__(self, policy: PrefixPolicy, latency_s: float, episode_seed: int) -> None:
        self.policy, self.latency_s, self.episode_seed = policy, latency_s, episode_seed
        self.calls = 0

    def __call__(self, observation: Observation, prefix: CommittedPrefix | None = None) -> ActionChunk:
        chunk = self.policy.act(observation, seed=self.episode_seed * 1000 + self.calls, prefix=prefix)
        self.calls += 1
        time.sleep(self.latency_s)
        return chunk


class VirtualClock:
    """Tick-counted time: ``now()`` is the current tick's deadline plus a hair (an observation follows its send)."""

    def __init__(self, hz: float) -> None:
        self.hz, self.tick = hz, 0

    def now(self) -> float:
        return self.tick / self.hz + 1e-6


def run_virtual_episode(
    policy: Callable[..., ActionChunk],
    gate: SafetyLayer,
    robot: SimEnvRobot,
    clock: VirtualClock,
    config: LoopConfig,
    latency_s: float,
) -> EpisodeResult:
    """``run_episode`` on tick-counted time (see the module docstring), until ``robot.episode_over()``."""
    handoff = ChunkHandoff(config.hz)
    result = EpisodeResult(end="success")
    current: ActionChunk | None = None
    pending: tuple[int, ActionChunk] | None = None  # (tick it takes over at, chunk)
    held = False
    lag = int(np.floor(latency_s * config.hz + 1e-9)) + 1
    while not robot.episode_over():
        deadline = clock.tick / config.hz
        if pending is not None and clock.tick >= pending[0]:
            current, pending = pending[1], None
            result.chunks += 1
            result.swaps.append(handoff.swap(current, deadline, result.targets[-1] if result.targets else None))
        k = tick_index(current, deadline, config.hz) if current is not None else 0
        if current is not None and k < len(current):
            gate.send(current.actions[k])
            handoff.sent(current.actions[k])
            result.targets.append(np.asarray(current.actions[k], np.float32))
            result.picks.append((result.chunks - 1, k))
            held = False
        else:
            result.targets.append(np.asarray(gate.hold(), np.float32))
            result.picks.append((-1, -1))
            result.held_ticks += 1
            held = True
        result.ticks += 1
        remaining = len(current) - k if current is not None else 0
        if pending is None and (current is None or remaining <= config.swap_threshold * len(current)):
            observation = gate.observe(config.task)
            prefix = handoff.request(current, observation.timestamp, held)
            chunk = policy(observation, prefix=prefix if config.rtc else None)
            pending = (clock.tick + lag, chunk)
        clock.tick += 1
    return result


@dataclass
class RealtimeEpisode:
    seed: int
    success: bool
    ticks: int
    held_ticks: int
    chunks: int
    safety_clips: int
    delays: list[int] = field(default_factory=list)
    seams: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)


@dataclass
class RealtimeEval:
    task: str
    latency_ms: float
    rtc: bool
    hz: float
    clock: str
    episodes: list[RealtimeEpisode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        eps = self.episodes
        seams = [s for e in eps for s in e.seams]
        steps = [s for e in eps for s in e.steps]
        return {
            "task": self.task,
            "episodes": len(eps),
            "successes": sum(e.success for e in eps),
            "success_rate": sum(e.success for e in eps) / max(1, len(eps)),
            "seam_jump_p99_deg": float(np.percentile(seams, 99)) if seams else None,
            "within_chunk_step_p99_deg": float(np.percentile(steps, 99)) if steps else None,
            "safety_clips_per_episode": float(np.mean([e.safety_clips for e in eps])) if eps else 0.0,
            "inject_latency_ms": self.latency_ms,
            "control_hz": self.hz,
            "clock": self.clock,
            "rtc_prefix": self.rtc,
            "delay_ticks": percentiles([d for e in eps for d in e.delays]),
            "held_ticks_per_episode": float(np.mean([e.held_ticks for e in eps])) if eps else 0.0,
            "per_episode": [
                {k: v for k, v in vars(e).items() if k not in ("seams", "steps", "delays")} for e in eps
            ],
        }


def evaluate_realtime(
    policy: PrefixPolicy,
    task: str,
    episodes: int,
    *,
    seed: int = 100_000,
    latency_ms: float = 0.0,
    rtc: bool = True,
    image_size: int = 112,
    first_chunk_timeout_s: float = 30.0,
    cameras: tuple[str, ...] | None = None,
    swap_threshold: float = 0.5,
    clock: str = "wall",
) -> RealtimeEval:
    """``episodes`` real-time episodes of ``task`` at the sim's control rate; rtc: hand the policy the prefix.

    cameras: render only these (the policy's; rendering every camera each tick costs loop time).
    swap_threshold: the loop's (ask for the next chunk at this fraction left); clock: ``wall`` | ``virtual``.
    """
    if clock not in ("wall", "virtual"):
        raise ValueError(f"clock must be 'wall' or 'virtual', got {clock!r}")
    result = RealtimeEval(task, latency_ms, rtc, 0.0, clock)
    render = RenderConfig(width=image_size, height=image_size, depth=False)
    with SimEnv(task, render=render, cameras=cameras or CAMERA_NAMES) as env:
        hz = float(env.control_hz)
        result.hz = hz
        for k in range(episodes):
            env.reset(seed + k)
            policy.reset()
            ticks = VirtualClock(hz)
            robot = SimEnvRobot(env, ticks.now if clock == "virtual" else time.monotonic)
            robot.connect()
            config = LoopConfig(
                env.instruction,
                hz=hz,
                duration_s=env.max_steps / hz + 1.0,  # the env's step cap ends it first; this bounds a stall
                stall_timeout_s=10.0,  # a simulated arm holding still is harmless; a busy CPU is not a failure
                first_chunk_timeout_s=first_chunk_timeout_s,
                rtc=rtc,
                swap_threshold=swap_threshold,
            )
            safety = SafetyConfig(control_hz=hz, watchdog_thread=False, handle_signals=False, heartbeat_s=0.0)
            with SafetyLayer(robot, safety) as layer:
                if clock == "virtual":
                    act = DelayedPolicy(policy, 0.0, seed + k)  # the latency is counted in ticks, not slept
                    loop = run_virtual_episode(act, layer, robot, ticks, config, latency_ms / 1e3)
                else:
                    loop = run_episode(DelayedPolicy(policy, latency_ms / 1e3, seed + k), layer, config,
                                       success=robot.episode_over)  # fmt: skip
                clips = layer.counts["clipped_step"]
            seams, steps = seam_statistics(loop.picks, loop.targets, ARM_JOINTS)
            episode = RealtimeEpisode(
                seed + k, robot.succeeded, loop.ticks, loop.held_ticks, loop.chunks, clips,
                [int(s["delay_ticks"]) for s in loop.swaps], seams, steps,
            )  # fmt: skip
            result.episodes.append(episode)
            log.info("episode %d (seed %d): success %s, %d clips, delays %s", k, seed + k, episode.success,
                     clips, episode.delays)  # fmt: skip
    return result
