"""Damiao (DM) BLDC joint drives over CAN in MIT mode: the YAM arm's motors.

Protocol (the DM drive firmware as used by i2rt ``dm_driver.py`` and Damiao's
``DM_CAN.py``; classical CAN 2.0A, 11-bit ids, 8 data bytes, 1 Mbit/s):

- MIT command, arbitration id = motor id: position 16 bit, velocity 12, kp 12, kd 12,
  torque 12, big-endian bit-packed. Floats map linearly onto ``[min, max]`` with
  ``u = trunc((x - min) / (max - min) * (2**bits - 1))`` after clamping (``float_to_uint``).
  The motor computes tau = kp (p_des - p) + kd (v_des - v) + tau_ff.
- Special commands on the motor id: ``FF x7`` then ``FC`` enable, ``FD`` disable,
  ``FE`` set the current position as zero, ``FB`` clear a latched error.
- Parameters on id 0x7FF: ``[id_lo, id_hi, 0x33 read | 0x55 write | 0xAA save | 0xCC refresh, RID, value 4 B LE]``.
  RIDs 7..10 (master id, CAN id, command timeout, control mode) are uint32, the others float32.
- Every command is answered by one feedback frame on the motor's *master id* (by convention
  motor id + 0x10): byte 0 = error state (high nibble) | id (low nibble), position 16 bit,
  velocity 12, torque 12, MOSFET temperature and rotor temperature in degC.
- The drive's command timeout (RID 9, in 50 us units; factory 8000 = 400 ms): if no command
  arrives for that long, the motor drops into a protective damping state and reports error
  0xD (loss of communication) until ``clear_error`` and a new ``enable``. Keep it on.

``DamiaoBus`` is a ``Bus``: the uint32 parameters are its registers (``read``/``write`` by
name), and the MIT/refresh/enable commands run through the same retry, lock and error
mapping. A reply carrying a fault state raises ``ServoError`` naming the motor and state.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import can

from molmoact2_edge.errors import BusTimeoutError, ChecksumError, PortError, RegisterError, ServoError
from molmoact2_edge.hardware.buses.base import Bus
from molmoact2_edge.hardware.buses.registers import ControlTable, Register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamiaoModel:
    """MIT-mode scaling of one drive model: the float ranges the 16/12-bit fields span."""

    name: str
    p_max: float  # rad, position range is [-p_max, p_max]
    v_max: float  # rad/s
    t_max: float  # Nm


# Factory PMAX/VMAX/TMAX of each model (i2rt dm_driver.py, Damiao DM_CAN.py Limit_Param).
DAMIAO_MODELS: dict[str, DamiaoModel] = {
    m.name: m
    for m in (
        DamiaoModel("dm4310", 12.5, 30.0, 10.0),
        DamiaoModel("dm4340", 12.5, 10.0, 28.0),
        DamiaoModel("dm3507", 12.5, 50.0, 5.0),
        DamiaoModel("dm6248", 12.5, 20.0, 120.0),
    )
}
KP_MAX = 500.0
KD_MAX = 5.0

PARAM_ID = 0x7FF
FRAME_BYTES = 8  # every Damiao frame, both directions, carries 8 data bytes
MASTER_OFFSET = 0x10  # feedback id = motor id + 0x10 (i2rt ReceiveMode.p16, Damiao's recommendation)
CMD_ENABLE, CMD_DISABLE, CMD_SAVE_ZERO, CMD_CLEAR_ERROR = 0xFC, 0xFD, 0xFE, 0xFB
PARAM_READ, PARAM_WRITE, PARAM_SAVE, PARAM_REFRESH = 0x33, 0x55, 0xAA, 0xCC
TIMEOUT_UNIT_S = 50e-6  # RID 9 counts 50 us periods (Damiao manual; 8000 = 400 ms)


class MotorState(enum.IntEnum):
    """High nibble of feedback byte 0."""

    DISABLED = 0x0
    ENABLED = 0x1
    OVER_VOLTAGE = 0x8
    UNDER_VOLTAGE = 0x9
    OVER_CURRENT = 0xA
    MOSFET_OVER_TEMPERATURE = 0xB
    ROTOR_OVER_TEMPERATURE = 0xC
    LOST_COMMUNICATION = 0xD
    OVERLOAD = 0xE

    @property
    def is_fault(self) -> bool:
        return self not in (MotorState.DISABLED, MotorState.ENABLED)


# uint32 parameters as registers (address = RID). Float parameters go through read_param_float.
DAMIAO_PARAMS = ControlTable(
    "damiao",
    [
        Register("Master_ID", 7, 4, area="eeprom", default=0x11),
        Register("CAN_ID", 8, 4, area="eeprom", default=0x01),
        Register("Timeout", 9, 4, area="eeprom", default=8000),
        Register("Control_Mode", 10, 4, area="eeprom", default=1),  # 1 MIT, 2 pos-vel, 3 vel
    ],
)
FLOAT_PARAMS = {"Gear_Ratio": 20, "PMAX": 21, "VMAX": 22, "TMAX": 23}


# --- frame packing (pure functions, tested against hand-computed goldens) ---------------------


def float_to_uint(x: float, lo: float, hi: float, bits: int) -> int:
    """Clamp ``x`` to [lo, hi] and map it onto 0 .. 2**bits - 1 (truncating, as the firmware's C code)."""
    x = min(max(x, lo), hi)
    return int((x - lo) * ((1 << bits) - 1) / (hi - lo))


def uint_to_float(u: int, lo: float, hi: float, bits: int) -> float:
    return u * (hi - lo) / ((1 << bits) - 1) + lo


@dataclass(frozen=True)
class MitCommand:
    """One MIT-mode command: tau = kp (position - p) + kd (velocity - v) + torque."""

    position: float = 0.0  # rad
    velocity: float = 0.0  # rad/s
    kp: float = 0.0  # Nm/rad, 0..500
    kd: float = 0.0  # Nm s/rad, 0..5
    torque: float = 0.0  # Nm feed-forward


def pack_mit(cmd: MitCommand, model: DamiaoModel) -> bytes:
    p = float_to_uint(cmd.position, -model.p_max, model.p_max, 16)
    v = float_to_uint(cmd.velocity, -model.v_max, model.v_max, 12)
    kp = float_to_uint(cmd.kp, 0.0, KP_MAX, 12)
    kd = float_to_uint(cmd.kd, 0.0, KD_MAX, 12)
    t = float_to_uint(cmd.torque, -model.t_max, model.t_max, 12)
    return bytes(
        [
            p >> 8,
            p & 0xFF,
            v >> 4,
            ((v & 0xF) << 4) | (kp >> 8),
            kp & 0xFF,
            kd >> 4,
            ((kd & 0xF) << 4) | (t >> 8),
            t & 0xFF,
        ]
    )


def _require_frame(data: bytes | bytearray, what: str) -> None:
    """A frame that is not 8 bytes is malformed: ``ChecksumError`` (retried like a bad checksum)."""
    if len(data) != FRAME_BYTES:
        raise ChecksumError(
            f"a Damiao {what} frame has {FRAME_BYTES} data bytes, got {len(data)}: {bytes(data).hex(' ')}"
        )


def unpack_mit(data: bytes, model: DamiaoModel) -> MitCommand:
    """Inverse of ``pack_mit`` up to quantization (used by the emulator)."""
    _require_frame(data, "MIT command")
    p = (data[0] << 8) | data[1]
    v = (data[2] << 4) | (data[3] >> 4)
    kp = ((data[3] & 0xF) << 8) | data[4]
    kd = (data[5] << 4) | (data[6] >> 4)
    t = ((data[6] & 0xF) << 8) | data[7]
    return MitCommand(
        position=uint_to_float(p, -model.p_max, model.p_max, 16),
        velocity=uint_to_float(v, -model.v_max, model.v_max, 12),
        kp=uint_to_float(kp, 0.0, KP_MAX, 12),
        kd=uint_to_float(kd, 0.0, KD_MAX, 12),
        torque=uint_to_float(t, -model.t_max, model.t_max, 12),
    )


@dataclass(frozen=True)
class MotorFeedback:
    """A decoded feedback frame."""

    motor_id: int  # low nibble of byte 0 (the drive reports only 4 bits of its id)
    state: MotorState
    position: float  # rad
    velocity: float  # rad/s
    torque: float  # Nm
    t_mos: int  # degC
    t_rotor: int  # degC


def pack_feedback(fb: MotorFeedback, model: DamiaoModel) -> bytes:
    p = float_to_uint(fb.position, -model.p_max, model.p_max, 16)
    v = float_to_uint(fb.velocity, -model.v_max, model.v_max, 12)
    t = float_to_uint(fb.torque, -model.t_max, model.t_max, 12)
    return bytes(
        [
            (int(fb.state) << 4) | (fb.motor_id & 0xF),
            p >> 8,
            p & 0xFF,
            v >> 4,
            ((v & 0xF) << 4) | (t >> 8),
            t & 0xFF,
            fb.t_mos & 0xFF,
            fb.t_rotor & 0xFF,
        ]
    )


def decode_feedback(data: bytes, model: DamiaoModel) -> MotorFeedback:
    """Raises ``ChecksumError`` for a frame that is not 8 bytes, ``ServoError`` for an unknown state."""
    _require_frame(data, "feedback")
    state_code = data[0] >> 4
    try:
        state = MotorState(state_code)
    except ValueError:
        raise ServoError(
            f"unknown Damiao state code 0x{state_code:X}",
            motor_id=data[0] & 0xF,
            flags=(f"state_0x{state_code:X}",),
        ) from None
    return MotorFeedback(
        motor_id=data[0] & 0xF,
        state=state,
        position=uint_to_float((data[1] << 8) | data[2], -model.p_max, model.p_max, 16),
        velocity=uint_to_float((data[3] << 4) | (data[4] >> 4), -model.v_max, model.v_max, 12),
        torque=uint_to_float(((data[4] & 0xF) << 8) | data[5], -model.t_max, model.t_max, 12),
        t_mos=data[6],
        t_rotor=data[7],
    )


def special_command(code: int) -> bytes:
    return bytes([0xFF] * 7 + [code])


def param_frame(motor_id: int, op: int, rid: int = 0, value: bytes = b"\x00\x00\x00\x00") -> bytes:
    return bytes([motor_id & 0xFF, (motor_id >> 8) & 0xFF, op, rid]) + value


# --- the bus -----------------------------------------------------------------------------------


class DamiaoBus(Bus):
    """A chain of Damiao drives on one CAN channel.

    Args:
        port: CAN channel (``can0``, ``can_follower_l``; a serial device for ``slcan``).
        motors: motor id -> model name (``dm4340``, ``dm4310``, ``dm3507``, ``dm6248``).
        interface: python-can interface: ``socketcan`` (Jetson native CAN, CANable with
            candleLight), ``slcan`` (serial CAN adapters), ``virtual`` (the emulator).
        baudrate: CAN bitrate (socketcan takes it from ``ip link``; passed to slcan).
        reply_timeout_s: how long to wait for the feedback frames of one transaction.
    """

    control_table = DAMIAO_PARAMS
    model_numbers: ClassVar[Mapping[int, str]] = {}
    default_baudrate = 1_000_000
    protocol = "damiao"

    def __init__(
        self,
        port: str,
        motors: Mapping[int, str],
        *,
        interface: str = "socketcan",
        baudrate: int | None = None,
        retries: int = 2,
        reply_timeout_s: float = 0.01,
        master_offset: int = MASTER_OFFSET,
    ):
        super().__init__(port, baudrate=baudrate, retries=retries)
        unknown = {i: m for i, m in motors.items() if m not in DAMIAO_MODELS}
        if unknown:
            raise RegisterError(f"unknown Damiao model(s) {unknown}; known: {sorted(DAMIAO_MODELS)}")
        self.models = {int(i): DAMIAO_MODELS[m] for i, m in motors.items()}
        self.interface = interface
        self.reply_timeout_s = reply_timeout_s
        self.master_offset = master_offset
        self._can: Any = None
        self.last_feedback: dict[int, MotorFeedback] = {}

    # --- Bus primitives ---------------------------------------------------------------------

    def _connect_internal(self) -> None:
        kwargs: dict[str, Any] = {"interface": self.interface, "channel": self.port}
        if self.interface == "slcan":
            kwargs["bitrate"] = self.baudrate
        try:
            self._can = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError) as err:
            hint = (
                f"`sudo ip link set {self.port} up type can bitrate {self.baudrate}`"
                if self.interface == "socketcan"
                else "the adapter and its serial port"
            )
            raise PortError(
                f"could not open CAN channel {self.port} ({self.interface}): {err}. Check {hint}"
            ) from err

    def _disconnect_internal(self) -> None:
        if self._can is not None:
            try:
                self._can.shutdown()
            except (can.CanError, OSError) as err:  # the adapter may already be gone; closing must not raise
                logger.warning("closing CAN channel %s: %s", self.port, err)
            finally:
                self._can = None

    def _set_baudrate_internal(self, baudrate: int) -> None:
        if baudrate != self.baudrate:
            raise PortError(
                f"the CAN bitrate of {self.port} is set on the interface (ip link / adapter), not by the driver"
            )

    def _ping_internal(self, motor_id: int) -> int:
        """Damiao drives report no model number: a ping reads the drive's CAN id parameter (RID 8)."""
        return self._param_read_raw(motor_id, DAMIAO_PARAMS["CAN_ID"].address)

    def _read_internal(self, reg: Register, motor_id: int) -> int:
        return self._param_read_raw(motor_id, reg.address)

    def _write_internal(self, reg: Register, motor_id: int, raw: int) -> None:
        echoed = self._param_exchange(motor_id, PARAM_WRITE, reg.address, struct.pack("<I", raw))
        if struct.unpack("<I", echoed)[0] != raw:
            raise BusTimeoutError(f"motor {motor_id} echoed a different value for {reg.name}")

    def _sync_read_internal(self, reg: Register, motor_ids: list[int]) -> dict[int, int]:
        return {
            i: self._param_read_raw(i, reg.address) for i in motor_ids
        }  # CAN has no group read of parameters

    def _sync_write_internal(self, reg: Register, raw: Mapping[int, int]) -> None:
        for motor_id, value in raw.items():
            self._write_internal(reg, motor_id, value)

    # --- MIT mode and drive commands --------------------------------------------------------

    def mit(self, commands: Mapping[int, MitCommand]) -> dict[int, MotorFeedback]:
        """Send one MIT frame per motor, then collect every reply (LeRobot's batched order).

        Raises ``BusTimeoutError`` when a motor stays silent after the retries and
        ``ServoError`` when a reply carries a fault state (over-temperature, loss of
        communication, ...).
        """
        ids = self._ids(commands)
        frames = {i: (i, pack_mit(commands[i], self._model(i))) for i in ids}
        return self._run("mit", None, ids, lambda: self._exchange_feedback(frames))

    def refresh(self, motor_ids: Iterable[int] | None = None) -> dict[int, MotorFeedback]:
        """Ask for feedback without commanding anything (0x7FF / 0xCC); also feeds the drive's watchdog."""
        ids = self._ids(motor_ids if motor_ids is not None else self.models)
        frames = {i: (PARAM_ID, param_frame(i, PARAM_REFRESH)) for i in ids}
        return self._run("refresh", None, ids, lambda: self._exchange_feedback(frames))

    def enable(self, motor_ids: Iterable[int] | None = None) -> dict[int, MotorFeedback]:
        return self._special("enable", CMD_ENABLE, motor_ids)

    def disable(self, motor_ids: Iterable[int] | None = None) -> dict[int, MotorFeedback]:
        """Disable the drives (no torque). Fault states are reported but never block a disable."""
        return self._special("disable", CMD_DISABLE, motor_ids, raise_on_fault=False)

    def clear_error(self, motor_ids: Iterable[int] | None = None) -> dict[int, MotorFeedback]:
        return self._special("clear_error", CMD_CLEAR_ERROR, motor_ids, raise_on_fault=False)

    def set_zero(self, motor_ids: Iterable[int]) -> dict[int, MotorFeedback]:
        """Store the current position as zero (the drive must be disabled)."""
        return self._special("set_zero", CMD_SAVE_ZERO, motor_ids)

    def read_param_float(self, motor_id: int, name: str) -> float:
        if name not in FLOAT_PARAMS:
            raise RegisterError(f"unknown Damiao float parameter {name!r}; known: {sorted(FLOAT_PARAMS)}")
        raw = self._run(
            "read", None, [motor_id], lambda: self._param_exchange(motor_id, PARAM_READ, FLOAT_PARAMS[name])
        )
        return float(struct.unpack("<f", raw)[0])

    def set_command_timeout(self, motor_id: int, seconds: float) -> None:
        """Write the drive's command timeout (RID 9). 0 disables it, which the YAM lab guides advise against."""
        self.write("Timeout", motor_id, round(seconds / TIMEOUT_UNIT_S))

    def save_params(self, motor_id: int) -> None:
        """Persist parameters to flash (the drive must be disabled; no reply is sent)."""
        with self._lock:
            self._require_connected("save_params")
            self._send(PARAM_ID, param_frame(motor_id, PARAM_SAVE))

    # --- internals --------------------------------------------------------------------------

    def _model(self, motor_id: int) -> DamiaoModel:
        try:
            return self.models[motor_id]
        except KeyError:
            raise RegisterError(
                f"motor {motor_id} is not on the {self.port} chain (motors {sorted(self.models)})"
            ) from None

    def _special(
        self, op: str, code: int, motor_ids: Iterable[int] | None, raise_on_fault: bool = True
    ) -> dict[int, MotorFeedback]:
        ids = self._ids(motor_ids if motor_ids is not None else self.models)
        frames = {i: (i, special_command(code)) for i in ids}
        return self._run(op, None, ids, lambda: self._exchange_feedback(frames, raise_on_fault))

    def _send(self, arbitration_id: int, data: bytes) -> None:
        try:
            self._can.send(
                can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False),
                timeout=self.reply_timeout_s,
            )
        except (can.CanError, OSError) as err:
            raise PortError(
                f"CAN send on {self.port} failed: {err} (bus off, adapter unplugged, or channel down)"
            ) from err

    def _recv(self, deadline: float) -> can.Message | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        return self._receive(remaining)

    def _receive(self, timeout: float) -> can.Message | None:
        """One frame or ``None``; every python-can/OS failure of the adapter becomes ``PortError``."""
        try:
            return self._can.recv(timeout=timeout)
        except (can.CanError, OSError) as err:
            raise PortError(
                f"CAN receive on {self.port} failed: {err} (bus off, adapter unplugged, or channel down)"
            ) from err

    def _exchange_feedback(
        self, frames: Mapping[int, tuple[int, bytes]], raise_on_fault: bool = True
    ) -> dict[int, MotorFeedback]:
        """Send every frame, then collect one feedback frame per motor from its master id."""
        self._drain()
        for arbitration_id, data in frames.values():
            self._send(arbitration_id, data)
        by_master = {i + self.master_offset: i for i in frames}
        replies: dict[int, MotorFeedback] = {}
        deadline = time.monotonic() + self.reply_timeout_s
        while len(replies) < len(frames):
            msg = self._recv(deadline)
            if msg is None:
                missing = sorted(set(frames) - set(replies))
                raise BusTimeoutError(
                    f"no feedback from motor(s) {missing} within {self.reply_timeout_s * 1000:.0f} ms"
                )
            motor_id = by_master.get(msg.arbitration_id)
            if motor_id is None:
                continue  # another device's frame
            data = bytes(msg.data)
            _require_frame(data, "feedback")  # a truncated reply: ChecksumError, retried
            if self._is_param_reply(data, motor_id):
                continue
            feedback = decode_feedback(data, self._model(motor_id))
            if feedback.motor_id != motor_id & 0xF:
                raise ChecksumError(
                    f"feedback on the master id of motor {motor_id} names motor {feedback.motor_id}"
                )
            replies[motor_id] = feedback
        self.last_feedback.update(replies)
        if raise_on_fault:
            faults = {i: fb.state for i, fb in replies.items() if fb.state.is_fault}
            if faults:
                first = min(faults)
                detail = ", ".join(f"motor {i}: {s.name}" for i, s in sorted(faults.items()))
                raise ServoError(
                    f"drive fault ({detail})", motor_id=first, flags=tuple(s.name for s in faults.values())
                )
        return replies

    @staticmethod
    def _is_param_reply(data: bytes | bytearray, motor_id: int) -> bool:
        """A late parameter reply shares the master id with feedback. Read as feedback it would be
        a disabled motor at -12.48 rad (p_hi = 0): no YAM joint goes there, so the test is safe."""
        return data[0] | (data[1] << 8) == motor_id and data[2] in (PARAM_READ, PARAM_WRITE)

    def _param_exchange(self, motor_id: int, op: int, rid: int, value: bytes = b"\x00\x00\x00\x00") -> bytes:
        self._drain()
        self._send(PARAM_ID, param_frame(motor_id, op, rid, value))
        master = motor_id + self.master_offset
        deadline = time.monotonic() + self.reply_timeout_s
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise BusTimeoutError(
                    f"no parameter reply (RID {rid}) from motor {motor_id} within {self.reply_timeout_s * 1000:.0f} ms"
                )
            data = bytes(msg.data)
            if (
                msg.arbitration_id == master
                and len(data) == FRAME_BYTES
                and data[2] == op
                and data[3] == rid
                and data[0] | (data[1] << 8) == motor_id
            ):
                return data[4:8]

    def _param_read_raw(self, motor_id: int, rid: int) -> int:
        return int(struct.unpack("<I", self._param_exchange(motor_id, PARAM_READ, rid))[0])

    def _drain(self) -> None:
        """Drop stale frames (late replies of a timed-out transaction) before a new one."""
        while self._receive(0.0) is not None:
            pass
