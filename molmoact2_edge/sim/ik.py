"""Damped least-squares inverse kinematics for the SO-101's five arm joints.

The task is the grasp point (midway between the fingertip pads at a 40 mm jaw opening) at a
Cartesian target, the jaws pointing straight down, and the jaw-closing axis along a given
horizontal direction. Five joints cannot meet all six constraints exactly; the orientation
rows are down-weighted so position wins (after the Levenberg-Marquardt solver of
lerobot-env-so101's ``ik_control.py``, re-derived here rather than copied).
"""

from __future__ import annotations

import mujoco
import numpy as np

from molmoact2_edge.sim.scene import JAW_PADS, Scene

DOWN = np.array([0.0, 0.0, -1.0])
# Jaw angle (radians) at which the pads are parallel and 40 mm apart (from the MJCF comment).
GRASP_JAW_ANGLE = 0.46
# Metres of position error traded against one radian of approach-axis / jaw-axis error.
APPROACH_WEIGHT = 0.05
JAW_WEIGHT = 0.05
# Axes of the gripperframe site: x runs out along the jaws, z from the fixed to the moving jaw.
APPROACH_AXIS = 0
JAW_AXIS = 2


def grasp_point_offset(scene: Scene) -> np.ndarray:
    """(3,) midpoint of the two pads at GRASP_JAW_ANGLE, in the gripperframe site's frame."""
    m = scene.model
    data = mujoco.MjData(m)
    data.qpos[scene.qpos_adr[5]] = GRASP_JAW_ANGLE
    mujoco.mj_forward(m, data)
    mid = np.mean([data.geom_xpos[m.geom(n).id] for n in JAW_PADS], axis=0)
    site = scene.ee_site
    return data.site_xmat[site].reshape(3, 3).T @ (mid - data.site_xpos[site])


class TopDownIK:
    """Solve arm joint angles (radians) for a top-down grasp pose; works on a scratch MjData."""

    def __init__(self, scene: Scene, iterations: int = 30, damping: float = 1e-3):
        self.scene = scene
        self.offset = grasp_point_offset(scene)
        self.iterations = iterations
        self.damping = damping
        self._data = mujoco.MjData(scene.model)
        self._arm_dofs = scene.dof_adr[:5]
        self._arm_qpos = scene.qpos_adr[:5]
        self._limits = scene.joint_range[:5]

    def grasp_point(self, data: mujoco.MjData) -> np.ndarray:
        site = self.scene.ee_site
        return data.site_xpos[site] + data.site_xmat[site].reshape(3, 3) @ self.offset

    def jaw_axis(self, data: mujoco.MjData) -> np.ndarray:
        return data.site_xmat[self.scene.ee_site].reshape(3, 3)[:, JAW_AXIS].copy()

    def solve(self, q_seed: np.ndarray, target: np.ndarray, jaw_dir: np.ndarray) -> np.ndarray:
        """(5,) arm joint radians placing the grasp point at ``target`` (3,) top-down, jaw along ``jaw_dir``."""
        m, d = self.scene.model, self._data
        d.qpos[:] = self.scene.data.qpos
        q = np.array(q_seed, dtype=np.float64)
        jac_p = np.zeros((3, m.nv))
        jac_r = np.zeros((3, m.nv))
        site = self.scene.ee_site
        for _ in range(self.iterations):
            d.qpos[self._arm_qpos] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            rot = d.site_xmat[site].reshape(3, 3)
            point = self.grasp_point(d)
            approach, jaw = rot[:, APPROACH_AXIS], rot[:, JAW_AXIS]
            # Rotation vectors (small-angle) turning each axis onto its wanted direction.
            err = np.concatenate(
                [
                    target - point,
                    APPROACH_WEIGHT * np.cross(approach, DOWN),
                    JAW_WEIGHT * np.cross(jaw, jaw_dir),
                ]
            )
            if np.linalg.norm(err[:3]) < 2e-4 and np.linalg.norm(err[3:]) < 2e-4:
                break
            mujoco.mj_jac(m, d, jac_p, jac_r, point, m.site_bodyid[site])
            jr = jac_r[:, self._arm_dofs]
            jac = np.vstack([jac_p[:, self._arm_dofs], APPROACH_WEIGHT * jr, JAW_WEIGHT * jr])
            dq = np.linalg.solve(jac.T @ jac + self.damping * np.eye(5), jac.T @ err)
            q = np.clip(q + dq, self._limits[:, 0], self._limits[:, 1])
        return q
