"""Tabletop tasks: language instruction, episode length and success signal.

Each success check reads only simulator state, so evaluation and data generation agree:
- ``touch``: any arm geom touches the cube.
- ``lift``: the cube is held (touching the arm) with its centre at least LIFT_HEIGHT above rest.
- ``place``: the cube rests within PLACE_RADIUS of the goal marker's centre, released
  (jaw opened past half, nothing touching it, not moving), after having been lifted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from molmoact2_edge.errors import SimulationError
from molmoact2_edge.sim.scene import CUBE_HALF, Scene

LIFT_HEIGHT = 0.05
PLACE_RADIUS = 0.03
CARRY_HEIGHT = 0.03  # rise that counts as carried for ``place`` (pushing along the table does not)


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    max_steps: int  # episode cap in control steps at the default 10 Hz
    hold_steps: int = 3  # consecutive successful steps that end an episode


TASKS: dict[str, Task] = {
    "touch": Task("touch", "touch the red cube", max_steps=60),
    "lift": Task("lift", "pick up the red cube and lift it", max_steps=100),
    "place": Task("place", "put the red cube on the green target", max_steps=160),
}


def get_task(name: str) -> Task:
    """The task named ``name``; a typo gets a did-you-mean."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SimulationError(f"unknown sim task '{name}'; tasks are {sorted(TASKS)}.{hint}")
    return TASKS[name]


class SuccessTracker:
    """Evaluates a task's success signal step by step (``place`` remembers that the cube was lifted)."""

    def __init__(self, task: Task, scene: Scene):
        self.task = task
        self.scene = scene
        self.was_lifted = False

    def __call__(self) -> bool:
        scene = self.scene
        cube = scene.cube_position()
        self.was_lifted = self.was_lifted or cube[2] > CUBE_HALF + CARRY_HEIGHT
        if self.task.name == "touch":
            return scene.robot_touches_cube()
        if self.task.name == "lift":
            return bool(cube[2] > CUBE_HALF + LIFT_HEIGHT and scene.robot_touches_cube())
        on_goal = np.linalg.norm(cube[:2] - scene.goal_position()[:2]) < PLACE_RADIUS
        resting = cube[2] < CUBE_HALF + 0.005 and scene.cube_speed() < 0.01
        released = scene.joint_positions()[5] > 50.0 and not scene.robot_touches_cube()
        return bool(self.was_lifted and on_goal and resting and released)
