"""Emulated chain of Feetech STS3215 servos on a pty, speaking the FT-SCS protocol.

Usage::

    with FeetechEmulator([1, 2, 3, 4, 5, 6]) as emu:
        with FeetechBus(emu.port) as bus:
            bus.write("Goal_Position", 1, 2100)  # acknowledged, so already applied
        emu.goal_positions()  # {1: 2100, 2: 0, ...}

What a servo does and this emulator does too: answers PING/READ/WRITE/REG_WRITE/ACTION/RESET and
SYNC_READ (one status packet per listed servo, in list order) / SYNC_WRITE (no reply); stays silent
on a bad checksum or an id it does not have; puts its Status register in the error byte of every
status packet (``set_register(id, "Status", 0x20)`` = overload), plus the voltage and overheat bits
while Present_Voltage / Present_Temperature are outside their limit registers; waits
Return_Delay_Time x 2 us before answering; does not answer WRITEs when Response_Status_Level = 0;
ignores writes to read-only registers; Present = Actual - Homing_Offset. Not emulated: Lock/EEPROM
persistence across power cycles, Torque_Enable = 128 recentring, broadcast PING,
current and load physics. Baud rates: see ``SerialServoChain``.
"""

from __future__ import annotations

import logging

from molmoact2_edge.hardware.buses.feetech import (
    BROADCAST_ID,
    HEADER,
    Instruction,
    decode_frame,
    find_frame,
    status_packet,
)
from molmoact2_edge.hardware.buses.feetech_tables import (
    BAUD_RATES,
    RETURN_DELAY_UNIT_S,
    STS3215_CONTROL_TABLE,
)
from molmoact2_edge.hardware.emulators.serial_chain import SerialServoChain, Servo

logger = logging.getLogger(__name__)

_STATUS, _VOLTAGE, _MIN_VOLTAGE, _MAX_VOLTAGE, _TEMPERATURE, _MAX_TEMPERATURE = (
    STS3215_CONTROL_TABLE[name].address
    for name in (
        "Status",
        "Present_Voltage",
        "Min_Voltage_Limit",
        "Max_Voltage_Limit",
        "Present_Temperature",
        "Max_Temperature_Limit",
    )
)


class FeetechEmulator(SerialServoChain):
    """STS3215 chain; see ``SerialServoChain`` for the constructor and the test/simulator API."""

    control_table = STS3215_CONTROL_TABLE
    baud_rates = BAUD_RATES
    steps_per_turn = 4096
    homing_sign = -1  # Present = Actual - Homing_Offset
    velocity_unit_steps_s = 50.0  # 0.732 rpm
    return_delay_unit_s = RETURN_DELAY_UNIT_S

    header = HEADER
    find_frame = staticmethod(find_frame)
    decode_frame = staticmethod(decode_frame)

    def _handle(self, packet: bytes) -> list[tuple[int, bytes]]:
        request = decode_frame(packet)
        params = request.params
        if request.motor_id == BROADCAST_ID:
            return self._broadcast(request.code, params)
        servo = self._heard.get(request.motor_id)
        if servo is None:
            return []
        instruction = request.code
        if instruction == Instruction.PING:
            return [self._status(servo)]
        if instruction == Instruction.READ and len(params) == 2:
            return [self._status(servo, self._read_memory(servo, params[0], params[1]))]
        if instruction == Instruction.WRITE and len(params) >= 2:
            self._write_memory(servo, params[0], params[1:])
        elif instruction == Instruction.REG_WRITE and len(params) >= 2:
            servo.pending.append((params[0], params[1:]))
        elif instruction == Instruction.ACTION:
            self._action(servo)
        elif instruction == Instruction.RESET:
            self._factory_reset(servo)
        else:
            logger.debug("emulated servo %d ignored instruction 0x%02x", servo.motor_id, instruction)
            return []
        # Response_Status_Level 0: only READ and PING are answered
        return [self._status(servo)] if self._reg(servo, "Response_Status_Level") else []

    def _broadcast(self, instruction: int, params: bytes) -> list[tuple[int, bytes]]:
        if instruction == Instruction.SYNC_READ and len(params) >= 3:
            address, length = params[0], params[1]
            return [
                self._status(self._heard[i], self._read_memory(self._heard[i], address, length))
                for i in params[2:]
                if i in self._heard
            ]
        if instruction == Instruction.SYNC_WRITE and len(params) >= 2:
            address, length = params[0], params[1]
            body = params[2:]
            for offset in range(0, len(body) - length, length + 1):
                servo = self._heard.get(body[offset])
                if servo is not None:
                    self._write_memory(servo, address, body[offset + 1 : offset + 1 + length])
        elif instruction == Instruction.ACTION:
            for servo in list(self._heard.values()):
                self._action(servo)
        elif instruction == Instruction.WRITE and len(params) >= 2:
            for servo in list(self._heard.values()):
                self._write_memory(servo, params[0], params[1:])
        return []  # broadcasts other than SYNC_READ are never answered

    def _relabel(self, reply: bytes, motor_id: int) -> bytes:
        status = decode_frame(reply)
        return status_packet(motor_id, status.code, status.params)

    def _status(self, servo: Servo, data: bytes = b"") -> tuple[int, bytes]:
        return servo.motor_id, status_packet(servo.motor_id, self._error_byte(servo), data)

    def _error_byte(self, servo: Servo) -> int:
        """The Status register, plus what the servo derives itself from its limit registers (all
        1-byte unsigned registers: read straight from memory, this runs for every reply)."""
        memory = servo.memory
        error = memory[_STATUS]
        if not memory[_MIN_VOLTAGE] <= memory[_VOLTAGE] <= memory[_MAX_VOLTAGE]:
            error |= 1 << 0
        if memory[_TEMPERATURE] > memory[_MAX_TEMPERATURE]:
            error |= 1 << 2
        return error
