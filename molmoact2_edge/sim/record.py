"""Record scripted-expert demonstrations as a LeRobotDataset v3.0.

DART-style noise injection (Laskey et al. 2017): with ``noise > 0`` the arm *executes* the
expert's action plus Gaussian noise (``noise`` degrees on arm joints, 0 on the gripper), but the
dataset records the expert's *clean* action as the label, so a cloned policy sees states off the
expert's path and what the expert does to recover from them. Episodes that fail are dropped
(and counted), so every stored episode ends in success.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmoact2_edge.data.lerobot_format import DEPTH_PREFIX, so101_features
from molmoact2_edge.data.video import pick_codec
from molmoact2_edge.data.writer import LeRobotWriter
from molmoact2_edge.errors import SimulationError
from molmoact2_edge.sim.env import DEFAULT_CONTROL_HZ, SimEnv
from molmoact2_edge.sim.scene import CAMERA_NAMES, RenderConfig

logger = logging.getLogger(__name__)


@dataclass
class RecordReport:
    saved: int
    attempted: int
    frames: int
    seconds: float


def record_demos(
    out: Path,
    tasks: list[str],
    episodes: int,
    *,
    seed: int = 0,
    noise: float = 0.0,
    control_hz: int = DEFAULT_CONTROL_HZ,
    size: int = 128,
    cameras: tuple[str, ...] = CAMERA_NAMES,
    codec: str | None = None,
    depth_cameras: tuple[str, ...] = (),
    max_attempts_factor: int = 3,
    progress: Callable[[int], None] | None = None,
) -> RecordReport:
    """Write ``episodes`` successful demos (tasks cycled in order) to ``out``; seeds count up from ``seed``."""
    import time

    if episodes < 1:
        raise SimulationError(f"--episodes must be >= 1, got {episodes}")
    codec = pick_codec(codec)
    missing = [c for c in depth_cameras if c not in cameras]
    if missing:
        raise SimulationError(f"depth camera(s) {missing} are not recorded cameras {list(cameras)}")
    features = so101_features({cam: (size, size) for cam in cameras}, control_hz, codec, depth_cameras)
    writer = LeRobotWriter(out, fps=control_hz, features=features, joint_frame="lerobot", codec=codec)
    render = RenderConfig(width=size, height=size)
    envs = {
        name: SimEnv(name, render=render, cameras=cameras, control_hz=control_hz, depth_cameras=depth_cameras)
        for name in tasks
    }
    rng = np.random.default_rng(seed)
    saved = attempted = frames = 0
    start = time.perf_counter()
    try:
        while saved < episodes:
            if attempted >= max_attempts_factor * episodes:
                raise SimulationError(
                    f"only {saved}/{episodes} demos succeeded after {attempted} attempts; lower --noise"
                )
            env = envs[tasks[saved % len(tasks)]]
            ok, n = _record_episode(env, writer, seed + attempted, noise, rng)
            attempted += 1
            if ok:
                writer.save_episode()
                saved += 1
                frames += n
                if progress:
                    progress(1)
            else:
                writer.discard_episode()
                logger.info("seed %d of task %s failed; episode dropped", seed + attempted - 1, env.task.name)
        writer.finalize()
    finally:
        for env in envs.values():
            env.close()
    return RecordReport(saved, attempted, frames, time.perf_counter() - start)


def _record_episode(
    env: SimEnv, writer: LeRobotWriter, seed: int, noise: float, rng: np.random.Generator
) -> tuple[bool, int]:
    obs = env.reset(seed)
    success = False
    steps = 0
    while True:
        action = env.expert_action()
        frame = {"observation.state": obs.state, "action": action.astype(np.float32)}
        for cam in env.cameras:
            frame[f"observation.images.{cam}"] = obs.images[cam]
        for cam in env.depth_cameras:
            frame[DEPTH_PREFIX + cam] = obs.depth[cam]  # type: ignore[index]
        writer.add_frame(frame, env.instruction)
        executed = action.copy()
        if noise > 0:
            executed[:5] += rng.normal(0.0, noise, size=5)
        obs, succeeded, done = env.step(executed)
        success = success or succeeded
        steps += 1
        if done:
            return success, steps
