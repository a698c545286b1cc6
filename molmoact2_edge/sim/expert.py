"""Scripted experts for the tabletop tasks, emitting absolute joint targets.

The expert is reactive: its phase is recomputed every step from what the arm and the cube
look like now (grasp-point position, measured jaw opening, cube pose), with no hidden timer.
Behaviour cloning copes badly with experts whose phase is not observable (closing the jaw for
"N steps" looks identical to waiting), so every phase switch here is visible in the state or
the images, and a perturbed arm (DART noise) is simply re-planned from where it is.

Motion: the grasp point moves toward the phase's Cartesian goal by at most ``speed`` metres per
control step (slower near the cube); top-down IK turns that into five arm joint targets.
"""

from __future__ import annotations

import numpy as np

from molmoact2_edge.sim.ik import TopDownIK
from molmoact2_edge.sim.scene import CUBE_HALF, Scene
from molmoact2_edge.sim.tasks import Task

OPEN = 70.0  # gripper command (0 closed .. 100 open): jaw wide enough for the 40 mm cube
CLOSED = 0.0
HOVER = 0.07  # grasp point above the cube centre before descending (m)
GRASP_ABOVE_CENTRE = 0.008
LIFT_Z = 0.09  # grasp point height while carrying (m); higher is out of top-down reach at the box edge
PLACE_ABOVE_TABLE = CUBE_HALF + GRASP_ABOVE_CENTRE + 0.004
XY_TOL = 0.008
Z_TOL = 0.008
# The jaw stops on a held 40 mm cube around 15-30 (gripper units); below it closed on nothing.
HELD_RANGE = (8.0, 45.0)


class ScriptedExpert:
    """``act(scene) -> (6,)`` absolute joint targets (degrees, gripper 0-100) for one task."""

    def __init__(self, task: Task, scene: Scene, speed: float = 0.025, careful_speed: float = 0.01):
        self.task = task
        self.scene = scene
        self.ik = TopDownIK(scene)
        self.speed = speed
        self.careful_speed = careful_speed

    def act(self) -> np.ndarray:
        scene = self.scene
        grasp = self.ik.grasp_point(scene.data)
        cube = scene.cube_position()
        opening = scene.joint_positions()[5]
        goal, gripper, careful = self._plan(grasp, cube, opening)
        step = goal - grasp
        limit = self.careful_speed if careful else self.speed
        norm = np.linalg.norm(step)
        if norm > limit:
            step *= limit / norm
        q_now = scene.data.qpos[scene.qpos_adr[:5]]
        q = self.ik.solve(q_now, grasp + step, self._jaw_direction(cube))
        targets = scene.to_normalized(np.append(q, 0.0))
        targets[5] = gripper
        return targets

    def _plan(self, grasp: np.ndarray, cube: np.ndarray, opening: float) -> tuple[np.ndarray, float, bool]:
        """(Cartesian goal for the grasp point, gripper command, move carefully?) for this step."""
        above = np.array([cube[0], cube[1], cube[2] + HOVER])
        at_grasp = np.array([cube[0], cube[1], cube[2] + GRASP_ABOVE_CENTRE])
        xy_err = np.linalg.norm(grasp[:2] - cube[:2])
        if self.task.name == "touch":
            top = np.array([cube[0], cube[1], cube[2] + CUBE_HALF - 0.004])
            if xy_err < 1.5 * XY_TOL:
                return top, CLOSED, True
            return above, CLOSED, False

        if self.task.name == "place" and self._placed(cube):
            if opening < OPEN - 10.0:
                return grasp, OPEN, True  # release in place
            return np.array([grasp[0], grasp[1], LIFT_Z]), OPEN, True  # then back off upwards

        held = HELD_RANGE[0] < opening < HELD_RANGE[1] and self.scene.cube_pinched()
        if held:
            if self.task.name == "lift":
                return np.array([cube[0], cube[1], LIFT_Z]), CLOSED, True
            return self._carry(grasp, cube), CLOSED, grasp[2] < LIFT_Z - 0.02

        z_err = abs(grasp[2] - at_grasp[2])
        near = xy_err < XY_TOL and z_err < Z_TOL
        # Once the jaw has started closing, a wider tolerance keeps it closing: hysteresis through the
        # (observable) jaw opening, so a perturbed arm does not let go halfway.
        closing = opening < OPEN - 5.0 and xy_err < 2 * XY_TOL and z_err < 2 * Z_TOL
        if (near or closing) and opening > HELD_RANGE[0]:
            return at_grasp, CLOSED, True  # close on the cube (keeps closing until it is held)
        if opening < OPEN - 15.0:
            # Jaw closed on nothing, or still opening: open it up away from the cube first.
            return np.array([grasp[0], grasp[1], max(grasp[2], above[2])]), OPEN, True
        if xy_err < XY_TOL * 1.5 and grasp[2] < above[2] + Z_TOL:
            return at_grasp, OPEN, True
        return above, OPEN, False

    def _carry(self, grasp: np.ndarray, cube: np.ndarray) -> np.ndarray:
        """Goal for the grasp point while holding the cube in the ``place`` task."""
        goal = self.scene.goal_position()
        to_goal = goal[:2] - cube[:2]
        if np.linalg.norm(to_goal) > XY_TOL:
            if grasp[2] < LIFT_Z - 0.02 and np.linalg.norm(to_goal) > 0.03:
                return np.array([grasp[0], grasp[1], LIFT_Z])  # lift before travelling
            return np.array([grasp[0] + to_goal[0], grasp[1] + to_goal[1], LIFT_Z])
        return np.array([grasp[0] + to_goal[0], grasp[1] + to_goal[1], PLACE_ABOVE_TABLE])

    def _placed(self, cube: np.ndarray) -> bool:
        goal = self.scene.goal_position()
        # A cube tilted in the grip rests a few mm high on an edge; it settles flat once released.
        return bool(np.linalg.norm(cube[:2] - goal[:2]) < 0.015 and cube[2] < CUBE_HALF + 0.012)

    def _jaw_direction(self, cube_pos: np.ndarray) -> np.ndarray:
        """The cube face normal (horizontal) nearest the current jaw axis, so the jaw closes on two faces."""
        scene = self.scene
        adr = scene.cube_qpos_adr
        w, _, _, z = scene.data.qpos[adr + 3 : adr + 7]
        yaw = 2.0 * np.arctan2(z, w)
        normals = [
            np.array([np.cos(yaw + k * np.pi / 2), np.sin(yaw + k * np.pi / 2), 0.0]) for k in range(4)
        ]
        jaw = self.ik.jaw_axis(scene.data)
        return max(normals, key=lambda n: float(n @ jaw))
