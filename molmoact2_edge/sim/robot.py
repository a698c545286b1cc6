"""The simulated SO-101 behind the real Feetech driver: ``SimSO101`` and the ``sim-so101`` factory.

    handle = make_sim_so101("lift", seed=0)      # emulator on a pty + physics thread + SO101 robot
    with handle:
        obs = handle.robot.get_observation(handle.instruction)
        handle.robot.send_action(obs.state)       # the FeetechBus -> pty -> emulator -> MuJoCo
        handle.success()

``SimSO101Robot`` is the same robot as a ``make_robot("sim-so101", task=..., seed=...)`` kind.

The arm's six servos are a ``FeetechEmulator`` (``follow_goal=False``); the physics loop copies
each servo's Goal_Position (raw steps) to the MuJoCo actuator targets and each MuJoCo joint
position back to Present_Position. Raw steps and joint angles are related through a LeRobot
calibration (``sim_calibration()``) using the same ``normalize``/``unnormalize`` as the SO101
robot class, so the normalized units the runtime sees are exactly the sim's units (degrees
for the arm, 0-100 for the gripper). Torque off on a servo zeroes its actuator gain (limp).

Cameras are ``SimCamera``s (the ``Camera`` interface): the physics thread renders every camera
at its fps and ``read_latest()`` returns the newest frame, like a live camera. GL contexts are
thread-bound, which is why rendering happens on the physics thread and not in the caller's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from molmoact2_edge.errors import CameraError, SimulationError
from molmoact2_edge.hardware.calibration import MotorCalibration, NormMode, normalize, unnormalize
from molmoact2_edge.hardware.cameras import Camera, Frame
from molmoact2_edge.hardware.robots.so101 import SO101
from molmoact2_edge.sim.env import DEFAULT_CONTROL_HZ
from molmoact2_edge.sim.scene import CAMERA_NAMES, JOINT_NAMES, RenderConfig, Scene
from molmoact2_edge.sim.tasks import SuccessTracker, get_task

logger = logging.getLogger(__name__)

RESOLUTION = 4096
MOTOR_IDS = tuple(range(1, len(JOINT_NAMES) + 1))  # LeRobot's SO-101 ids, shoulder_pan = 1
SIM_BUS_TIMEOUT_S = 0.1
NORM_MODES = tuple(NormMode.RANGE_0_100 if n == "gripper" else NormMode.DEGREES for n in JOINT_NAMES)


def sim_calibration(scene: Scene) -> dict[str, MotorCalibration]:
    """A LeRobot calibration of the simulated arm: mid-range at step 2048, ranges from the MJCF limits.

    Arm joints: DEGREES maps (raw - mid) * 360/4095, so the range is symmetric about 2048 and
    wide enough for the joint's limits; wrist_roll is a full-turn joint (0..4095), as LeRobot
    calibrates it. Gripper: RANGE_0_100 maps range_min..range_max linearly onto 0..100, which the
    sim maps onto the jaw's joint range.
    """
    calibration = {}
    for k, name in enumerate(JOINT_NAMES):
        lo_rad, hi_rad = scene.joint_range[k]
        if name == "wrist_roll":
            lo, hi = 0, RESOLUTION - 1
        elif name == "gripper":
            lo, hi = (
                2048 + round(lo_rad * RESOLUTION / (2 * np.pi)),
                2048 + round(hi_rad * RESOLUTION / (2 * np.pi)),
            )
        else:
            half = int(np.ceil(max(abs(lo_rad), abs(hi_rad)) * (RESOLUTION - 1) / (2 * np.pi)))
            lo, hi = 2048 - half, 2048 + half
        calibration[name] = MotorCalibration(
            id=MOTOR_IDS[k], drive_mode=0, homing_offset=0, range_min=lo, range_max=hi
        )
    return calibration


class SimCamera(Camera):
    """A MuJoCo camera; frames are rendered by the ``SimSO101`` physics thread at ``fps``."""

    def __init__(self, name: str, sim: SimSO101, width: int, height: int, fps: float):
        super().__init__(name, width, height, fps)
        self._sim = sim
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self._connected = True
        self._sim.wait_first_frame(self.name)

    def disconnect(self) -> None:
        self._connected = False

    def read_latest(self, max_age_ms: float | None = None) -> Frame:
        if not self._connected:
            raise CameraError(f"sim camera '{self.name}' is not connected; call connect() first")
        frame = self._sim.latest_frame(self.name)
        if frame is None:
            raise CameraError(f"sim camera '{self.name}' has no frame yet; is the simulation running?")
        return self._check_age(frame, max_age_ms)


class SimSO101:
    """MuJoCo SO-101 whose servos are served by a Feetech emulator on a pty.

    Args:
        task: the task whose scene and success signal to use (``touch``, ``lift``, ``place``).
        seed: the episode seed (cube and goal placement, arm start pose).
        render: camera resolution; cameras: which sim cameras to render; camera_fps: render rate.
        physics_hz: how often the loop syncs the emulator and steps physics (real-time pacing).
    """

    def __init__(
        self,
        task: str = "lift",
        seed: int = 0,
        *,
        render: RenderConfig | None = None,
        cameras: tuple[str, ...] = CAMERA_NAMES,
        camera_fps: float = DEFAULT_CONTROL_HZ,
        physics_hz: float = 50.0,
    ):
        from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator

        self.task = get_task(task)
        self.seed = seed
        self.render_config = render or RenderConfig()
        self.camera_names = tuple(cameras)
        self.camera_fps = camera_fps
        self.scene: Scene | None = None  # built on the physics thread (GL contexts are thread-bound)
        self.emulator = FeetechEmulator(list(MOTOR_IDS), follow_goal=False)
        self.physics_hz = physics_hz
        self._lock = threading.Lock()
        self._frames: dict[str, Frame] = {}
        self._frame_count = 0
        self._first_frame = threading.Event()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._success: SuccessTracker | None = None
        self._succeeded = False
        self.calibration: dict[str, MotorCalibration] = {}
        self._torque_gain = np.zeros(len(JOINT_NAMES))

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> str:
        """Start the emulator and the physics thread; returns the serial port path."""
        port = self.emulator.start()
        self._thread = threading.Thread(target=self._run, name=f"SimSO101:{port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30.0):
            self.stop()
            raise SimulationError("the simulation thread did not start within 30 s")
        if self._error is not None:
            self.stop()
            raise SimulationError(f"the simulation thread failed to start: {self._error}") from self._error
        return port

    def stop(self) -> None:
        """Stop physics and the emulator; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.emulator.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def cameras(self) -> dict[str, SimCamera]:
        w, h = self.render_config.width, self.render_config.height
        return {name: SimCamera(name, self, w, h, self.camera_fps) for name in self.camera_names}

    # --- what the physics thread shares -----------------------------------------------------

    def latest_frame(self, camera: str) -> Frame | None:
        with self._lock:
            return self._frames.get(camera)

    def wait_first_frame(self, camera: str, timeout_s: float = 10.0) -> None:
        if camera not in self.camera_names:
            raise CameraError(f"sim camera '{camera}' is not rendered; cameras are {list(self.camera_names)}")
        if not self._first_frame.wait(timeout_s):
            raise CameraError(f"sim camera '{camera}': no frame within {timeout_s} s")

    def success(self) -> bool:
        """Whether the task has succeeded at any point since start."""
        with self._lock:
            return self._succeeded

    def cube_position(self) -> np.ndarray:
        with self._lock:
            if self.scene is None:
                raise SimulationError("the simulation has not started")
            return self.scene.cube_position()

    # --- the physics thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.scene = Scene(self.render_config)
            self.scene.reset(self.seed)
            self.calibration = sim_calibration(self.scene)
            self._success = SuccessTracker(self.task, self.scene)
            self._torque_gain = self.scene.model.actuator_gainprm[self.scene.ctrl_ids, 0].copy()
            self._init_registers()
            self._render_all()
        except BaseException as err:  # reported to start(); the thread must not die silently
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        period = 1.0 / self.physics_hz
        n_substeps = max(1, round(period / self.scene.model.opt.timestep))
        next_tick = next_frame = time.monotonic()
        try:
            while not self._stop.is_set():
                self._apply_goals()
                with self._lock:
                    self.scene.step(n_substeps)
                    succeeded = self._success()
                    self._succeeded = self._succeeded or succeeded
                self._publish_positions()
                now = time.monotonic()
                if now >= next_frame:
                    self._render_all()
                    next_frame = max(next_frame + 1.0 / self.camera_fps, now)
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.5:
                    logger.info("simulation is %.2f s behind real time (CPU busy); resyncing", -delay)
                    next_tick = time.monotonic()
        except BaseException as err:
            logger.exception("simulation thread stopped: %s", err)
            self._error = err
        finally:
            self.scene.close()

    def _init_registers(self) -> None:
        """Servo memory as a calibrated, powered-up arm has it: present = goal = the sim's start pose."""
        raw = self._raw_positions()
        for motor_id, value in raw.items():
            self.emulator.set_register(motor_id, "Goal_Position", value)
        self.emulator.set_present_positions(raw)

    def _raw_positions(self) -> dict[int, int]:
        assert self.scene is not None
        joints = self.scene.joint_positions()
        return {
            MOTOR_IDS[k]: unnormalize(float(joints[k]), self.calibration[name], NORM_MODES[k], RESOLUTION)
            for k, name in enumerate(JOINT_NAMES)
        }

    def _apply_goals(self) -> None:
        assert self.scene is not None
        goals = self.emulator.goal_positions()
        targets = np.array(
            [
                normalize(goals[MOTOR_IDS[k]], self.calibration[name], NORM_MODES[k], RESOLUTION)
                for k, name in enumerate(JOINT_NAMES)
            ]
        )
        torque = np.array([self.emulator.torque_enabled(i) for i in MOTOR_IDS])
        model = self.scene.model
        with self._lock:
            gains = np.where(torque, self._torque_gain, 0.0)
            model.actuator_gainprm[self.scene.ctrl_ids, 0] = gains
            model.actuator_biasprm[self.scene.ctrl_ids, 1] = -gains
            self.scene.set_targets(targets)

    def _publish_positions(self) -> None:
        with self._lock:
            raw = self._raw_positions()
        self.emulator.set_present_positions(raw)

    def _render_all(self) -> None:
        assert self.scene is not None
        with self._lock:
            rgb = {cam: self.scene.render(cam) for cam in self.camera_names}
            depth = (
                {cam: self.scene.render_depth(cam) for cam in self.camera_names}
                if self.render_config.depth
                else {}
            )
            stamp = time.monotonic()
            for cam in self.camera_names:
                self._frames[cam] = Frame(rgb[cam], stamp, depth.get(cam), self._frame_count)
            self._frame_count += 1
        self._first_frame.set()


class SimSO101Robot(SO101):
    """Robot kind ``sim-so101``: the real ``SO101`` class on a simulated arm's pty.

    Constructing it starts the simulation (physics thread + emulator); ``connect()`` opens the
    bus as on hardware; ``disconnect()`` also stops the simulation (it cannot be reconnected).
    ``max_step_*`` are the default per-tick safety steps: the sim's experts move up to ~8 degrees
    per 10 Hz tick, more than a 30 Hz real arm's default of 3.
    """

    name = "sim-so101"

    def __init__(
        self,
        task: str = "lift",
        seed: int = 0,
        *,
        size: int = 128,
        cameras: tuple[str, ...] = CAMERA_NAMES,
        control_hz: float = DEFAULT_CONTROL_HZ,
        max_step_deg: float = 10.0,
        max_step_gripper: float = 25.0,
        joint_frame: str = "lerobot",
    ):
        """joint_frame: the frame the policy sees (``SO101``); the simulated arm itself is in LeRobot's."""
        from molmoact2_edge.hardware.buses.feetech import FeetechBus

        self.sim = SimSO101(
            task, seed, render=RenderConfig(width=size, height=size), cameras=cameras, camera_fps=control_hz
        )
        port = self.sim.start()
        try:
            super().__init__(
                port,
                # The emulator shares the CPU (and the GIL) with physics and rendering; a real
                # adapter answers within a millisecond, this one within tens at worst.
                bus=FeetechBus(port, timeout_margin_s=SIM_BUS_TIMEOUT_S),
                calibration=self.sim.calibration,
                cameras=dict(self.sim.cameras()),
                max_step_deg=max_step_deg,
                max_step_gripper=max_step_gripper,
                control_hz=control_hz,
                joint_frame=joint_frame,
            )
        except BaseException:
            self.sim.stop()
            raise
        self.instruction = self.sim.task.instruction

    def success(self) -> bool:
        """Whether the task has succeeded at any point since the simulation started."""
        return self.sim.success()

    def disconnect(self) -> None:
        try:
            super().disconnect()
        finally:
            self.sim.stop()


class SimSO101Handle:
    """What ``make_sim_so101`` returns: the connected robot, its sim, and the task."""

    def __init__(self, robot: SimSO101Robot):
        self.robot = robot
        self.sim = robot.sim
        self.instruction = robot.instruction

    def success(self) -> bool:
        return self.robot.success()

    def close(self) -> None:
        self.robot.disconnect()

    def __enter__(self) -> SimSO101Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_sim_so101(task: str = "lift", seed: int = 0, **kwargs: Any) -> SimSO101Handle:
    """Start a simulated SO-101 and connect the real ``SO101`` driver to it (kwargs: see ``SimSO101Robot``)."""
    robot = SimSO101Robot(task, seed, **kwargs)
    try:
        robot.connect()
    except BaseException:
        robot.sim.stop()
        raise
    return SimSO101Handle(robot)
