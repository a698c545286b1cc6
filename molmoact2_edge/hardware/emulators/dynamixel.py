"""Emulated chain of Dynamixel X-series servos on a pty, speaking protocol 2.0.

``dynamixel_sdk`` talks to it unchanged: header ``FF FF FD 00``, byte stuffing, CRC-16 (0x8005),
status packets ``... 55 ERR params CRC``. Instructions: PING (model number + firmware), READ,
WRITE, REG_WRITE, ACTION, FACTORY_RESET (keeps the id), REBOOT, SYNC_READ (one status packet per
listed servo, in order), SYNC_WRITE (no reply). Like a servo it stays silent on a bad CRC or an
unknown id, waits Return_Delay_Time x 2 us (factory 500 us) before answering, honours
Status_Return_Level (0 ping only, 1 + reads, 2 all), refuses writes to read-only registers and
EEPROM writes with torque on (access error 7), and sets the hardware-alert bit (0x80) of the
error byte while Hardware_Error_Status is non-zero (``set_register(id, "Hardware_Error_Status",
0x20)`` = overload). Present = Actual + Homing_Offset. Not emulated: Bus_Watchdog,
Fast Sync Read, bulk read/write, current/PWM control modes.

The positions API (``goal_positions``, ``set_present_positions``, faults, write log) is the one
of ``SerialServoChain``, shared with the Feetech emulator.
"""

from __future__ import annotations

import functools
import logging

from molmoact2_edge.hardware.buses.dynamixel_tables import (
    BAUD_RATES,
    BROADCAST_ID,
    HARDWARE_ALERT,
    HEADER,
    RETURN_DELAY_UNIT_S,
    VELOCITY_UNIT_STEPS_S,
    X_SERIES_CONTROL_TABLE,
    Instruction,
    decode_frame,
    find_frame,
    status_packet,
)
from molmoact2_edge.hardware.emulators.serial_chain import SerialServoChain, Servo

logger = logging.getLogger(__name__)

ACCESS_ERROR = 7
INSTRUCTION_ERROR = 2


@functools.cache
def _write_range_areas(address: int, length: int) -> tuple[bool, bool]:
    """(touches a read-only register, touches EEPROM) for a write range; resolved once per range."""
    touched = [
        reg
        for reg in X_SERIES_CONTROL_TABLE.values()
        if reg.address < address + length and address < reg.address + reg.size
    ]
    return any(not reg.writable for reg in touched), any(reg.area == "eeprom" for reg in touched)


class DynamixelEmulator(SerialServoChain):
    """X-series chain (XM430-W350 register file); constructor and API as ``SerialServoChain``."""

    control_table = X_SERIES_CONTROL_TABLE
    baud_rates = BAUD_RATES
    steps_per_turn = None  # 4-byte signed positions; extended-position mode goes past one turn
    homing_sign = 1  # Present = Actual + Homing_Offset
    velocity_unit_steps_s = VELOCITY_UNIT_STEPS_S
    return_delay_unit_s = RETURN_DELAY_UNIT_S

    header = HEADER
    find_frame = staticmethod(find_frame)
    decode_frame = staticmethod(decode_frame)

    def _handle(self, packet: bytes) -> list[tuple[int, bytes]]:
        request = decode_frame(packet)
        params, instruction = request.params, request.instruction
        if request.motor_id == BROADCAST_ID:
            return self._broadcast(instruction, params)
        servo = self._heard.get(request.motor_id)
        if servo is None:
            return []
        level = self._reg(servo, "Status_Return_Level")
        if instruction == Instruction.PING:
            info = self.control_table["Model_Number"].to_bytes(self._reg(servo, "Model_Number"))
            return [self._status(servo, 0, info + bytes([self._reg(servo, "Firmware_Version")]))]
        if instruction == Instruction.READ and len(params) == 4:
            address, length = int.from_bytes(params[:2], "little"), int.from_bytes(params[2:], "little")
            return [self._status(servo, 0, self._read_memory(servo, address, length))] if level >= 1 else []
        if instruction in (Instruction.WRITE, Instruction.REG_WRITE) and len(params) >= 3:
            address, data = int.from_bytes(params[:2], "little"), params[2:]
            error = self._write_error(servo, address, len(data))
            if not error:
                if instruction == Instruction.WRITE:
                    self._write_memory(servo, address, data)
                else:
                    servo.pending.append((address, data))
            return [self._status(servo, error)] if level >= 2 else []
        if instruction == Instruction.ACTION:
            self._action(servo)
        elif instruction == Instruction.FACTORY_RESET:
            self._factory_reset(servo)
        elif instruction == Instruction.REBOOT:
            self._poke(servo, "Torque_Enable", 0)
            self._poke(servo, "Hardware_Error_Status", 0)
        else:
            return [self._status(servo, INSTRUCTION_ERROR)] if level >= 2 else []
        return [self._status(servo, 0)] if level >= 2 else []

    def _broadcast(self, instruction: int, params: bytes) -> list[tuple[int, bytes]]:
        if instruction == Instruction.SYNC_READ and len(params) >= 5:
            address, length = int.from_bytes(params[:2], "little"), int.from_bytes(params[2:4], "little")
            return [
                self._status(self._heard[i], 0, self._read_memory(self._heard[i], address, length))
                for i in params[4:]
                if i in self._heard
            ]
        if instruction == Instruction.SYNC_WRITE and len(params) >= 4:
            address, length = int.from_bytes(params[:2], "little"), int.from_bytes(params[2:4], "little")
            body = params[4:]
            for offset in range(0, len(body) - length, length + 1):
                servo = self._heard.get(body[offset])
                if servo is not None and not self._write_error(servo, address, length):
                    self._write_memory(servo, address, body[offset + 1 : offset + 1 + length])
        elif instruction == Instruction.ACTION:
            for servo in list(self._heard.values()):
                self._action(servo)
        return []

    def _write_error(self, servo: Servo, address: int, length: int) -> int:
        """Access error (7) for a range touching a read-only register, or EEPROM with torque on."""
        read_only, eeprom = _write_range_areas(address, length)
        return ACCESS_ERROR if read_only or (eeprom and self._reg(servo, "Torque_Enable")) else 0

    def _relabel(self, reply: bytes, motor_id: int) -> bytes:
        status = decode_frame(reply)  # params = error byte + data
        return status_packet(motor_id, status.params[0], status.params[1:])

    def _status(self, servo: Servo, error: int, data: bytes = b"") -> tuple[int, bytes]:
        if self._reg(servo, "Hardware_Error_Status"):
            error |= HARDWARE_ALERT
        return servo.motor_id, status_packet(servo.motor_id, error, data)
