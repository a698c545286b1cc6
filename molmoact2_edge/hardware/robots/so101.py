"""SO-100 / SO-101 follower arm: six Feetech STS3215 servos on one serial bus (LeRobot ``SOFollower``).

State and action order (the released SO100_101 checkpoint's): shoulder_pan, shoulder_lift,
elbow_flex, wrist_flex, wrist_roll (degrees), gripper (0-100). Calibration is LeRobot's file,
read from where ``lerobot-calibrate`` put it. The released MolmoAct2-SO100_101 norm stats are
in LeRobot's pre-0.5 joint frame: pass ``joint_frame="so100_101_legacy"`` to run that
checkpoint on an arm calibrated with LeRobot >= 0.5 (or with ``molmo-edge calibrate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from molmoact2_edge.errors import CalibrationError
from molmoact2_edge.hardware.buses.feetech import FeetechBus
from molmoact2_edge.hardware.buses.feetech_tables import ERROR_FLAGS, STS3215_MODEL_NUMBER
from molmoact2_edge.hardware.calibration import (
    SO100_101_LEGACY_FRAME,
    JointFrame,
    MotorCalibration,
)
from molmoact2_edge.hardware.cameras import Camera
from molmoact2_edge.hardware.robots.serial_arm import SerialArm

SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
JOINT_FRAMES: dict[str, JointFrame | None] = {"lerobot": None, "so100_101_legacy": SO100_101_LEGACY_FRAME}

# LeRobot SOFollowerConfig / SOFollower.configure(): position-loop gains and gripper protection
# (the gripper caps were added after stalled grippers burnt out, LeRobot PR #1809).
SO101_PID = {"P_Coefficient": 16, "I_Coefficient": 0, "D_Coefficient": 32}
SO101_GRIPPER_PROTECTION = {"Max_Torque_Limit": 500, "Protection_Current": 250, "Overload_Torque": 25}
PHASE_MULTI_TURN_BIT = 0x10  # bit 4: angle feedback mode; cleared so positions stay in 0..4095


class SO101(SerialArm):
    """SO-101 (and SO-100) follower.

    Args:
        port: serial device of the bus adapter (``/dev/ttyACM0``).
        calibration: motor calibrations, a LeRobot JSON path, or ``None`` to use
            ``~/.cache/huggingface/lerobot/calibration/robots/so_follower/<robot_id>.json``.
        robot_id: the LeRobot ``--robot.id`` whose calibration file to use.
        use_degrees: DEGREES for the five arm joints (LeRobot's default since 2026-02);
            False = RANGE_M100_100, for policies trained on older datasets.
        joint_frame: ``"lerobot"`` (identity), ``"so100_101_legacy"`` or a ``JointFrame``.
        retries: bus read retries (LeRobot ``num_read_retries=2``).
    """

    name = "so101"
    calibration_type = "so_follower"
    legacy_calibration_types = ("so101_follower", "so100_follower")
    homing_sign = -1
    apply_drive_mode = True
    max_homing_offset = 2047
    full_turn_motors = ("wrist_roll",)
    baud_rate_index = 0  # 1 Mbps
    status_register = "Status"
    status_flags = ERROR_FLAGS
    motor_models = tuple((name, STS3215_MODEL_NUMBER) for name in SO101_JOINTS)

    def __init__(
        self,
        port: str,
        calibration: Mapping[str, MotorCalibration] | str | Path | None = None,
        cameras: dict[str, Camera] | None = None,
        *,
        joint_frame: str | JointFrame | None = "lerobot",
        baudrate: int | None = None,
        retries: int = 2,
        bus: FeetechBus | None = None,
        **options: Any,
    ):
        """``options``: the ``SerialArm`` keywords (robot_id, use_degrees, max_step_deg, ...)."""
        if isinstance(joint_frame, str):
            if joint_frame not in JOINT_FRAMES:
                raise CalibrationError(f"unknown joint frame {joint_frame!r}; known: {sorted(JOINT_FRAMES)}")
            joint_frame = JOINT_FRAMES[joint_frame]
        if joint_frame is not None and not options.get("use_degrees", True):
            raise CalibrationError(
                "the SO100_101 joint-frame correction is in degrees; it needs use_degrees=True"
            )
        bus = bus or FeetechBus(port, baudrate=baudrate, retries=retries)
        super().__init__(bus, calibration, cameras, joint_frame=joint_frame, **options)

    def _torque_registers(self, enabled: bool) -> dict[str, int]:
        # LeRobot: Lock = 1 with torque on (EEPROM protected), Lock = 0 with torque off
        return {"Torque_Enable": 1, "Lock": 1} if enabled else {"Torque_Enable": 0, "Lock": 0}

    def _configure(self) -> None:
        """LeRobot's servo setup: instant replies, full acceleration, position mode, gains, gripper caps."""
        for name, m in self.motors.items():
            self.bus.write("Return_Delay_Time", m.id, 0)
            self.bus.write("Maximum_Acceleration", m.id, 254)
            self.bus.write("Acceleration", m.id, 254)
            phase = self.bus.read("Phase", m.id)
            if phase & PHASE_MULTI_TURN_BIT:
                self.bus.write("Phase", m.id, phase & ~PHASE_MULTI_TURN_BIT)
            self.bus.write("Operating_Mode", m.id, 0)
            for register, value in SO101_PID.items():
                self.bus.write(register, m.id, value)
            if name == "gripper":
                for register, value in SO101_GRIPPER_PROTECTION.items():
                    self.bus.write(register, m.id, value)
