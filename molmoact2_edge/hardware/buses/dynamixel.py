"""Dynamixel X-series bus (protocol 2.0) through ROBOTIS ``dynamixel_sdk``.

The SDK does the framing (CRC, byte stuffing); this class maps its ``(result, error)`` codes to
the typed errors of ``Bus``:

=================================  ===================
SDK result / error byte            raised
=================================  ===================
COMM_RX_TIMEOUT (-3001)            BusTimeoutError
COMM_RX_CORRUPT (-3002)            ChecksumError
COMM_TX_FAIL / port exceptions     PortError
status error byte != 0             ServoError (flags; Hardware_Error_Status decoded on an alert)
=================================  ===================

Two deliberate departures from plain SDK use:

- Sync reads send with ``GroupSyncRead.txPacket()`` but receive with ``PacketHandler.readRx``
  per motor, because ``GroupSyncRead.rxPacket`` drops each reply's error byte.
- The packet timeout is wire time + ``timeout_margin_s`` instead of the SDK's wire time +
  2 x LATENCY_TIMER (16 ms) + 2 ms = 34 ms (``setPacketTimeout`` overridden in a subclass, not
  monkey-patched). The margin must cover N x Return_Delay_Time (factory 250 x 2 us = 500 us per
  servo; LeRobot writes 0) and USB latency (set FTDI ``latency_timer`` to 1 ms).
- ``readPort`` waits in ``select`` for data instead of the SDK's busy loop of zero-timeout reads
  (POSIX; the same subclass).
- Every status packet's data length is checked against what was asked for. The SDK's
  ``readTxRx``/``readRx`` slice ``length`` bytes from the packet without checking its LENGTH field,
  so a CRC-valid 1-byte reply to a 4-byte read returns the data byte plus the CRC as a value. A
  ``PacketHandler`` subclass keeps the last status packet the SDK received, and a wrong length is a
  ``ChecksumError`` (retried like a bad CRC).

``dynamixel_sdk`` is imported inside the class, so importing this module never needs it.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Mapping
from typing import Any

from molmoact2_edge.errors import (
    BusTimeoutError,
    ChecksumError,
    DependencyError,
    PortError,
    ServoError,
)
from molmoact2_edge.hardware.buses.base import PORT_HINT, Bus, serial_io_errors
from molmoact2_edge.hardware.buses.dynamixel_tables import (
    HARDWARE_ALERT,
    MODEL_NUMBERS,
    X_SERIES_CONTROL_TABLE,
    decode_error_flags,
)
from molmoact2_edge.hardware.buses.registers import Register

logger = logging.getLogger(__name__)

COMM_SUCCESS = 0
COMM_RX_TIMEOUT = -3001
COMM_RX_CORRUPT = -3002

# status packet: FF FF FD 00 | ID | LEN_L LEN_H | 0x55 | ERR | data | CRC_L CRC_H; LEN counts
# 0x55 + ERR + data + CRC (after the SDK removed the byte stuffing)
STATUS_ID, STATUS_LENGTH, STATUS_DATA = 4, 5, 9
STATUS_LENGTH_OVERHEAD = 4
PING_DATA_BYTES = 3  # model number (2) + firmware version (1)


def _import_sdk() -> Any:
    try:
        import dynamixel_sdk
    except ImportError as err:
        raise DependencyError(
            "the Dynamixel bus needs dynamixel-sdk: pip install 'molmoact2-edge[hardware]' "
            "(or pip install dynamixel-sdk)"
        ) from err
    return dynamixel_sdk


def _port_handler(sdk: Any, port: str, margin_ms: float) -> Any:
    class PortHandler(sdk.PortHandler):  # type: ignore[misc, name-defined]
        def setPacketTimeout(self, packet_length: int) -> None:  # noqa: N802 (SDK name)
            # wire time of the expected bytes + our margin, not a fixed 2 x 16 ms latency timer
            self.packet_start_time = self.getCurrentTime()
            self.packet_timeout = self.tx_time_per_byte * packet_length + margin_ms

        def readPort(self, length: int) -> bytes:  # noqa: N802 (SDK name)
            # the SDK polls a zero-timeout read in a loop, burning a core the policy needs on a
            # Jetson; wait in select() for the first byte (bounded by the packet deadline) instead
            if os.name != "nt" and self.ser.in_waiting == 0:
                remaining_ms = self.packet_timeout - self.getTimeSinceStart()
                select.select([self.ser.fileno()], [], [], max(remaining_ms, 0.0) / 1e3)
            return self.ser.read(length)

    return PortHandler(port)


def _packet_handler(sdk: Any) -> Any:
    class PacketHandler(sdk.Protocol2PacketHandler):  # type: ignore[misc, name-defined]
        """Protocol 2.0 handler that keeps the last status packet, for the length check."""

        last_status: list[int] = []

        def rxPacket(self, port: Any, fast_option: bool) -> tuple[list[int], int]:  # noqa: N802 (SDK name)
            packet, result = super().rxPacket(port, fast_option)
            self.last_status = packet
            return packet, result

    return PacketHandler()


class DynamixelBus(Bus):
    """X-series chain (XL330, XL430, XM430, ...) on a U2D2 / USB serial adapter.

    Args:
        port, baudrate, retries: see ``Bus`` (default 1 Mbps, as LeRobot configures Koch arms;
            factory servos run at 57600).
        timeout_margin_s: added to the wire time of each expected reply.
    """

    control_table = X_SERIES_CONTROL_TABLE
    model_numbers = MODEL_NUMBERS
    default_baudrate = 1_000_000
    protocol = "dynamixel"

    def __init__(
        self, port: str, *, baudrate: int | None = None, retries: int = 2, timeout_margin_s: float = 0.010
    ):
        super().__init__(port, baudrate=baudrate, retries=retries)
        self.timeout_margin_s = timeout_margin_s
        self._sdk: Any = None
        self._port: Any = None
        self._packets: Any = None

    # --- primitives

    def _connect_internal(self) -> None:
        self._sdk = _import_sdk()
        self._port = _port_handler(self._sdk, self.port, self.timeout_margin_s * 1e3)
        self._packets = _packet_handler(self._sdk)
        try:
            opened = self._port.setBaudRate(self.baudrate)  # opens the port
        except serial_io_errors() as err:
            raise PortError(
                f"could not open {self.port} at {self.baudrate} baud: {err}. {PORT_HINT}"
            ) from err
        if not opened:
            raise PortError(f"{self.port}: baud rate {self.baudrate} is not supported by dynamixel_sdk")

    def _disconnect_internal(self) -> None:
        if self._port is not None and self._port.is_open:
            try:
                self._port.closePort()
            except serial_io_errors() as err:  # the adapter may already be gone
                logger.warning("closing %s: %s", self.port, err)

    def _set_baudrate_internal(self, baudrate: int) -> None:
        if not self._call(self._port.setBaudRate, baudrate):
            raise PortError(f"{self.port}: baud rate {baudrate} is not supported by dynamixel_sdk")

    def _ping_internal(self, motor_id: int) -> int:
        _, result, error = self._call(self._packets.ping, self._port, motor_id)
        self._check(result, error, motor_id)
        return int.from_bytes(self._status_data(motor_id, PING_DATA_BYTES)[:2], "little")

    def _read_internal(self, reg: Register, motor_id: int) -> int:
        _, result, error = self._call(self._packets.readTxRx, self._port, motor_id, reg.address, reg.size)
        self._check(result, error, motor_id)
        return int.from_bytes(self._status_data(motor_id, reg.size), "little")

    def _write_internal(self, reg: Register, motor_id: int, raw: int) -> None:
        data = list(raw.to_bytes(reg.size, "little"))
        result, error = self._call(self._packets.writeTxRx, self._port, motor_id, reg.address, reg.size, data)
        self._check(result, error, motor_id)
        self._status_data(motor_id, 0)  # a late read reply must not pass for the write's acknowledgement

    def _sync_read_internal(self, reg: Register, motor_ids: list[int]) -> dict[int, int]:
        group = self._sdk.GroupSyncRead(self._port, self._packets, reg.address, reg.size)
        for motor_id in motor_ids:
            group.addParam(motor_id)
        self._check(self._call(group.txPacket), 0, None)
        values: dict[int, int] = {}
        errors: dict[int, int] = {}
        for motor_id in motor_ids:
            _, result, error = self._call(self._packets.readRx, self._port, motor_id, reg.size)
            self._check(result, 0, motor_id)
            values[motor_id] = int.from_bytes(self._status_data(motor_id, reg.size), "little")
            if error:
                errors[motor_id] = error
        if errors:
            motor_id, error = next(iter(errors.items()))
            self._check(COMM_SUCCESS, error, motor_id)
        return values

    def _sync_write_internal(self, reg: Register, raw: Mapping[int, int]) -> None:
        group = self._sdk.GroupSyncWrite(self._port, self._packets, reg.address, reg.size)
        for motor_id, value in raw.items():
            group.addParam(motor_id, list(value.to_bytes(reg.size, "little")))
        self._check(self._call(group.txPacket), 0, None)

    # --- SDK result mapping

    def _call(self, fn: Any, *args: Any) -> Any:
        """Call the SDK; a vanished port raises out of pyserial as an exception."""
        self._port.is_using = False  # we serialise access with the bus lock; a raise mid-call leaves it set
        self._packets.last_status = []
        try:
            return fn(*args)
        except serial_io_errors() as err:
            raise PortError(f"serial I/O failed ({err}); was the adapter unplugged?") from err

    def _status_data(self, motor_id: int, size: int) -> bytes:
        """The data field of the status packet the SDK just accepted from ``motor_id``, checked to
        be exactly ``size`` bytes (the SDK itself slices without looking at the LENGTH field)."""
        status = self._packets.last_status
        length = status[STATUS_LENGTH] | status[STATUS_LENGTH + 1] << 8 if len(status) > STATUS_DATA else -1
        if status[STATUS_ID : STATUS_ID + 1] != [motor_id] or length - STATUS_LENGTH_OVERHEAD != size:
            raise ChecksumError(
                f"status packet from motor {motor_id} carries {length - STATUS_LENGTH_OVERHEAD} data bytes, "
                f"expected {size}: {bytes(status).hex(' ')}"
            )
        return bytes(status[STATUS_DATA : STATUS_DATA + size])

    def _check(self, result: int, error: int, motor_id: int | None) -> None:
        who = f"motor {motor_id}" if motor_id is not None else "the chain"
        if result == COMM_RX_TIMEOUT:
            raise BusTimeoutError(f"no status packet from {who}")
        if result == COMM_RX_CORRUPT:
            raise ChecksumError(f"incorrect status packet from {who} (CRC or framing)")
        if result != COMM_SUCCESS:
            raise PortError(f"{self._packets.getTxRxResult(result)} (SDK result {result})")
        if error:
            flags = decode_error_flags(
                error, self._hardware_status(motor_id) if error & HARDWARE_ALERT else 0
            )
            raise ServoError(
                f"motor {motor_id} reported {', '.join(flags)} (error byte 0x{error:02x})",
                motor_id=motor_id,
                flags=flags,
            )

    def _hardware_status(self, motor_id: int | None) -> int:
        """Best-effort read of Hardware_Error_Status to name the alert; 0 if that fails too."""
        if motor_id is None:
            return 0
        reg = self.control_table["Hardware_Error_Status"]
        _, result, _ = self._call(self._packets.readTxRx, self._port, motor_id, reg.address, reg.size)
        if result != COMM_SUCCESS:
            return 0
        try:
            return self._status_data(motor_id, reg.size)[0]
        except ChecksumError:
            return 0
