"""The ``Bus`` contract shared by serial servo buses (Feetech, Dynamixel) and CAN drives (Damiao).

Template-method design (python-can ``BusABC``, LeRobot ``MotorsBusBase``): the public methods
(``ping``, ``read``, ``write``, ``sync_read``, ``sync_write``) resolve register names against the
vendor's ``ControlTable``, encode/decode signed values, hold the bus lock, own the bounded retry
loop and turn every failure into a typed error whose message names the port, the operation, the
register (name and address), the motor ids and the attempt count. Vendor classes implement only
the ``_internal`` primitives, which move raw unsigned register values and raise the typed errors
with a short detail:

====================  ===================================  ===========================
primitive             raises                               retried by the public API?
====================  ===================================  ===========================
no/short reply        ``BusTimeoutError``                  yes, up to ``retries`` times
bad checksum/framing  ``ChecksumError``                    yes
servo error byte      ``ServoError`` (motor id + flags)    no: a fault does not clear on retry
port lost/closed      ``PortError``                        no
====================  ===================================  ===========================

Errors from ``molmoact2_edge.errors``:

    HardwareError
    ├── PortError (ConnectionError)   open failed, unplugged, not connected
    ├── BusError
    │   ├── BusTimeoutError (TimeoutError)
    │   ├── ChecksumError
    │   └── ServoError                .motor_id, .flags
    └── RegisterError (ValueError)    unknown register, read-only, value out of range
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, TypeVar

from molmoact2_edge.errors import (
    BusError,
    BusTimeoutError,
    ChecksumError,
    ConfigError,
    PortError,
    RegisterError,
    ServoError,
)
from molmoact2_edge.hardware.buses.registers import ControlTable, Register

logger = logging.getLogger(__name__)

PORT_HINT = (
    "Check the cable and the device path, that the user is in the 'dialout' group and that no other "
    "process holds the port"
)
BITS_PER_BYTE = 10  # 8N1 framing: start bit + 8 data bits + stop bit

T = TypeVar("T")
B = TypeVar("B", bound="Bus")

RETRYABLE = (BusTimeoutError, ChecksumError)


def wire_time_s(n_bytes: int, baudrate: int) -> float:
    """Seconds ``n_bytes`` occupy a UART line at ``baudrate`` (8N1)."""
    return n_bytes * BITS_PER_BYTE / baudrate


def serial_io_errors() -> tuple[type[BaseException], ...]:
    """What a vanished serial device raises: pyserial's error, OSError (EIO) from os.read, and
    termios.error (not an OSError) from the tcflush behind reset_input_buffer."""
    import serial

    errors: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
    if os.name != "nt":
        import termios

        errors += (termios.error,)
    return errors


class Bus(ABC):
    """A chain of motors behind one port (serial device path or CAN channel).

    Args:
        port: device path (``/dev/ttyACM0``) or channel name (``can0``).
        baudrate: bits per second on the wire; ``None`` = the vendor default.
        retries: extra attempts after a timeout or checksum failure (0 = try once). Retries are
            immediate; servos drop status packets under load (LeRobot issue #3131), so 2 is the
            default for reads.
    """

    control_table: ClassVar[ControlTable]
    model_numbers: ClassVar[Mapping[int, str]]  # model number -> model name, for messages
    default_baudrate: ClassVar[int]
    protocol: ClassVar[str]  # short name used in messages, e.g. "feetech"

    def __init__(self, port: str, *, baudrate: int | None = None, retries: int = 2):
        if retries < 0:
            raise ConfigError(f"retries must be >= 0 for the bus on {port}, got {retries}")
        self.port = port
        self.baudrate = baudrate or self.default_baudrate
        self.retries = retries
        self._connected = False
        self._lock = threading.RLock()  # the control loop and a watchdog thread share one bus

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the port. Raises ``PortError`` naming the port when it cannot be opened."""
        with self._lock:
            if self._connected:
                raise PortError(f"{self.protocol} bus on {self.port} is already connected")
            try:
                self._connect_internal()
            except PortError:
                raise
            except OSError as err:
                raise PortError(
                    f"could not open {self.port} at {self.baudrate} baud: {err}. {PORT_HINT}"
                ) from err
            self._connected = True
            logger.info("%s bus connected on %s at %d baud", self.protocol, self.port, self.baudrate)

    def disconnect(self) -> None:
        """Close the port; safe to call twice. Torque policy belongs to the robot, not the bus."""
        with self._lock:
            if not self._connected:
                return
            self._connected = False
            self._disconnect_internal()
            logger.info("%s bus on %s disconnected", self.protocol, self.port)

    def __enter__(self: B) -> B:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def __del__(self) -> None:
        if getattr(self, "_connected", False):
            warnings.warn(
                f"{self.protocol} bus on {self.port} was never disconnected", ResourceWarning, stacklevel=1
            )

    # --- public operations (retries, encoding, error mapping) -----------------------------------

    def ping(self, motor_id: int) -> int:
        """Return the model number of ``motor_id``."""
        return self._run("ping", None, [motor_id], lambda: self._ping_internal(motor_id))

    def read(self, register: str | Register, motor_id: int) -> int:
        """Read one register of one motor; returns the decoded (signed) value."""
        reg = self.control_table.resolve(register)
        raw = self._run("read", reg, [motor_id], lambda: self._read_internal(reg, motor_id))
        return reg.decode(raw)

    def write(self, register: str | Register, motor_id: int, value: int) -> None:
        """Write one register of one motor and wait for its acknowledgement."""
        reg = self._writable(register)
        raw = reg.encode(value)
        self._run("write", reg, [motor_id], lambda: self._write_internal(reg, motor_id, raw))

    def sync_read(self, register: str | Register, motor_ids: Iterable[int]) -> dict[int, int]:
        """Read one register from several motors in one transaction; ``{id: decoded value}``."""
        reg = self.control_table.resolve(register)
        ids = self._ids(motor_ids)
        raw = self._run("sync_read", reg, ids, lambda: self._sync_read_internal(reg, ids))
        return {i: reg.decode(raw[i]) for i in ids}

    def sync_write(self, register: str | Register, values: Mapping[int, int]) -> None:
        """Write one register of several motors in one transaction (no reply on the wire:
        a lost packet is only seen by the next read)."""
        reg = self._writable(register)
        raw = {int(i): reg.encode(v) for i, v in values.items()}
        ids = self._ids(raw)
        self._run("sync_write", reg, ids, lambda: self._sync_write_internal(reg, raw))

    def verify_models(self, expected: Mapping[int, int]) -> None:
        """Ping every motor and check its model number (LeRobot's connect handshake)."""
        for motor_id, model in expected.items():
            found = self.ping(motor_id)
            if found != model:
                raise BusError(
                    f"{self.port}: motor {motor_id} is a {self._model_name(found)} (model {found}), "
                    f"expected {self._model_name(model)} (model {model}); check the id assignment"
                )

    def scan(self, motor_ids: Iterable[int], baudrates: Iterable[int]) -> dict[int, dict[int, int]]:
        """Ping ``motor_ids`` at each baud rate: ``{baudrate: {id: model number}}`` for the rates
        where something answered. Used by the servo setup wizard; restores the bus baud rate."""
        ids = list(motor_ids)
        found: dict[int, dict[int, int]] = {}
        with self._lock:
            self._require_connected("scan")
            original, retries = self.baudrate, self.retries
            self.retries = 0  # a missing motor is the normal case here
            try:
                for baud in baudrates:
                    self._set_baudrate_internal(baud)
                    self.baudrate = baud
                    for motor_id in ids:
                        try:
                            found.setdefault(baud, {})[motor_id] = self.ping(motor_id)
                        except RETRYABLE:
                            continue
                    if not found.get(baud):
                        found.pop(baud, None)
            finally:
                self._set_baudrate_internal(original)
                self.baudrate, self.retries = original, retries
        logger.info("scan of %s found %s", self.port, found or "nothing")
        return found

    # --- vendor primitives (raw unsigned values) -------------------------------------------------

    @abstractmethod
    def _connect_internal(self) -> None: ...

    @abstractmethod
    def _disconnect_internal(self) -> None: ...

    @abstractmethod
    def _set_baudrate_internal(self, baudrate: int) -> None: ...

    @abstractmethod
    def _ping_internal(self, motor_id: int) -> int: ...

    @abstractmethod
    def _read_internal(self, reg: Register, motor_id: int) -> int: ...

    @abstractmethod
    def _write_internal(self, reg: Register, motor_id: int, raw: int) -> None: ...

    @abstractmethod
    def _sync_read_internal(self, reg: Register, motor_ids: list[int]) -> dict[int, int]: ...

    @abstractmethod
    def _sync_write_internal(self, reg: Register, raw: Mapping[int, int]) -> None: ...

    # --- helpers ---------------------------------------------------------------------------------

    def _run(self, op: str, reg: Register | None, ids: list[int], fn: Callable[[], T]) -> T:
        """Run one primitive with the bus lock held, retrying timeouts and checksum failures."""
        attempts = self.retries + 1
        with self._lock:
            self._require_connected(op)
            for attempt in range(1, attempts + 1):
                try:
                    return fn()
                except RETRYABLE as err:
                    if attempt == attempts:
                        raise type(err)(self._describe(op, reg, ids, attempt, err)) from err
                    logger.debug(
                        "%s attempt %d/%d failed: %s", self._what(op, reg, ids), attempt, attempts, err
                    )
                except ServoError as err:
                    raise ServoError(
                        self._describe(op, reg, ids, attempt, err), motor_id=err.motor_id, flags=err.flags
                    ) from err
                except PortError as err:
                    # the port is gone: release it; reconnecting is the caller's decision
                    self._connected = False
                    self._disconnect_internal()
                    raise PortError(self._describe(op, reg, ids, attempt, err)) from err
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _what(self, op: str, reg: Register | None, ids: list[int]) -> str:
        target = f" {reg.name} (address {reg.address}, {reg.size} B)" if reg else ""
        who = f"motor {ids[0]}" if len(ids) == 1 else f"motors {ids}"
        return f"{self.protocol} {op}{target} on {self.port}, {who}"

    def _describe(self, op: str, reg: Register | None, ids: list[int], attempt: int, err: Exception) -> str:
        tries = "attempt" if attempt == 1 else "attempts"
        return f"{self._what(op, reg, ids)} failed after {attempt} {tries}: {err}"

    def _require_connected(self, op: str) -> None:
        if not self._connected:
            raise PortError(
                f"{self.protocol} bus on {self.port} is not connected; call connect() before {op}"
            )

    def _writable(self, register: str | Register) -> Register:
        reg = self.control_table.resolve(register)
        if not reg.writable:
            raise RegisterError(
                f"register {reg.name} (address {reg.address}) of {self.control_table.model} is read-only"
            )
        return reg

    @staticmethod
    def _ids(motor_ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in motor_ids]
        if not ids:
            raise BusError("a sync transaction needs at least one motor id")
        if len(set(ids)) != len(ids):
            raise BusError(f"duplicate motor ids in {ids}")
        return ids

    def _model_name(self, model_number: int) -> str:
        return self.model_numbers.get(model_number, "unknown model")
