"""Direct (no serial bus) episode API over the simulated SO-101, for data generation and evaluation.

    env = SimEnv("lift", seed=3)
    obs = env.reset()
    while True:
        obs, success, done = env.step(env.expert_action())   # or a policy's (6,) joint targets
        if done:
            break

Actions and ``Observation.state`` are absolute joints in the SO-101's normalized units
(degrees for the five arm joints, gripper 0 closed .. 100 open), at ``control_hz`` (default
10 Hz; each step holds the targets for 1/control_hz s of physics).
"""

from __future__ import annotations

import time

import numpy as np

from molmoact2_edge.errors import SimulationError
from molmoact2_edge.sim.expert import ScriptedExpert
from molmoact2_edge.sim.scene import CAMERA_NAMES, RenderConfig, Scene
from molmoact2_edge.sim.tasks import SuccessTracker, get_task
from molmoact2_edge.types import Observation

DEFAULT_CONTROL_HZ = 10


class SimEnv:
    """One task in one scene; ``reset()`` starts the episode given by ``seed``."""

    def __init__(
        self,
        task: str,
        seed: int = 0,
        *,
        render: RenderConfig | None = None,
        cameras: tuple[str, ...] = CAMERA_NAMES,
        control_hz: float = DEFAULT_CONTROL_HZ,
        max_steps: int | None = None,
        depth_cameras: tuple[str, ...] | None = None,
    ):
        self.task = get_task(task)
        self.seed = seed
        self.scene = Scene(render)
        unknown = [c for c in (*cameras, *(depth_cameras or ())) if c not in CAMERA_NAMES]
        if unknown:
            raise SimulationError(f"unknown sim camera(s) {unknown}; cameras are {list(CAMERA_NAMES)}")
        self.cameras = tuple(cameras)
        # Depth maps (metres) in Observation.depth: these cameras, or all of them when the render
        # config asks for depth.
        if depth_cameras is None:
            depth_cameras = self.cameras if self.scene.render_config.depth else ()
        self.depth_cameras = tuple(depth_cameras)
        if not 1 <= control_hz <= 100:
            raise SimulationError(f"control_hz must be in [1, 100], got {control_hz}")
        self.control_hz = control_hz
        self.n_substeps = max(1, round(1.0 / (control_hz * self.scene.model.opt.timestep)))
        # Task caps are in 10 Hz steps; scale so an episode has the same duration at any rate.
        self.max_steps = max_steps or int(round(self.task.max_steps * control_hz / DEFAULT_CONTROL_HZ))
        self._expert: ScriptedExpert | None = None
        self._success: SuccessTracker | None = None
        self.steps = 0
        self._streak = 0

    @property
    def instruction(self) -> str:
        return self.task.instruction

    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self.seed = seed
        self.scene.reset(self.seed)
        self._success = SuccessTracker(self.task, self.scene)
        self.steps = 0
        self._streak = 0
        return self.observe()

    def expert_action(self) -> np.ndarray:
        """(6,) the scripted expert's joint targets for the current state."""
        if self._expert is None:
            self._expert = ScriptedExpert(self.task, self.scene)
        return self._expert.act()

    def step(self, action: np.ndarray) -> tuple[Observation, bool, bool]:
        """Hold ``action`` (6,) for one control period; returns (observation, success, done)."""
        if self._success is None:
            raise SimulationError("SimEnv.step() called before reset()")
        self.scene.set_targets(action)
        self.scene.step(self.n_substeps)
        self.steps += 1
        success = self._success()
        self._streak = self._streak + 1 if success else 0
        done = self._streak >= self.task.hold_steps or self.steps >= self.max_steps
        return self.observe(), success, done

    def observe(self) -> Observation:
        images = {cam: self.scene.render(cam) for cam in self.cameras}
        depth = {cam: self.scene.render_depth(cam) for cam in self.depth_cameras} or None
        return Observation(
            images=images,
            state=self.scene.joint_positions().astype(np.float32),
            task=self.task.instruction,
            timestamp=time.monotonic(),
            depth=depth,
        )

    def close(self) -> None:
        self.scene.close()

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
