"""What every emulated serial servo chain shares: a pty, a background thread, register files,
motion, fault injection and a write log. The vendor subclasses (``feetech.py``,
``dynamixel.py``) only frame packets and execute instructions.

The driver under test opens the pty's slave path exactly like ``/dev/ttyACM0``; the emulator
answers on the master side. Bytes cross a pty instantly, so with ``wire_time=True`` the emulator
sleeps the time each packet would occupy a UART at the configured baud rate (8N1), plus each
servo's return delay, before answering: driver timing then matches a real bus.

Baud rate: each servo listens at the rate of its Baud_Rate register (initialised from
``baudrate``); the emulator reads the rate the driver set on the pty (``tcsetattr``, Linux
``TCGETS2``) and a servo at another rate hears nothing, as on a real line.

Per-packet cost: register layouts are resolved once (name -> address slice; write range ->
covered registers, cached per range), so a SYNC_WRITE costs a few dict lookups per servo, not a
scan of the control table.
"""

from __future__ import annotations

import array
import fcntl
import logging
import math
import os
import select
import sys
import termios
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypeVar

from molmoact2_edge.errors import ChecksumError, ConfigError, PortError, RegisterError
from molmoact2_edge.hardware.buses.base import wire_time_s
from molmoact2_edge.hardware.buses.registers import ControlTable, Register
from molmoact2_edge.hardware.emulators.faults import FaultInjector, FaultPlan, FaultSchedule

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="SerialServoChain")

TICK_S = 0.002  # motion update period while the line is idle
TCGETS2 = 0x802C542A  # Linux ioctl: termios2, whose c_ispeed is the actual rate (custom rates too)
TERMIOS2_ISPEED = 9  # index of c_ispeed among the ints of struct termios2


class WriteRecord(NamedTuple):
    time: float  # time.monotonic() when the write was applied
    motor_id: int
    register: str
    value: int  # decoded (signed) value


class Servo:
    """One emulated servo: its register memory and the float position behind Present_Position."""

    def __init__(self, motor_id: int, memory: bytearray, position: float, baudrate: int):
        self.motor_id = motor_id
        self.memory = memory
        self.position = position  # steps, in the Present_Position frame
        self.baudrate = baudrate  # the line rate it listens at (its Baud_Rate register)
        self.pending: list[tuple[int, bytes]] = []  # REG_WRITE staged until ACTION


class SerialServoChain(ABC):
    """Base of the pty servo-chain emulators.

    Args:
        motor_ids: ids of the servos on the chain.
        baudrate: line speed used for wire-time emulation.
        wire_time: sleep the UART time of every packet and the return delay before replying.
        follow_goal: with torque on, Present_Position moves toward Goal_Position at
            ``max_speed_steps_s``; False leaves positions to ``set_present_positions`` (an outside
            simulator).
        sweep: joints with torque off move by themselves through most of a turn (sine, period
            ``sweep_period_s``, +-``sweep_amplitude_steps`` around the middle): what a user does
            by hand while ``calibrate`` records ranges.
        seed: seeds the fault-probability RNG.
        write_log_limit: newest write records kept in ``write_log`` (a long simulated run must
            not grow without bound).
    """

    control_table: ControlTable
    baud_rates: Mapping[int, int]  # Baud_Rate register index -> bits/s
    header: bytes  # packet header of the protocol
    find_frame: Callable[[bytes | bytearray], tuple[int, int] | None]  # vendor framing functions
    decode_frame: Callable[[bytes | bytearray], object]  # raises ChecksumError
    steps_per_turn: int | None  # wrap positions modulo this (Feetech 4096); None = no wrap
    homing_sign: int  # Present = Actual + homing_sign * Homing_Offset
    velocity_unit_steps_s: float  # one Present_Velocity unit in steps/s
    return_delay_unit_s: float  # one Return_Delay_Time unit

    def __init__(
        self,
        motor_ids: Iterable[int],
        *,
        baudrate: int = 1_000_000,
        wire_time: bool = False,
        follow_goal: bool = True,
        max_speed_steps_s: float = 3000.0,
        sweep: bool = False,
        sweep_period_s: float = 3.0,
        sweep_amplitude_steps: float = 900.0,
        seed: int = 0,
        write_log_limit: int = 100_000,
    ):
        if baudrate not in self.baud_rates.values():
            rates = ", ".join(str(r) for r in sorted(self.baud_rates.values()))
            raise ConfigError(
                f"{type(self).__name__}: a servo cannot run at {baudrate} baud; its rates: {rates}"
            )
        self.motor_ids = [int(i) for i in motor_ids]
        self.baudrate = baudrate
        self.wire_time = wire_time
        self.follow_goal = follow_goal
        self.max_speed_steps_s = max_speed_steps_s
        self.sweep = sweep
        self.sweep_period_s = sweep_period_s
        self.sweep_amplitude_steps = sweep_amplitude_steps
        self.write_log: deque[WriteRecord] = deque(maxlen=write_log_limit)
        # register layout resolved once: name -> (register, slice); write range -> covered registers
        self._layout = {
            name: (reg, slice(reg.address, reg.address + reg.size))
            for name, reg in self.control_table.items()
        }
        self._covered: dict[tuple[int, int], tuple[Register, ...]] = {}
        self._baud_index = {rate: index for index, rate in self.baud_rates.items()}
        self._servos = {i: self._new_servo(i) for i in self.motor_ids}
        self._heard = self._servos  # the servos listening at the current line rate (set per packet)
        self._injector = FaultInjector(seed)
        self._schedule: FaultSchedule | None = None
        self._sweep_start = time.monotonic()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self._line_free_at = 0.0  # perf_counter time the emulated wire is idle again
        self.port = ""

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the pty and start answering; returns the port path for the driver."""
        if self._thread is not None:
            raise PortError(f"emulator already running on {self.port}")
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing, no CR/LF translation
        self.port = os.ttyname(self._slave)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, name=f"{type(self).__name__}:{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("%s serving motors %s on %s", type(self).__name__, self.motor_ids, self.port)
        return self.port

    def stop(self) -> None:
        """Stop answering and close the pty; safe to call twice."""
        if self._schedule is not None:
            self._schedule.cancel()
            self._schedule = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    logger.debug("fd %d already closed", fd)
        self._master = self._slave = -1

    def __enter__(self: C) -> C:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- thread-safe accessors ------------------------------------------------------------------

    def get_register(self, motor_id: int, name: str) -> int:
        """Decoded value of register ``name`` of servo ``motor_id``."""
        self.control_table[name]  # a misspelt name raises RegisterError with suggestions
        with self._lock:
            return self._reg(self._servo(motor_id), name)

    def set_register(self, motor_id: int, name: str, value: int) -> None:
        """Set any register, read-only ones included (the servo's own side of the memory)."""
        self.control_table[name]
        with self._lock:
            servo = self._servo(motor_id)
            self._poke(servo, name, value)
            if name == "Present_Position":
                servo.position = float(value)
            elif name == "Baud_Rate":
                servo.baudrate = self._rate_of(value)

    def goal_positions(self) -> dict[int, int]:
        """Goal_Position of every servo, in raw steps."""
        return {i: self.get_register(i, "Goal_Position") for i in self.motor_ids}

    def present_positions(self) -> dict[int, int]:
        return {i: self.get_register(i, "Present_Position") for i in self.motor_ids}

    def set_present_positions(self, positions: Mapping[int, int]) -> None:
        """Set Present_Position (raw steps) as an outside simulator would."""
        with self._lock:
            for motor_id, value in positions.items():
                self._set_position(self._servo(motor_id), float(value))

    def torque_enabled(self, motor_id: int) -> bool:
        return self.get_register(motor_id, "Torque_Enable") != 0

    def inject_fault(
        self,
        kind: str,
        motor_id: int | None = None,
        count: int | None = None,
        probability: float | None = None,
        delay_s: float | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Make replies misbehave until ``count`` replies were affected, ``duration_s`` passed or
        ``clear_faults()``.

        Kinds (``faults.py``): ``drop_reply`` (no reply), ``corrupt_checksum`` (last byte flipped),
        ``delay`` (reply ``delay_s`` late), ``truncate`` (only the first half of the reply is sent),
        ``wrong_id`` (the reply names an id that is not on the chain), ``silence`` (the servo is
        gone: same as drop_reply, meant for one ``motor_id``), ``unplug`` (close the pty now: the
        driver's next I/O fails).
        """
        if kind == "unplug":
            self.stop()  # both pty ends closed: the driver's next I/O sees EIO, like a pulled cable
            return
        with self._lock:
            self._injector.add(kind, motor_id, count, probability, delay_s, duration_s)

    def apply_faults(self, plan: FaultPlan) -> None:
        """Inject a parsed ``--faults`` plan: per-reply faults now, silences and the unplug on timers."""
        self._schedule = FaultSchedule(plan, self.inject_fault, lambda: self.inject_fault("unplug"))

    def clear_faults(self) -> None:
        with self._lock:
            self._injector.clear()

    def fault_counts(self) -> dict[str, int]:
        """Replies each fault kind hit so far."""
        with self._lock:
            return dict(self._injector.counts)

    # --- vendor hooks -----------------------------------------------------------------------------

    def _split_packet(self, buffer: bytearray) -> bytes | None:
        """Remove and return the next complete instruction packet; noise and packets with a bad
        checksum are dropped, as a servo does. ``None`` if more bytes are needed."""
        while True:
            if buffer.find(self.header) < 0:
                del buffer[: max(len(buffer) - len(self.header) + 1, 0)]  # keep a partial header
                return None
            span = self.find_frame(buffer)
            if span is None:
                return None
            start, end = span
            frame = bytes(buffer[start:end])
            del buffer[:end]
            try:
                self.decode_frame(frame)
            except ChecksumError as err:
                logger.debug("emulator dropped a bad packet: %s", err)
                continue
            return frame

    @abstractmethod
    def _handle(self, packet: bytes) -> list[tuple[int, bytes]]:
        """Execute one instruction packet for the servos in ``self._heard``; return
        ``(motor_id, status packet)`` replies in the order the servos send them."""

    @abstractmethod
    def _relabel(self, reply: bytes, motor_id: int) -> bytes:
        """The same status packet as sent by ``motor_id`` (valid checksum)."""

    # --- register semantics shared by both vendors -----------------------------------------------

    def _servo(self, motor_id: int) -> Servo:
        try:
            return self._servos[motor_id]
        except KeyError:
            raise RegisterError(
                f"no emulated servo with id {motor_id} (chain has {self.motor_ids})"
            ) from None

    def _new_servo(self, motor_id: int) -> Servo:
        position = self.control_table["Present_Position"].default
        servo = Servo(motor_id, self.control_table.default_memory(), float(position), self.baudrate)
        self._poke(servo, "ID", motor_id)
        self._poke(servo, "Baud_Rate", self._baud_index[self.baudrate])
        return servo

    def _rate_of(self, index: int) -> int:
        """Bits/s of a Baud_Rate index; an index the table lacks leaves the servo unreachable (0)."""
        return self.baud_rates.get(index, 0)

    def _line_baudrate(self) -> int | None:
        """The rate the driver set on the pty; ``None`` if it cannot be read (then every servo hears)."""
        if sys.platform.startswith("linux"):
            buf = array.array("i", [0] * 64)
            try:
                fcntl.ioctl(self._slave, TCGETS2, buf)
            except OSError:
                return None
            return buf[TERMIOS2_ISPEED]
        speed = termios.tcgetattr(self._slave)[4]
        rates = {getattr(termios, f"B{r}", None): r for r in self.baud_rates.values()}
        return rates.get(speed)

    def _read_memory(self, servo: Servo, address: int, length: int) -> bytes:
        end = address + length
        if end > len(servo.memory):
            return bytes(servo.memory[address:]) + bytes(end - len(servo.memory))
        return bytes(servo.memory[address:end])

    def _write_memory(self, servo: Servo, address: int, data: bytes) -> None:
        """Apply a host write byte range: read-only registers keep their value (as on the servo),
        every writable register fully covered by the range is logged."""
        now = time.monotonic()
        memory = servo.memory
        for reg in self._covered_registers(address, len(data)):
            start = reg.address - address
            chunk = data[start : start + reg.size]
            value = reg.from_bytes(chunk)
            self.write_log.append(WriteRecord(now, servo.motor_id, reg.name, value))
            if reg.name in self._WRITE_EFFECTS:
                old = reg.from_bytes(memory[reg.address : reg.address + reg.size])
                memory[reg.address : reg.address + reg.size] = chunk
                self._on_write(servo, reg, old, value)
            else:
                memory[reg.address : reg.address + reg.size] = chunk

    def _covered_registers(self, address: int, length: int) -> tuple[Register, ...]:
        """Writable registers fully inside ``address .. address + length``; resolved once per range
        (a control loop writes the same range every tick)."""
        key = (address, length)
        covered = self._covered.get(key)
        if covered is None:
            end = address + length
            covered = tuple(
                reg
                for reg in self.control_table.values()
                if reg.writable and address <= reg.address and reg.address + reg.size <= end
            )
            self._covered[key] = covered
        return covered

    _WRITE_EFFECTS = frozenset({"Homing_Offset", "Torque_Enable", "ID", "Baud_Rate"})

    def _on_write(self, servo: Servo, reg: Register, old: int, value: int) -> None:
        if reg.name == "Homing_Offset":
            # the actual angle did not move, so the reported one shifts by the offset change
            self._set_position(servo, servo.position + self.homing_sign * (value - old))
        elif reg.name == "Torque_Enable" and value and not old:
            # torque on holds the current pose: the goal becomes the present position, no jump
            self._poke(servo, "Goal_Position", round(servo.position))
        elif reg.name == "ID" and value != servo.motor_id:
            self._renumber(servo, value)
        elif reg.name == "Baud_Rate":
            servo.baudrate = self._rate_of(value)  # the reply to this write already goes at the new rate

    def _action(self, servo: Servo) -> None:
        """ACTION: apply the writes staged by REG_WRITE."""
        for address, data in servo.pending:
            self._write_memory(servo, address, data)
        servo.pending.clear()

    def _factory_reset(self, servo: Servo) -> None:
        """Every register back to its default; the id and the physical angle stay."""
        servo.memory[:] = self.control_table.default_memory()
        self._poke(servo, "ID", servo.motor_id)
        self._poke(servo, "Baud_Rate", self._baud_index.get(servo.baudrate, 0))
        self._set_position(servo, servo.position)

    def _renumber(self, servo: Servo, new_id: int) -> None:
        del self._servos[servo.motor_id]
        self.motor_ids[self.motor_ids.index(servo.motor_id)] = new_id
        servo.motor_id = new_id
        self._servos[new_id] = servo

    def _set_position(self, servo: Servo, position: float) -> None:
        if self.steps_per_turn:
            position %= self.steps_per_turn
        servo.position = position
        self._poke(servo, "Present_Position", round(position))

    def _reg(self, servo: Servo, name: str) -> int:
        reg, where = self._layout[name]
        return reg.from_bytes(servo.memory[where])

    def _poke(self, servo: Servo, name: str, value: int) -> None:
        reg, where = self._layout[name]
        servo.memory[where] = reg.to_bytes(value)

    def _goal_target(self, servo: Servo) -> float:
        goal = self._reg(servo, "Goal_Position")
        low, high = self._reg(servo, "Min_Position_Limit"), self._reg(servo, "Max_Position_Limit")
        return float(min(max(goal, low), high)) if low < high else float(goal)

    def _move(self, dt: float) -> None:
        """Advance every torque-on servo toward its (limit-clamped) goal at bounded speed; with
        ``sweep``, torque-off servos follow the scripted hand motion."""
        step = self.max_speed_steps_s * dt
        for servo in self._servos.values():
            if not self._reg(servo, "Torque_Enable"):
                if self.sweep:
                    self._sweep(servo)
                else:
                    self._poke(servo, "Present_Velocity", 0)
                    self._poke(servo, "Moving", 0)
                continue
            if not self.follow_goal:
                continue
            error = self._goal_target(servo) - servo.position
            delta = max(-step, min(step, error))
            self._set_position(servo, servo.position + delta)
            speed = delta / dt if dt > 0 else 0.0
            self._poke(servo, "Present_Velocity", round(speed / self.velocity_unit_steps_s))
            self._poke(servo, "Moving", int(abs(error) > 1.0))

    def _sweep(self, servo: Servo) -> None:
        """A hand moving the joint: sine around the middle of the turn in the servo's actual
        (physical) frame, each joint out of phase; reported through the current Homing_Offset."""
        phase = (
            2 * math.pi * ((time.monotonic() - self._sweep_start) / self.sweep_period_s + servo.motor_id / 7)
        )
        middle = (self.steps_per_turn or 4096) / 2
        actual = middle + self.sweep_amplitude_steps * math.sin(phase)
        self._set_position(servo, actual + self.homing_sign * self._reg(servo, "Homing_Offset"))
        self._poke(servo, "Moving", 1)

    # --- the serving thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        buffer = bytearray()
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                ready = select.select([self._master], [], [], TICK_S)[0]
                if ready:
                    buffer += os.read(self._master, 4096)
            except (OSError, ValueError):
                break  # pty closed (unplug or stop)
            now = time.monotonic()
            if self.follow_goal or self.sweep:
                with self._lock:
                    self._move(now - last)
            last = now
            while (packet := self._next(buffer)) is not None:
                self._answer(packet)

    def _next(self, buffer: bytearray) -> bytes | None:
        with self._lock:
            return self._split_packet(buffer)

    def _answer(self, packet: bytes) -> None:
        received = time.perf_counter()
        line = self._line_baudrate()
        with self._lock:
            # a servo at another rate sees garbage, not a packet: it neither acts nor answers
            self._heard = (
                self._servos
                if line is None
                else {i: s for i, s in self._servos.items() if s.baudrate == line}
            )
            replies = self._handle(packet) if self._heard else []
        # the request starts once the line is free (a SYNC_WRITE has no reply but still occupies
        # it) and occupies it before any servo can start answering
        t = max(received, self._line_free_at)
        baud = line or self.baudrate
        t += wire_time_s(len(packet), baud) if self.wire_time else 0.0
        # Back-to-back replies go out as one burst when the last of them would have finished: a
        # USB adapter delivers them in frames anyway, and one sleep per burst instead of one per
        # servo keeps the timing honest on a loaded host. A fault delay starts a new burst.
        bursts: list[tuple[float, bytes]] = []
        for motor_id, reply in replies:
            with self._lock:
                servo = self._servos.get(motor_id)
                delay = self._reg(servo, "Return_Delay_Time") * self.return_delay_unit_s if servo else 0.0
                faulted = self._apply_faults(motor_id, reply)
            if faulted is None:
                continue
            extra, data = faulted
            t += delay + extra + (wire_time_s(len(data), baud) if self.wire_time else 0.0)
            if bursts and not extra:
                bursts[-1] = (t, bursts[-1][1] + data)
            else:
                bursts.append((t, data))
        self._line_free_at = t
        for when, data in bursts:
            _sleep_until(when)
            try:
                os.write(self._master, data)
            except OSError:
                return

    def _apply_faults(self, motor_id: int, reply: bytes) -> tuple[float, bytes] | None:
        """``(extra delay, bytes to send)`` after active faults, or ``None`` to stay silent."""
        faults = self._injector.decide(motor_id)
        if faults is None:
            return None
        if faults.wrong_id:
            # an id nobody asked for (not on the chain): a servo with a stale id, a late reply
            stranger = next(i for i in range(1, 253) if i not in self._servos and i != motor_id)
            reply = self._relabel(reply, stranger)
        if faults.corrupt:
            reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])  # both protocols end in the checksum
        if faults.truncate:
            reply = reply[: len(reply) // 2]
        return faults.delay_s, reply


def _sleep_until(deadline: float) -> None:
    """Sleep to a ``perf_counter`` deadline; the last 0.3 ms spin, since sleep overshoots."""
    while (remaining := deadline - time.perf_counter()) > 0:
        if remaining > 3e-4:
            time.sleep(remaining - 2.5e-4)
