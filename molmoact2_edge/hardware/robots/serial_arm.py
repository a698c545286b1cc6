"""An arm of serial-bus servos with a LeRobot calibration: what SO-101 (Feetech) and Koch (Dynamixel) share.

A subclass is mostly data: its motors (name -> id, model number, normalization mode), the
bus class, the homing sign of its servo family, the register names for position limits and
status, and a ``_configure`` hook with the vendor's servo setup. State and actions are
one sync read of ``Present_Position`` and one sync write of ``Goal_Position`` per tick.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmoact2_edge.errors import BusError, BusTimeoutError, CalibrationError, ServoError
from molmoact2_edge.hardware.buses.base import Bus
from molmoact2_edge.hardware.calibration import (
    JointFrame,
    MotorCalibration,
    NormMode,
    default_calibration_path,
    half_turn_homing_offsets,
    load_calibration,
    normalize,
    normalized_range,
    record_ranges,
    save_calibration,
    unnormalize,
)
from molmoact2_edge.hardware.cameras import Camera
from molmoact2_edge.hardware.robots.base import JointLimits, Robot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Motor:
    id: int
    model_number: int
    norm_mode: NormMode


class SerialArm(Robot):
    """Servos on one serial bus, normalized through a LeRobot calibration.

    Args:
        bus: a connected-or-not ``Bus`` on the arm's port.
        calibration: motor name -> ``MotorCalibration``, a path to a LeRobot JSON file, or
            ``None``: LeRobot's file for ``robot_id`` if it exists (else only
            ``connect_for_calibration`` works).
        robot_id: the LeRobot ``--robot.id`` naming the calibration file.
        use_degrees: DEGREES for the arm joints (LeRobot's default since 2026-02); False =
            RANGE_M100_100, for policies trained on older datasets. Grippers are RANGE_0_100.
        joint_frame: an optional change of frame between LeRobot's degrees and the policy's.
        max_step_deg: default per-tick step for the safety layer (arm joints); grippers use
            ``max_step_gripper`` (0-100 units).
    """

    motor_models: tuple[tuple[str, int], ...]  # (joint name, model number) in id order 1, 2, ...
    resolution: int = 4096
    homing_sign: int  # -1 Feetech (Present = Actual - Offset), +1 Dynamixel
    apply_drive_mode: bool  # Feetech applies drive_mode in software; Dynamixel has a register
    max_homing_offset: int | None  # Feetech: 11-bit sign-magnitude; Dynamixel: 4-byte register
    full_turn_motors: tuple[str, ...] = ()  # continuous joints: range forced to the full turn
    status_register: str  # read by check_faults in one sync read
    status_flags: Mapping[int, str]  # bit -> fault name
    calibration_type: str  # LeRobot's folder: robots/<calibration_type>/<robot_id>.json
    baud_rate_index: int  # Baud_Rate register value for the bus's default rate (1 Mbps)
    legacy_calibration_types: tuple[str, ...] = ()  # older folder names still searched

    def __init__(
        self,
        bus: Bus,
        calibration: Mapping[str, MotorCalibration] | str | Path | None = None,
        cameras: dict[str, Camera] | None = None,
        *,
        robot_id: str = "follower",
        use_degrees: bool = True,
        joint_frame: JointFrame | None = None,
        max_step_deg: float = 3.0,
        max_step_gripper: float = 5.0,
        control_hz: float = 30.0,
        disable_torque_on_disconnect: bool = True,
    ):
        super().__init__(cameras, disable_torque_on_disconnect=disable_torque_on_disconnect)
        body = NormMode.DEGREES if use_degrees else NormMode.RANGE_M100_100
        self.motors: dict[str, Motor] = {
            name: Motor(i + 1, model, NormMode.RANGE_0_100 if name == "gripper" else body)
            for i, (name, model) in enumerate(self.motor_models)
        }
        self.joint_names = tuple(self.motors)
        self.bus = bus
        self.robot_id = robot_id
        if calibration is None:
            found = default_calibration_path(self.calibration_type, robot_id, self.legacy_calibration_types)
            calibration = found if found.exists() else None
        if isinstance(calibration, (str, Path)):
            calibration = load_calibration(calibration, self.joint_names)
        self.calibration: dict[str, MotorCalibration] | None = (
            dict(calibration) if calibration is not None else None
        )
        if joint_frame is not None and len(joint_frame.signs) != len(self.joint_names):
            raise CalibrationError(
                f"{self.name}: joint frame has {len(joint_frame.signs)} joints, the arm {len(self.joint_names)}"
            )
        self.joint_frame = joint_frame
        self.max_step_deg = max_step_deg
        self.max_step_gripper = max_step_gripper
        self.control_hz = control_hz
        self._ids = [m.id for m in self.motors.values()]
        self._status_registers: tuple[str, ...] = ()

    def calibration_path(self) -> Path:
        """Where a new calibration of this arm is saved (LeRobot's location for ``robot_id``)."""
        return default_calibration_path(self.calibration_type, self.robot_id)

    # --- vendor hooks -----------------------------------------------------------------------

    @abstractmethod
    def _configure(self) -> None:
        """Write the vendor's servo setup (torque is off while this runs)."""

    @abstractmethod
    def _torque_registers(self, enabled: bool) -> dict[str, int]:
        """Register -> value to write to every motor to enable/disable torque (in order)."""

    # --- connection -------------------------------------------------------------------------

    def _connect_bus(self, require_calibration: bool = True) -> None:
        if require_calibration and self.calibration is None:
            raise CalibrationError(
                f"{self.name} on {self.bus.port} has no calibration; run `molmo-edge calibrate {self.name} --port {self.bus.port}`"
            )
        self.bus.connect()
        try:
            self.bus.verify_models({m.id: m.model_number for m in self.motors.values()})
            self.set_torque(False)
            self._configure()
            if self.calibration is not None:
                self.write_calibration(self.calibration)
            self.set_torque(True)
        except BaseException:
            self.bus.disconnect()
            raise

    def connect_for_calibration(self) -> None:
        """Open the bus without a calibration (torque off, no cameras) for the calibration procedure."""
        self.bus.connect()
        try:
            self.bus.verify_models({m.id: m.model_number for m in self.motors.values()})
            self.set_torque(False)
        except BaseException:
            self.bus.disconnect()
            raise

    def _disconnect_bus(self, disable_torque: bool) -> None:
        if not self.bus.is_connected:
            return
        try:
            if disable_torque:
                self.set_torque(False)
        except Exception as err:  # the bus may be gone; closing must still happen
            logger.error("%s: could not disable torque on %s: %s", self.name, self.bus.port, err)
        finally:
            self.bus.disconnect()

    # --- state and commands -----------------------------------------------------------------

    def _cal(self) -> dict[str, MotorCalibration]:
        if self.calibration is None:
            raise CalibrationError(f"{self.name} has no calibration loaded")
        return self.calibration

    def read_raw(self) -> dict[str, int]:
        raw = self.bus.sync_read("Present_Position", self._ids)
        return {name: raw[m.id] for name, m in self.motors.items()}

    def read_state(self) -> np.ndarray:
        cal = self._cal()
        raw = self.read_raw()
        values = np.array(
            [
                normalize(
                    raw[n], cal[n], m.norm_mode, self.resolution, apply_drive_mode=self.apply_drive_mode
                )
                for n, m in self.motors.items()
            ],
            np.float32,
        )
        return self.joint_frame.to_policy(values) if self.joint_frame else values

    def _write_targets(self, target: np.ndarray) -> np.ndarray:
        cal = self._cal()
        robot_frame = self.joint_frame.to_robot(target) if self.joint_frame else target
        steps: dict[int, int] = {}
        sent = np.empty(len(self.motors), np.float32)
        for k, (name, m) in enumerate(self.motors.items()):
            c = cal[name]
            # the servo clamps goals to its EEPROM limits anyway; clamping here makes the return value true
            raw = min(
                c.range_max,
                max(
                    c.range_min,
                    unnormalize(
                        float(robot_frame[k]),
                        c,
                        m.norm_mode,
                        self.resolution,
                        apply_drive_mode=self.apply_drive_mode,
                    ),
                ),
            )
            steps[m.id] = raw
            sent[k] = normalize(raw, c, m.norm_mode, self.resolution, apply_drive_mode=self.apply_drive_mode)
        self.bus.sync_write("Goal_Position", steps)
        return self.joint_frame.to_policy(sent) if self.joint_frame else sent

    def set_torque(self, enabled: bool) -> None:
        """Write the torque registers to every motor, trying all of them even when one fails.

        A servo that answers with fault flags (overload, ...) did receive the write; when
        disabling, that is success (a faulted servo is exactly the one to turn off).
        """
        errors: list[BusError] = []
        for register, value in self._torque_registers(enabled).items():
            for motor_id in self._ids:
                try:
                    self.bus.write(register, motor_id, value)
                except ServoError as err:
                    if enabled:
                        errors.append(err)
                    else:
                        logger.warning(
                            "%s: motor %d took %s=%d but reports %s",
                            self.name,
                            motor_id,
                            register,
                            value,
                            err.flags,
                        )
                except BusError as err:
                    errors.append(err)
        if errors:
            raise errors[0]

    def check_faults(self) -> None:
        status = self.bus.sync_read(self.status_register, self._ids)
        for name, m in self.motors.items():
            flags = tuple(flag for bit, flag in self.status_flags.items() if status[m.id] & (1 << bit))
            if flags:
                raise ServoError(
                    f"{self.name} on {self.bus.port}: motor {m.id} ({name}) reports {', '.join(flags)}",
                    motor_id=m.id,
                    flags=flags,
                )

    def limits(self) -> JointLimits:
        cal = self._cal()
        lower, upper, step = [], [], []
        for name, m in self.motors.items():
            lo, hi = normalized_range(cal[name], m.norm_mode, self.resolution)
            lower.append(lo)
            upper.append(hi)
            step.append(self.max_step_gripper if m.norm_mode is NormMode.RANGE_0_100 else self.max_step_deg)
        lo_arr, hi_arr = np.array(lower, np.float32), np.array(upper, np.float32)
        if self.joint_frame is not None:
            a, b = self.joint_frame.to_policy(lo_arr), self.joint_frame.to_policy(hi_arr)
            lo_arr, hi_arr = np.minimum(a, b), np.maximum(a, b)
        return JointLimits(self.joint_names, lo_arr, hi_arr, np.array(step, np.float32), self.control_hz)

    # --- motor setup (LeRobot's lerobot-setup-motors, one motor on the bus at a time) -------

    def find_lone_motor(self, ids: Iterable[int], baudrates: Iterable[int]) -> tuple[int, int]:
        """(id, baud rate) of the only motor on the bus, trying the rates in order and stopping at the
        first one where something answers (as LeRobot does); raises if there is none or several."""
        id_list = list(ids)
        with self.bus:
            for baud in baudrates:
                found = self.bus.scan(id_list, [baud]).get(baud, {})
                if len(found) == 1:
                    return next(iter(found)), baud
                if found:
                    raise BusError(
                        f"{self.bus.port}: found motors {sorted(found)} at {baud} baud; connect only the one to set up"
                    )
        raise BusError(
            f"{self.bus.port}: no motor answered at ids {id_list[0]}..{id_list[-1]} on any baud rate; check power and cable"
        )

    def assign_motor(self, name: str, found_id: int, found_baudrate: int) -> None:
        """Give the lone motor the id of joint ``name`` and the bus's default baud rate, then verify it."""
        target = self.motors[name]
        bus = copy.copy(self.bus)  # same port and timeouts, talking at the motor's current rate
        bus.baudrate = found_baudrate
        with bus:
            for register, value in self._torque_registers(False).items():
                bus.write(register, found_id, value)
            # a servo may acknowledge an id or baud change under its new id / at its new rate, which
            # reads as a timeout here; the ping below is what verifies the change
            if found_id != target.id:
                try:
                    bus.write("ID", found_id, target.id)
                except BusTimeoutError:
                    logger.debug("no acknowledgement of the id change from id %d", found_id)
            if found_baudrate != self.bus.baudrate:
                try:
                    bus.write("Baud_Rate", target.id, self.baud_rate_index)
                except BusTimeoutError:
                    logger.debug("no acknowledgement of the baud change at the old rate")
        with self.bus:
            model = self.bus.ping(target.id)
        if model != target.model_number:
            raise BusError(
                f"{self.bus.port}: motor {target.id} ({name}) answers as model {model}, expected {target.model_number}"
            )

    # --- calibration ------------------------------------------------------------------------

    def write_calibration(self, calibration: Mapping[str, MotorCalibration]) -> None:
        """Write homing offsets and position limits to EEPROM (torque must be off), when they differ."""
        for name, m in self.motors.items():
            c = calibration[name]
            wanted = {
                "Homing_Offset": c.homing_offset,
                "Min_Position_Limit": c.range_min,
                "Max_Position_Limit": c.range_max,
            }
            for register, value in wanted.items():
                if self.bus.read(register, m.id) != value:
                    self.bus.write(register, m.id, value)
        self.calibration = dict(calibration)

    def set_half_turn_homings(self) -> dict[str, int]:
        """Reset offsets and limits, read the middle pose, write offsets that make it read 2047."""
        for m in self.motors.values():
            self.bus.write("Homing_Offset", m.id, 0)
            self.bus.write("Min_Position_Limit", m.id, 0)
            self.bus.write("Max_Position_Limit", m.id, self.resolution - 1)
        offsets = half_turn_homing_offsets(
            self.read_raw(), self.resolution, self.homing_sign, self.max_homing_offset
        )
        for name, offset in offsets.items():
            self.bus.write("Homing_Offset", self.motors[name].id, offset)
        return offsets

    def record_ranges(
        self,
        should_stop: Callable[[], bool],
        on_update: Callable[..., None] | None = None,
        period_s: float = 0.02,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Record min/max while the user sweeps every joint except the full-turn ones."""
        swept = [n for n in self.motors if n not in self.full_turn_motors]

        def read() -> dict[str, int]:
            raw = self.read_raw()
            return {n: raw[n] for n in swept}

        mins, maxes = record_ranges(read, should_stop, period_s=period_s, on_update=on_update)
        for name in self.full_turn_motors:
            mins[name], maxes[name] = 0, self.resolution - 1
        return mins, maxes

    def finish_calibration(
        self,
        offsets: Mapping[str, int],
        mins: Mapping[str, int],
        maxes: Mapping[str, int],
        path: str | Path | None = None,
    ) -> dict[str, MotorCalibration]:
        """Build the calibration, write it to the motors and (optionally) to a LeRobot JSON file."""
        calibration = {
            name: MotorCalibration(
                id=m.id,
                drive_mode=0,
                homing_offset=int(offsets[name]),
                range_min=int(mins[name]),
                range_max=int(maxes[name]),
            )
            for name, m in self.motors.items()
        }
        self.write_calibration(calibration)
        if path is not None:
            save_calibration(calibration, path)
            logger.info("calibration saved to %s", path)
        return calibration
