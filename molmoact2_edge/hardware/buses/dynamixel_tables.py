"""Dynamixel protocol 2.0: X-series control table and the packet format, as data and small functions.

Control table: LeRobot ``motors/dynamixel/tables.py`` (``X_SERIES_CONTROL_TABLE``) = ROBOTIS
``xm430_w350.model`` (https://emanual.robotis.com/docs/en/dxl/x/xm430-w350/); defaults from the
e-manual, only seeding the emulator. Packet format: ROBOTIS e-manual "Protocol 2.0"
(https://emanual.robotis.com/docs/en/dxl/protocol2/), reference ``servo-buses.md`` §2.3.

Instruction ``FF FF FD 00 | ID | LEN_L LEN_H | INST | params | CRC_L CRC_H``, LEN = params + 3.
Status      ``FF FF FD 00 | ID | LEN_L LEN_H | 55 | ERR | params | CRC_L CRC_H``.
CRC-16 (poly 0x8005, init 0, no reflection) over every byte before the CRC, after byte stuffing:
inside INST..params any ``FF FF FD`` is followed by an extra ``FD``. The driver side uses
``dynamixel_sdk``; these functions serve the emulator and the golden tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from molmoact2_edge.errors import ChecksumError
from molmoact2_edge.hardware.buses.registers import TWOS_COMPLEMENT, UNSIGNED, ControlTable, Register

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
STATUS = 0x55


class Instruction(IntEnum):
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REG_WRITE = 0x04
    ACTION = 0x05
    FACTORY_RESET = 0x06
    REBOOT = 0x08
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83


def _ro(name: str, address: int, size: int, default: int = 0, signed: bool = False) -> Register:
    encoding = TWOS_COMPLEMENT if signed else UNSIGNED
    return Register(name, address, size, encoding, writable=False, default=default)


def _ee(name: str, address: int, size: int, default: int = 0, signed: bool = False) -> Register:
    encoding = TWOS_COMPLEMENT if signed else UNSIGNED
    return Register(name, address, size, encoding, area="eeprom", default=default)


def _rw(name: str, address: int, size: int, default: int = 0, signed: bool = False) -> Register:
    return Register(name, address, size, TWOS_COMPLEMENT if signed else UNSIGNED, default=default)


XM430_W350_MODEL_NUMBER = 1020

X_SERIES_CONTROL_TABLE = ControlTable(
    "x_series",
    [
        # --- EEPROM (writable only with torque off)
        _ro("Model_Number", 0, 2, XM430_W350_MODEL_NUMBER),
        _ro("Model_Information", 2, 4),
        _ro("Firmware_Version", 6, 1, 45),
        _ee("ID", 7, 1, 1),
        _ee("Baud_Rate", 8, 1, 1),  # index into BAUD_RATES; factory 57600
        _ee("Return_Delay_Time", 9, 1, 250),  # 2 us units: 500 us per reply unless set to 0
        _ee("Drive_Mode", 10, 1),
        _ee(
            "Operating_Mode", 11, 1, 3
        ),  # 0 current, 1 velocity, 3 position, 4 extended, 5 current-based, 16 PWM
        _ee("Secondary_ID", 12, 1, 255),
        _ee("Protocol_Type", 13, 1, 2),
        _ee("Homing_Offset", 20, 4, signed=True),  # Present = Actual + Homing_Offset
        _ee("Moving_Threshold", 24, 4, 10),
        _ee("Temperature_Limit", 31, 1, 80),
        _ee("Max_Voltage_Limit", 32, 2, 160),
        _ee("Min_Voltage_Limit", 34, 2, 95),
        _ee("PWM_Limit", 36, 2, 885),
        _ee("Current_Limit", 38, 2, 1193),
        _ee("Acceleration_Limit", 40, 4, 32767),
        _ee("Velocity_Limit", 44, 4, 200),
        _ee("Max_Position_Limit", 48, 4, 4095),
        _ee("Min_Position_Limit", 52, 4, 0),
        _ee("Shutdown", 63, 1, 52),
        # --- RAM
        _rw("Torque_Enable", 64, 1),
        _rw("LED", 65, 1),
        _rw("Status_Return_Level", 68, 1, 2),  # 0 ping only, 1 + reads, 2 all
        _ro("Registered_Instruction", 69, 1),
        _ro("Hardware_Error_Status", 70, 1),
        _rw("Velocity_I_Gain", 76, 2, 1920),
        _rw("Velocity_P_Gain", 78, 2, 100),
        _rw("Position_D_Gain", 80, 2),
        _rw("Position_I_Gain", 82, 2),
        _rw("Position_P_Gain", 84, 2, 800),
        _rw("Feedforward_2nd_Gain", 88, 2),
        _rw("Feedforward_1st_Gain", 90, 2),
        _rw("Bus_Watchdog", 98, 1, signed=True),  # 1..127 x 20 ms; -1 = tripped
        _rw("Goal_PWM", 100, 2, 885, signed=True),
        _rw("Goal_Current", 102, 2, 1193, signed=True),
        _rw("Goal_Velocity", 104, 4, signed=True),
        _rw("Profile_Acceleration", 108, 4),
        _rw("Profile_Velocity", 112, 4),
        _rw("Goal_Position", 116, 4, signed=True),
        _ro("Realtime_Tick", 120, 2),
        _ro("Moving", 122, 1),
        _ro("Moving_Status", 123, 1),
        _ro("Present_PWM", 124, 2, signed=True),
        _ro("Present_Current", 126, 2, signed=True),
        _ro("Present_Velocity", 128, 4, signed=True),  # 0.229 rpm units
        _ro("Present_Position", 132, 4, 2048, signed=True),
        _ro("Velocity_Trajectory", 136, 4, signed=True),
        _ro("Position_Trajectory", 140, 4, signed=True),
        _ro("Present_Input_Voltage", 144, 2, 120),
        _ro("Present_Temperature", 146, 1, 30),
    ],
)

BAUD_RATES = {0: 9_600, 1: 57_600, 2: 115_200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000}

MODEL_NUMBERS = {
    1020: "xm430-w350",
    1060: "xl430-w250",
    1190: "xl330-m077",
    1200: "xl330-m288",
    1120: "xm540-w270",
    1070: "xc430-w150",
}

# Status error byte: bit 7 = hardware alert (details in Hardware_Error_Status), low 7 bits = code.
ERROR_CODES = {
    1: "result_fail",
    2: "instruction_error",
    3: "crc_error",
    4: "data_range_error",
    5: "data_length_error",
    6: "data_limit_error",
    7: "access_error",
}
HARDWARE_ALERT = 0x80
HARDWARE_ERROR_FLAGS = {
    0: "input_voltage",
    2: "overheat",
    3: "motor_encoder",
    4: "electrical_shock",
    5: "overload",
}

RETURN_DELAY_UNIT_S = 2e-6
VELOCITY_UNIT_STEPS_S = 0.229 * 4096 / 60  # 0.229 rpm


def decode_error_flags(error: int, hardware_status: int = 0) -> tuple[str, ...]:
    """Status error byte (+ Hardware_Error_Status when the alert bit is set) -> flag names."""
    flags = [ERROR_CODES.get(error & 0x7F, f"error_{error & 0x7F}")] if error & 0x7F else []
    if error & HARDWARE_ALERT:
        flags.append("hardware_alert")
        flags += [HARDWARE_ERROR_FLAGS.get(b, f"hw_bit{b}") for b in range(8) if hardware_status & (1 << b)]
    return tuple(flags)


# --- packets --------------------------------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/BUYPASS (poly 0x8005, init 0, MSB first), as in the ROBOTIS e-manual."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]) & 0xFFFF
    return crc


def stuff(body: bytes) -> bytes:
    """Insert ``FD`` after every ``FF FF FD`` so the payload never looks like a header."""
    out = bytearray()
    for byte in body:
        out.append(byte)
        if out[-3:] == b"\xff\xff\xfd":
            out.append(0xFD)
    return bytes(out)


def unstuff(body: bytes) -> bytes:
    out = bytearray()
    for byte in body:
        if byte == 0xFD and out[-3:] == b"\xff\xff\xfd":
            continue  # the stuffing byte
        out.append(byte)
    return bytes(out)


def _frame(motor_id: int, payload: bytes) -> bytes:
    body = stuff(payload)
    head = HEADER + bytes([motor_id]) + (len(body) + 2).to_bytes(2, "little")
    crc = crc16(head + body)
    return head + body + crc.to_bytes(2, "little")


def instruction_packet(motor_id: int, instruction: int, params: bytes = b"") -> bytes:
    return _frame(motor_id, bytes([instruction]) + params)


def status_packet(motor_id: int, error: int, params: bytes = b"") -> bytes:
    return _frame(motor_id, bytes([STATUS, error]) + params)


@dataclass(frozen=True)
class Packet:
    motor_id: int
    instruction: int  # 0x55 for status packets
    params: bytes  # unstuffed; for status packets the error byte comes first


def find_frame(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """``(start, end)`` of the first complete frame, or ``None`` if more bytes are needed."""
    start = buffer.find(HEADER)
    if start < 0 or len(buffer) < start + 7:
        return None
    end = start + 7 + int.from_bytes(buffer[start + 5 : start + 7], "little")
    return (start, end) if len(buffer) >= end else None


def decode_frame(frame: bytes | bytearray) -> Packet:
    """Check the CRC of one frame and unstuff it; raises ``ChecksumError``."""
    frame = bytes(frame)
    if len(frame) < 10 or frame[:4] != HEADER or int.from_bytes(frame[5:7], "little") != len(frame) - 7:
        raise ChecksumError(f"malformed packet {frame.hex(' ')}")
    expected = crc16(frame[:-2])
    received = int.from_bytes(frame[-2:], "little")
    if received != expected:
        raise ChecksumError(f"CRC 0x{received:04x} != 0x{expected:04x} in packet {frame.hex(' ')}")
    payload = unstuff(frame[7:-2])
    return Packet(frame[4], payload[0], payload[1:])
