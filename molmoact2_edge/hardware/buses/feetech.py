"""Feetech STS/SMS servo bus: our own implementation of the FT-SCS wire protocol over pyserial.

Protocol (Feetech SCS/STS, "protocol_end 0", reference ``servo-buses.md`` §1.2):

- UART 8N1, half-duplex, default 1 Mbps; multi-byte values little-endian.
- Instruction ``FF FF | ID | LEN | INSTR | params | CHK``, ``LEN = len(params) + 2``.
- Status      ``FF FF | ID | LEN | ERR   | data   | CHK``, ``LEN = len(data) + 2``.
- ``CHK = ~(ID + LEN + INSTR/ERR + sum(params)) & 0xFF``.
- SYNC_READ (0x82, ID 0xFE, params ``addr, len, id1..idN``): each listed servo answers with its
  own status packet, back to back. SYNC_WRITE (0x83, ID 0xFE, params ``addr, len, (id, data)*``)
  is never answered.

Why not the vendor SDK: it waits for exactly ``(6+len)*N`` bytes on a sync read, so one silent
servo turns into "Incorrect status packet" for all six, its ``clearPort`` does not drop stale
input, and its timeouts are a fixed 50 ms. Here every transaction drops stale input first
(``reset_input_buffer``), waits for a deadline computed from the wire time of the bytes it
expects, and names the motor that stayed silent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from molmoact2_edge.errors import BusTimeoutError, ChecksumError, PortError, ServoError
from molmoact2_edge.hardware.buses.base import PORT_HINT, Bus, serial_io_errors, wire_time_s
from molmoact2_edge.hardware.buses.feetech_tables import (
    ERROR_FLAGS,
    MODEL_NUMBERS,
    STS3215_CONTROL_TABLE,
)
from molmoact2_edge.hardware.buses.registers import Register

logger = logging.getLogger(__name__)

HEADER = b"\xff\xff"
BROADCAST_ID = 0xFE
STATUS_OVERHEAD = 6  # FF FF ID LEN ERR CHK
WRITE_TIMEOUT_S = 1.0  # a write that cannot finish this long: the adapter is gone or stuck
INSTRUCTION_OVERHEAD = 6  # FF FF ID LEN INSTR CHK


class Instruction(IntEnum):
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REG_WRITE = 0x04
    ACTION = 0x05
    RESET = 0x0A
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83


# --- packets --------------------------------------------------------------------------------------


def checksum(body: bytes | bytearray) -> int:
    """Checksum over ``ID, LEN, INSTR/ERR, params`` (the header is excluded)."""
    return ~sum(body) & 0xFF


def _frame(motor_id: int, code: int, payload: bytes) -> bytes:
    body = bytes([motor_id, len(payload) + 2, code]) + payload
    return HEADER + body + bytes([checksum(body)])


def instruction_packet(motor_id: int, instruction: int, params: bytes = b"") -> bytes:
    """``FF FF ID LEN INSTR params CHK``."""
    if not 0 <= motor_id <= BROADCAST_ID:
        raise ValueError(f"Feetech motor id must be 0..{BROADCAST_ID}, got {motor_id}")
    return _frame(motor_id, instruction, params)


def status_packet(motor_id: int, error: int, data: bytes = b"") -> bytes:
    """``FF FF ID LEN ERR data CHK`` (what a servo sends back)."""
    return _frame(motor_id, error, data)


@dataclass(frozen=True)
class Packet:
    motor_id: int
    code: int  # instruction (host -> servo) or error byte (servo -> host)
    params: bytes


def find_frame(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """Locate the first complete frame: ``(start, end)`` indices, or ``None`` if more bytes are
    needed. Bytes before ``start`` are line noise and may be dropped."""
    start = buffer.find(HEADER)
    # "FF FF FF <id>" is a header preceded by noise: the id is never 0xFF
    while start >= 0 and start + 2 < len(buffer) and buffer[start + 2] == 0xFF:
        start += 1
    if start < 0 or len(buffer) < start + 4:
        return None
    end = start + 4 + buffer[start + 3]
    return (start, end) if len(buffer) >= end else None


def decode_frame(frame: bytes | bytearray) -> Packet:
    """Check one frame's length byte and checksum; raises ``ChecksumError``."""
    if len(frame) < INSTRUCTION_OVERHEAD or frame[:2] != HEADER or frame[3] != len(frame) - 4:
        raise ChecksumError(f"malformed packet {bytes(frame).hex(' ')}")
    expected = checksum(frame[2:-1])
    if frame[-1] != expected:
        raise ChecksumError(
            f"checksum 0x{frame[-1]:02x} != 0x{expected:02x} in packet {bytes(frame).hex(' ')}"
        )
    return Packet(frame[2], frame[4], bytes(frame[5:-1]))


class SyncWriteTemplate:
    """A SYNC_WRITE of one register to fixed motor ids, laid out once: per call only the values are
    packed (``struct``) and the checksum summed, no packet assembly or dict building."""

    _FORMATS = {1: "B", 2: "H", 4: "I"}

    def __init__(self, address: int, size: int, motor_ids: Sequence[int]):
        self.motor_ids = tuple(motor_ids)
        length = 2 + 2 + len(self.motor_ids) * (1 + size)  # INSTR, addr, size, (id, data)*, CHK
        self._head = HEADER + bytes([BROADCAST_ID, length, Instruction.SYNC_WRITE, address, size])
        self._head_sum = BROADCAST_ID + length + Instruction.SYNC_WRITE + address + size
        self._body = struct.Struct("<" + ("B" + self._FORMATS[size]) * len(self.motor_ids))

    def packet(self, values: Sequence[int]) -> bytes:
        """The packet for raw ``values``, in ``motor_ids`` order."""
        body = self._body.pack(*[x for pair in zip(self.motor_ids, values, strict=True) for x in pair])
        return self._head + body + bytes([~(self._head_sum + sum(body)) & 0xFF])


def decode_error_flags(error: int) -> tuple[str, ...]:
    """Status error byte -> flag names, e.g. ``0x20 -> ("overload",)``."""
    return tuple(ERROR_FLAGS.get(bit, f"bit{bit}") for bit in range(8) if error & (1 << bit))


def transaction_timeout_s(
    tx_bytes: int, rx_bytes: int, replies: int, baudrate: int, return_delay_s: float, margin_s: float
) -> float:
    """Deadline for one transaction: wire time of everything sent and expected back, one return
    delay per reply, plus a margin for USB scheduling and the host (a CH343/FTDI adapter adds
    >= 1 ms per direction, reference §4)."""
    return wire_time_s(tx_bytes + rx_bytes, baudrate) + replies * return_delay_s + margin_s


# --- the bus ---------------------------------------------------------------------------------------


class FeetechBus(Bus):
    """STS3215 chain on a serial port (SO-100 / SO-101 arms).

    Args:
        port, baudrate, retries: see ``Bus``.
        return_delay_s: per-servo turnaround assumed in timeouts (STS3215 real value
            unverified, reference §4; SMS servos clamp to >= 100 us).
        timeout_margin_s: added to every transaction deadline for USB latency and host jitter.
        ack_writes: wait for the WRITE status packet (servo Response_Status_Level = 1, the
            default). Set False for servos configured with level 0.
    """

    control_table = STS3215_CONTROL_TABLE
    model_numbers = MODEL_NUMBERS
    default_baudrate = 1_000_000
    protocol = "feetech"

    def __init__(
        self,
        port: str,
        *,
        baudrate: int | None = None,
        retries: int = 2,
        return_delay_s: float = 100e-6,
        timeout_margin_s: float = 0.010,
        ack_writes: bool = True,
    ):
        super().__init__(port, baudrate=baudrate, retries=retries)
        self.return_delay_s = return_delay_s
        self.timeout_margin_s = timeout_margin_s
        self.ack_writes = ack_writes
        self._serial: Any = None
        self._fd = -1  # POSIX: the port's file descriptor, written and read directly
        # precomputed per (address, size, ids): a control loop repeats the same two transactions
        self._sync_reads: dict[tuple[int, int, tuple[int, ...]], bytes] = {}
        self._sync_writes: dict[tuple[int, int, tuple[int, ...]], SyncWriteTemplate] = {}

    # --- extra Feetech operations

    def reg_write(self, register: str | Register, motor_id: int, value: int) -> None:
        """Stage a write that takes effect on the next ``action()`` (REG_WRITE)."""
        reg = self._writable(register)
        payload = bytes([reg.address]) + reg.to_bytes(value)
        self._run(
            "reg_write", reg, [motor_id], lambda: self._command(motor_id, Instruction.REG_WRITE, payload)
        )

    def action(self) -> None:
        """Broadcast ACTION: every servo applies its staged REG_WRITE at once (no reply)."""
        self._run(
            "action",
            None,
            [BROADCAST_ID],
            lambda: self._send(instruction_packet(BROADCAST_ID, Instruction.ACTION)),
        )

    # --- primitives

    def _connect_internal(self) -> None:
        import serial  # pyserial; imported here so the module loads without it

        try:
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0, write_timeout=WRITE_TIMEOUT_S)
        except (serial.SerialException, ValueError) as err:
            raise PortError(
                f"could not open {self.port} at {self.baudrate} baud: {err}. {PORT_HINT}"
            ) from err
        self._fd = self._serial.fileno() if os.name != "nt" else -1

    def _disconnect_internal(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except OSError as err:  # the adapter may already be gone; closing must not raise
                logger.warning("closing %s: %s", self.port, err)
            self._serial = None
            self._fd = -1

    def _set_baudrate_internal(self, baudrate: int) -> None:
        self._serial.baudrate = baudrate

    def _ping_internal(self, motor_id: int) -> int:
        self._transact(instruction_packet(motor_id, Instruction.PING), [motor_id], 0)
        # PING carries no data; the model number is register 3 (2 bytes)
        model = self.control_table["Model_Number"]
        return self._read_internal(model, motor_id)

    def _read_internal(self, reg: Register, motor_id: int) -> int:
        packet = instruction_packet(motor_id, Instruction.READ, bytes([reg.address, reg.size]))
        data = self._transact(packet, [motor_id], reg.size)[motor_id]
        return int.from_bytes(data, "little")

    def _write_internal(self, reg: Register, motor_id: int, raw: int) -> None:
        payload = bytes([reg.address]) + raw.to_bytes(reg.size, "little")
        self._command(motor_id, Instruction.WRITE, payload)

    def _sync_read_internal(self, reg: Register, motor_ids: list[int]) -> dict[int, int]:
        key = (reg.address, reg.size, tuple(motor_ids))
        packet = self._sync_reads.get(key)
        if packet is None:
            packet = instruction_packet(
                BROADCAST_ID, Instruction.SYNC_READ, bytes([reg.address, reg.size, *motor_ids])
            )
            self._sync_reads[key] = packet
        replies = self._transact(packet, motor_ids, reg.size)
        return {i: int.from_bytes(data, "little") for i, data in replies.items()}

    def _sync_write_internal(self, reg: Register, raw: Mapping[int, int]) -> None:
        key = (reg.address, reg.size, tuple(raw))
        template = self._sync_writes.get(key)
        if template is None:
            template = self._sync_writes[key] = SyncWriteTemplate(reg.address, reg.size, key[2])
        self._send(template.packet(list(raw.values())))

    # --- transactions

    def _command(self, motor_id: int, instruction: Instruction, payload: bytes) -> None:
        packet = instruction_packet(motor_id, instruction, payload)
        if self.ack_writes and motor_id != BROADCAST_ID:
            self._transact(packet, [motor_id], 0)
        else:
            self._send(packet)

    def _send(self, packet: bytes) -> None:
        try:
            self._serial.reset_input_buffer()  # stale replies from an earlier timeout must not match
            if self._fd < 0:
                self._serial.write(packet)
            else:
                self._write_fd(packet)
        except serial_io_errors() as err:
            raise PortError(f"write failed ({err}); was the adapter unplugged?") from err

    def _write_fd(self, packet: bytes) -> None:
        """POSIX: ``os.write`` straight to the (non-blocking) port; pyserial's ``write`` adds a
        ``select`` and timeout bookkeeping to every call, which costs more than the write."""
        view = memoryview(packet)
        deadline = time.perf_counter() + WRITE_TIMEOUT_S
        while view:
            with contextlib.suppress(BlockingIOError):  # output buffer full: wait below until it drains
                view = view[os.write(self._fd, view) :]
            if view and not select.select([], [self._fd], [], max(deadline - time.perf_counter(), 0))[1]:
                raise PortError(
                    f"write did not complete within {WRITE_TIMEOUT_S:.0f} s; is the adapter stuck?"
                )

    def _transact(self, packet: bytes, motor_ids: list[int], data_len: int) -> dict[int, bytes]:
        """Send ``packet`` and collect one status packet with ``data_len`` data bytes from each
        of ``motor_ids`` (in any order) before the computed deadline."""
        reply_len = STATUS_OVERHEAD + data_len
        timeout = transaction_timeout_s(
            len(packet),
            reply_len * len(motor_ids),
            len(motor_ids),
            self.baudrate,
            self.return_delay_s,
            self.timeout_margin_s,
        )
        self._send(packet)
        deadline = time.perf_counter() + timeout
        pending = set(motor_ids)
        replies: dict[int, bytes] = {}
        errors: dict[int, int] = {}
        buffer = bytearray()
        while pending:
            span = find_frame(buffer)
            if span is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise BusTimeoutError(self._silence_detail(sorted(pending), timeout, buffer))
                buffer += self._read_bytes(reply_len * len(pending) - len(buffer), remaining)
                continue
            start, end = span
            status = decode_frame(buffer[start:end])
            del buffer[:end]
            if status.motor_id not in pending or len(status.params) != data_len:
                raise ChecksumError(
                    f"unexpected status packet from id {status.motor_id} with {len(status.params)} data "
                    f"bytes (expected {data_len} from {sorted(pending)})"
                )
            pending.discard(status.motor_id)
            replies[status.motor_id] = status.params
            if status.code:
                errors[status.motor_id] = status.code
        if errors:
            motor_id, error = next(iter(errors.items()))
            flags = decode_error_flags(error)
            others = f" (also motors {sorted(errors)[1:]})" if len(errors) > 1 else ""
            raise ServoError(
                f"motor {motor_id} reported {', '.join(flags)} (error byte 0x{error:02x}){others}",
                motor_id=motor_id,
                flags=flags,
            )
        return replies

    def _read_bytes(self, wanted: int, timeout: float) -> bytes:
        """Whatever arrives within ``timeout`` (up to ``wanted`` bytes); b"" on timeout."""
        try:
            if os.name == "nt":
                self._serial.timeout = timeout
                return self._serial.read(max(wanted, 1))
            # POSIX: select + os.read directly; setting pyserial's timeout reconfigures the tty
            # (a tcsetattr per call), which costs more than the read itself
            if not select.select([self._fd], [], [], timeout)[0]:
                return b""
            data = os.read(self._fd, max(wanted, 1))
        except serial_io_errors() as err:
            raise PortError(f"read failed ({err}); was the adapter unplugged?") from err
        if not data:
            raise PortError("the port reported end of file; was the adapter unplugged?")
        return data

    @staticmethod
    def _silence_detail(pending: list[int], timeout: float, buffer: bytearray) -> str:
        who = f"motor {pending[0]}" if len(pending) == 1 else f"motors {pending}"
        partial = f", {len(buffer)} stray bytes received" if buffer else ""
        return f"no status packet from {who} within {timeout * 1e3:.1f} ms{partial}"
