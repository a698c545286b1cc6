"""I2RT YAM arms: Damiao drives on CAN in MIT mode, one chain per arm.

One arm = motors 1-3 DM4340, 4-6 DM4310, gripper motor 7 (DM4310 on the linear_4310
gripper, DM3507 on linear_3507) on one CAN channel. State and action = 6 joint angles
(rad) + gripper opening (0 closed .. 1 open), the order of i2rt ``get_joint_pos`` and of the
released ``yam_dual_molmoact2`` data; ``BimanualYAM`` concatenates left then right (14).

Gains are i2rt's ``yam.yml`` (kp 80/80/80/10/10/10, kd 5/5/5/1.5/1.5/1.5; gripper 20/0.5).
Joint limits are the arm's MJCF limits (``yam.xml``). The drives' 400 ms command timeout
stays on: the safety layer's watchdog refreshes the hold target while inference stalls.

Not here (i2rt has them): gravity-compensation feed-forward from MuJoCo inverse dynamics
(pass ``feedforward`` to add a torque per joint; without it the arm sags by tau_g / kp),
the gripper force limiter, auto-recovery of faulted drives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from molmoact2_edge.errors import CalibrationError, HardwareError, ServoError
from molmoact2_edge.hardware.buses.damiao import DamiaoBus, MitCommand, MotorFeedback
from molmoact2_edge.hardware.cameras import Camera
from molmoact2_edge.hardware.robots.base import JointLimits, Robot

logger = logging.getLogger(__name__)

ARM_JOINTS = ("joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6")
YAM_JOINTS = (*ARM_JOINTS, "gripper")
ARM_MODELS = ("dm4340", "dm4340", "dm4340", "dm4310", "dm4310", "dm4310")
GRIPPER_ID = 7
GRIPPER_MODELS = {"linear_4310": "dm4310", "linear_3507": "dm3507", "crank_4310": "dm4310"}
YAM_KP = (80.0, 80.0, 80.0, 10.0, 10.0, 10.0)
YAM_KD = (5.0, 5.0, 5.0, 1.5, 1.5, 1.5)
GRIPPER_GAINS = {"dm4310": (20.0, 0.5), "dm3507": (10.0, 0.3)}
# yam.xml joint ranges (rad)
YAM_LOWER = (-2.618, 0.0, 0.0, -1.693, -1.571, -2.094)
YAM_UPPER = (3.142, 3.665, 3.142, 1.571, 1.571, 2.094)


class YAM(Robot):
    """One YAM arm on one CAN channel.

    Args:
        channel: CAN channel (``can0``, or a udev name such as ``can_follower_l``).
        interface: python-can interface (``socketcan``; ``virtual`` for the emulator).
        gripper: ``linear_4310`` | ``linear_3507`` | ``crank_4310``.
        gripper_range: (closed, open) gripper motor positions in rad; ``None`` = find the
            jaw stops at connect with a small torque, as i2rt's linear grippers do.
        max_step_rad / max_step_gripper: default per-tick step for the safety layer
            (MolmoAct2's YAM deployment uses 0.03 rad at 30 Hz).
        max_temperature_c: ``check_faults`` stops above this rotor/MOSFET temperature.
        feedforward: optional q (6,) -> tau (6,) Nm, added to every joint command (gravity).
    """

    name = "yam"
    writes_acknowledged = True

    def __init__(
        self,
        channel: str = "can0",
        cameras: dict[str, Camera] | None = None,
        *,
        interface: str = "socketcan",
        gripper: str = "linear_4310",
        gripper_range: tuple[float, float] | None = None,
        kp: tuple[float, ...] = YAM_KP,
        kd: tuple[float, ...] = YAM_KD,
        max_step_rad: float = 0.03,
        max_step_gripper: float = 0.05,
        control_hz: float = 30.0,
        max_temperature_c: float = 70.0,
        feedforward: Callable[[np.ndarray], np.ndarray] | None = None,
        joint_prefix: str = "",
        disable_torque_on_disconnect: bool = True,
        bus: DamiaoBus | None = None,
    ):
        super().__init__(cameras, disable_torque_on_disconnect=disable_torque_on_disconnect)
        if gripper not in GRIPPER_MODELS:
            raise CalibrationError(f"unknown YAM gripper {gripper!r}; known: {sorted(GRIPPER_MODELS)}")
        if len(kp) != 6 or len(kd) != 6:
            raise CalibrationError(f"YAM gains need 6 values each, got kp={kp} kd={kd}")
        gripper_model = GRIPPER_MODELS[gripper]
        motors = {i + 1: m for i, m in enumerate(ARM_MODELS)} | {GRIPPER_ID: gripper_model}
        self.bus = bus or DamiaoBus(channel, motors, interface=interface)
        self.joint_names = tuple(f"{joint_prefix}{j}" for j in YAM_JOINTS)
        self.kp = np.array([*kp, GRIPPER_GAINS[gripper_model][0]], np.float32)
        self.kd = np.array([*kd, GRIPPER_GAINS[gripper_model][1]], np.float32)
        self.gripper_range = gripper_range
        self.max_step_rad = max_step_rad
        self.max_step_gripper = max_step_gripper
        self.control_hz = control_hz
        self.max_temperature_c = max_temperature_c
        self.feedforward = feedforward
        self._ids = list(range(1, 7)) + [GRIPPER_ID]

    # --- connection -------------------------------------------------------------------------

    def _connect_bus(self) -> None:
        self.bus.connect()
        try:
            self.bus.clear_error()  # a drive that timed out during the last session stays latched
            self.bus.refresh(self._ids)  # every drive answers, none in a fault state
            for motor_id in self._ids:
                if self.bus.read("Timeout", motor_id) == 0:
                    logger.warning(
                        "%s motor %d has its CAN command timeout disabled; a hung host leaves it holding torque",
                        self.bus.port,
                        motor_id,
                    )
            if self.gripper_range is None:
                self.gripper_range = self.find_gripper_range()
            self._hold(self.bus.refresh(self._ids))
        except BaseException:
            self._disconnect_bus(disable_torque=True)
            raise

    def _disconnect_bus(self, disable_torque: bool) -> None:
        if not self.bus.is_connected:
            return
        try:
            if disable_torque:
                self.bus.disable(self._ids)
        except HardwareError as err:
            logger.error("%s: could not disable the drives on %s: %s", self.name, self.bus.port, err)
        finally:
            self.bus.disconnect()

    def _hold(self, feedback: dict[int, MotorFeedback]) -> None:
        """Enable and command the measured pose with full gains: torque on without a jump."""
        self.bus.enable(self._ids)
        self.bus.mit(
            {
                i: MitCommand(position=feedback[i].position, kp=float(self.kp[k]), kd=float(self.kd[k]))
                for k, i in enumerate(self._ids)
            }
        )

    def find_gripper_range(
        self, torque_nm: float = 0.5, timeout_s: float = 2.0, still_s: float = 0.1
    ) -> tuple[float, float]:
        """Drive the gripper to each jaw stop with a small torque (kp = kd = 0) and return (closed, open).

        The closing direction is taken as negative motor rotation (unverified on hardware: pass
        ``gripper_range`` measured with ``molmo-edge motors read --bus damiao`` if yours differs).
        """
        self.bus.enable([GRIPPER_ID])
        stops = []
        for sign in (-1.0, 1.0):
            deadline = time.monotonic() + timeout_s
            last_pos, still_since = None, time.monotonic()
            while time.monotonic() < deadline:
                fb = self.bus.mit({GRIPPER_ID: MitCommand(torque=sign * torque_nm)})[GRIPPER_ID]
                if last_pos is None or abs(fb.position - last_pos) > 1e-3:
                    last_pos, still_since = fb.position, time.monotonic()
                elif time.monotonic() - still_since > still_s:
                    break
                time.sleep(0.005)
            stops.append(float(last_pos if last_pos is not None else 0.0))
        self.bus.mit({GRIPPER_ID: MitCommand(position=stops[1], kp=float(self.kp[6]), kd=float(self.kd[6]))})
        closed, opened = stops
        if opened - closed < 0.05:
            raise CalibrationError(
                f"{self.bus.port}: gripper moved only {opened - closed:.3f} rad between its stops; check the gripper"
            )
        logger.info("%s: gripper stops closed=%.3f open=%.3f rad", self.bus.port, closed, opened)
        return closed, opened

    # --- state and commands -----------------------------------------------------------------

    def _gripper(self) -> tuple[float, float]:
        if self.gripper_range is None:
            raise CalibrationError(
                f"{self.name} on {self.bus.port}: gripper range unknown; connect() first or pass gripper_range"
            )
        return self.gripper_range

    def _to_state(self, feedback: dict[int, MotorFeedback]) -> np.ndarray:
        closed, opened = self._gripper()
        joints = [feedback[i].position for i in range(1, 7)]
        grip = (feedback[GRIPPER_ID].position - closed) / (opened - closed)
        return np.array([*joints, grip], np.float32)

    def read_state(self) -> np.ndarray:
        return self._to_state(self.bus.refresh(self._ids))

    def _write_targets(self, target: np.ndarray) -> np.ndarray:
        closed, opened = self._gripper()
        sent = target.astype(np.float32).copy()
        sent[6] = min(1.0, max(0.0, float(sent[6])))
        tau = np.zeros(7, np.float32)
        if self.feedforward is not None:
            tau[:6] = self.feedforward(sent[:6])
        positions = [*sent[:6].tolist(), closed + float(sent[6]) * (opened - closed)]
        self.bus.mit(
            {
                i: MitCommand(
                    position=positions[k], kp=float(self.kp[k]), kd=float(self.kd[k]), torque=float(tau[k])
                )
                for k, i in enumerate(self._ids)
            }
        )
        return sent

    def set_torque(self, enabled: bool) -> None:
        if enabled:
            self._hold(self.bus.refresh(self._ids))
        else:
            self.bus.disable(self._ids)

    def check_faults(self) -> None:
        feedback = self.bus.refresh(self._ids)  # a drive fault state raises ServoError here
        hot = {
            i: max(fb.t_mos, fb.t_rotor)
            for i, fb in feedback.items()
            if max(fb.t_mos, fb.t_rotor) >= self.max_temperature_c
        }
        if hot:
            first = min(hot)
            raise ServoError(
                f"{self.name} on {self.bus.port}: motor temperature at or above {self.max_temperature_c:.0f} degC: {hot}",
                motor_id=first,
                flags=("over_temperature",),
            )

    def limits(self) -> JointLimits:
        return JointLimits(
            self.joint_names,
            np.array([*YAM_LOWER, 0.0], np.float32),
            np.array([*YAM_UPPER, 1.0], np.float32),
            np.array([self.max_step_rad] * 6 + [self.max_step_gripper], np.float32),
            self.control_hz,
        )


class BimanualYAM(Robot):
    """Two YAM arms (left, right), each on its own CAN channel; state/action 14 = left 7 then right 7."""

    name = "bimanual-yam"
    writes_acknowledged = True

    def __init__(
        self,
        left: YAM,
        right: YAM,
        cameras: dict[str, Camera] | None = None,
        *,
        disable_torque_on_disconnect: bool = True,
    ):
        super().__init__(cameras, disable_torque_on_disconnect=disable_torque_on_disconnect)
        self.left, self.right = left, right
        self.joint_names = left.joint_names + right.joint_names

    @classmethod
    def on_channels(
        cls,
        left_channel: str = "can_left",
        right_channel: str = "can_right",
        cameras: dict[str, Camera] | None = None,
        **arm_kwargs: object,
    ) -> BimanualYAM:
        """Two arms with the same settings, joints named ``left_joint_1`` ... ``right_gripper``."""
        return cls(
            YAM(left_channel, joint_prefix="left_", **arm_kwargs),  # type: ignore[arg-type]
            YAM(right_channel, joint_prefix="right_", **arm_kwargs),  # type: ignore[arg-type]
            cameras,
        )

    def _connect_bus(self) -> None:
        self.left._connect_bus()
        try:
            self.right._connect_bus()
        except BaseException:
            self.left._disconnect_bus(disable_torque=True)
            raise

    def _disconnect_bus(self, disable_torque: bool) -> None:
        try:
            self.left._disconnect_bus(disable_torque)
        finally:
            self.right._disconnect_bus(disable_torque)

    def read_state(self) -> np.ndarray:
        return np.concatenate([self.left.read_state(), self.right.read_state()])

    def _write_targets(self, target: np.ndarray) -> np.ndarray:
        n = self.left.state_dim
        return np.concatenate([self.left._write_targets(target[:n]), self.right._write_targets(target[n:])])

    def set_torque(self, enabled: bool) -> None:
        self.left.set_torque(enabled)
        self.right.set_torque(enabled)

    def check_faults(self) -> None:
        self.left.check_faults()
        self.right.check_faults()

    def limits(self) -> JointLimits:
        a, b = self.left.limits(), self.right.limits()
        return JointLimits(
            self.joint_names,
            np.concatenate([a.lower, b.lower]),
            np.concatenate([a.upper, b.upper]),
            np.concatenate([a.max_step, b.max_step]),
            a.control_hz,
        )
