"""Koch v1.1 follower arm: six Dynamixel X-series servos on one serial bus (LeRobot ``KochFollower``).

Motors: shoulder_pan and shoulder_lift XL430-W250, elbow_flex .. gripper XL330-M288. Joints
run in extended-position mode (4), the gripper in current-based position mode (5) so that
it can grip without burning out; the elbow carries LeRobot's stiffer gains. Calibration is
LeRobot's file (``robots/koch_follower/<id>.json``); Dynamixel applies drive mode in its
own register, so normalization ignores ``drive_mode`` as LeRobot's Dynamixel bus does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.buses.dynamixel_tables import HARDWARE_ERROR_FLAGS
from molmoact2_edge.hardware.calibration import MotorCalibration
from molmoact2_edge.hardware.cameras import Camera
from molmoact2_edge.hardware.robots.serial_arm import SerialArm

XL430_W250, XL330_M288 = 1060, 1200
KOCH_MOTORS = (
    ("shoulder_pan", XL430_W250),
    ("shoulder_lift", XL430_W250),
    ("elbow_flex", XL330_M288),
    ("wrist_flex", XL330_M288),
    ("wrist_roll", XL330_M288),
    ("gripper", XL330_M288),
)
EXTENDED_POSITION, CURRENT_BASED_POSITION = 4, 5
KOCH_ELBOW_PID = {"Position_P_Gain": 1500, "Position_I_Gain": 0, "Position_D_Gain": 600}


class Koch(SerialArm):
    """Koch follower on ``port``; calibration under LeRobot's ``koch_follower`` folder."""

    name = "koch"
    calibration_type = "koch_follower"
    homing_sign = 1
    apply_drive_mode = False
    max_homing_offset = None
    full_turn_motors = ("shoulder_pan", "wrist_roll")
    baud_rate_index = 3  # 1 Mbps
    status_register = "Hardware_Error_Status"
    status_flags = HARDWARE_ERROR_FLAGS

    motor_models = KOCH_MOTORS

    def __init__(
        self,
        port: str,
        calibration: Mapping[str, MotorCalibration] | str | Path | None = None,
        cameras: dict[str, Camera] | None = None,
        *,
        baudrate: int | None = None,
        retries: int = 2,
        bus: DynamixelBus | None = None,
        **options: Any,
    ):
        """``options``: the ``SerialArm`` keywords (robot_id, use_degrees, max_step_deg, ...)."""
        super().__init__(
            bus or DynamixelBus(port, baudrate=baudrate, retries=retries), calibration, cameras, **options
        )

    def _torque_registers(self, enabled: bool) -> dict[str, int]:
        return {"Torque_Enable": int(enabled)}

    def _configure(self) -> None:
        """LeRobot's setup: no return delay (factory 500 us per servo), modes, elbow gains."""
        for name, m in self.motors.items():
            self.bus.write("Return_Delay_Time", m.id, 0)
            self.bus.write(
                "Operating_Mode", m.id, CURRENT_BASED_POSITION if name == "gripper" else EXTENDED_POSITION
            )
        for register, value in KOCH_ELBOW_PID.items():
            self.bus.write(register, self.motors["elbow_flex"].id, value)
