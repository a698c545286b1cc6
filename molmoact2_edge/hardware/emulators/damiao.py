"""A chain of emulated Damiao drives on a python-can bus, answering in its own thread.

It speaks the wire protocol of ``buses/damiao.py`` (MIT frames, enable/disable/zero/
clear-error, parameter read/write/refresh on 0x7FF, one feedback frame per command on
the master id) and keeps the behaviour that matters for safety:

- **command timeout**: when an enabled motor receives no command for ``Timeout`` x 50 us
  (factory 8000 = 400 ms), it stops tracking its target (damping: it stays where it is),
  and reports ``LOST_COMMUNICATION`` until ``clear_error`` and a new ``enable``;
- a disabled motor ignores MIT targets; faults can be injected per motor.

Reply faults (``inject_reply_fault``, ``apply_faults`` for a ``--faults`` plan; ``faults.py``):
dropped, late (queued and sent after the delay), truncated (fewer than 8 data bytes) and
wrong-id replies (a motor's feedback on another motor's master id), a silent motor for a time,
and an unplug (the chain stops answering for good). A corrupted frame fails the CAN CRC and is
dropped by the receiving controller, so ``corrupt`` acts as a drop here. An adapter that raises
on the host side (python-can errors) is not something a peer can cause: the tests make the
driver's own ``can.Bus`` raise.

Motion model (enough for driver and safety tests, not a physics model): an enabled motor
with kp > 0 moves toward its target with a 20 ms time constant, capped at the model's
velocity range; with kp = kd = 0 a feed-forward torque spins it until a mechanical stop
(``hard_limits``, e.g. a gripper's jaws); the reported torque is the MIT law clipped to the
model's torque range.

python-can's ``virtual`` interface connects buses in the same process only; use
``interface="udp_multicast"`` to reach the emulator from another process.
"""

from __future__ import annotations

import heapq
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import can

from molmoact2_edge.hardware.buses.damiao import (
    CMD_CLEAR_ERROR,
    CMD_DISABLE,
    CMD_ENABLE,
    CMD_SAVE_ZERO,
    DAMIAO_MODELS,
    DAMIAO_PARAMS,
    FLOAT_PARAMS,
    MASTER_OFFSET,
    PARAM_ID,
    PARAM_READ,
    PARAM_REFRESH,
    PARAM_SAVE,
    PARAM_WRITE,
    TIMEOUT_UNIT_S,
    DamiaoModel,
    MitCommand,
    MotorFeedback,
    MotorState,
    pack_feedback,
    unpack_mit,
)
from molmoact2_edge.hardware.emulators.faults import FaultInjector, FaultPlan, FaultSchedule

logger = logging.getLogger(__name__)

TRACKING_TIME_CONSTANT_S = 0.02
FREE_SPIN_RAD_S_PER_NM = 4.0  # speed an unloaded joint reaches per Nm of feed-forward torque


@dataclass
class _Motor:
    motor_id: int
    model: DamiaoModel
    position: float = 0.0
    velocity: float = 0.0
    torque: float = 0.0
    state: MotorState = MotorState.DISABLED
    command: MitCommand = field(default_factory=MitCommand)
    last_command: float = field(default_factory=time.monotonic)
    params: dict[int, int] = field(default_factory=dict)
    mit_count: int = 0
    silent: bool = False  # injected: the motor stops answering
    hard_limits: tuple[float, float] = (-12.5, 12.5)  # mechanical stops (rad), e.g. a gripper's jaws


class DamiaoEmulator:
    """Emulated drives ``{motor id: model name}`` on ``interface``/``channel``.

    ``start()`` returns the channel to pass to ``DamiaoBus(port=..., interface=...)``.
    """

    def __init__(
        self,
        motors: Mapping[int, str],
        *,
        channel: str = "molmo-damiao-0",
        interface: str = "virtual",
        command_timeout_s: float = 0.4,
        master_offset: int = MASTER_OFFSET,
        hard_limits: Mapping[int, tuple[float, float]] | None = None,
        seed: int = 0,
        command_log_limit: int = 100_000,
    ):
        self.channel = channel
        self.interface = interface
        self.master_offset = master_offset
        timeout_units = round(command_timeout_s / TIMEOUT_UNIT_S)
        self._motors: dict[int, _Motor] = {}
        for motor_id, name in motors.items():
            motor = _Motor(int(motor_id), DAMIAO_MODELS[name])
            motor.params = {reg.address: reg.default for reg in DAMIAO_PARAMS.values()}
            motor.params[DAMIAO_PARAMS["CAN_ID"].address] = motor.motor_id
            motor.params[DAMIAO_PARAMS["Master_ID"].address] = motor.motor_id + master_offset
            motor.params[DAMIAO_PARAMS["Timeout"].address] = timeout_units
            if hard_limits and motor.motor_id in hard_limits:
                motor.hard_limits = hard_limits[motor.motor_id]
                motor.position = min(max(0.0, motor.hard_limits[0]), motor.hard_limits[1])
            self._motors[motor.motor_id] = motor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bus: can.BusABC | None = None
        self._last_step = time.monotonic()
        self.frames_received = 0
        self._injector = FaultInjector(seed)
        self._schedule: FaultSchedule | None = None
        self._late: list[tuple[float, int, can.Message]] = []  # (due time, sequence, frame), a heap
        self._late_sequence = 0
        # (time, motor id, MIT target) the enabled drives accepted, newest first out: what the wire commanded
        self.command_log: deque[tuple[float, int, MitCommand]] = deque(maxlen=command_log_limit)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> str:
        self._bus = can.Bus(interface=self.interface, channel=self.channel, receive_own_messages=False)
        self._stop.clear()
        now = time.monotonic()
        self._last_step = now
        for motor in self._motors.values():
            motor.last_command = now
        self._thread = threading.Thread(
            target=self._serve, name=f"damiao-emulator-{self.channel}", daemon=True
        )
        self._thread.start()
        return self.channel

    def stop(self) -> None:
        if self._schedule is not None:
            self._schedule.cancel()
            self._schedule = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def __enter__(self) -> DamiaoEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests and the CLI look at -----------------------------------------------------

    def positions(self) -> dict[int, float]:
        with self._lock:
            return {i: m.position for i, m in self._motors.items()}

    def set_positions(self, positions: Mapping[int, float]) -> None:
        with self._lock:
            for i, p in positions.items():
                self._motors[i].position = float(p)

    def targets(self) -> dict[int, MitCommand]:
        with self._lock:
            return {i: m.command for i, m in self._motors.items()}

    def state(self, motor_id: int) -> MotorState:
        with self._lock:
            return self._motors[motor_id].state

    def enabled(self, motor_id: int) -> bool:
        return self.state(motor_id) == MotorState.ENABLED

    def mit_count(self, motor_id: int) -> int:
        with self._lock:
            return self._motors[motor_id].mit_count

    def inject_fault(self, motor_id: int, state: MotorState | None = None, *, silent: bool = False) -> None:
        """Latch a fault state (e.g. ``OVERLOAD``) or make the motor stop answering (``silent``)."""
        with self._lock:
            motor = self._motors[motor_id]
            if state is not None:
                motor.state = state
            motor.silent = silent

    def inject_reply_fault(
        self,
        kind: str,
        motor_id: int | None = None,
        count: int | None = None,
        probability: float | None = None,
        delay_s: float | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Make replies misbehave (kinds of ``faults.py``); ``unplug`` stops the chain for good."""
        if kind == "unplug":
            self.stop()
            return
        with self._lock:
            self._injector.add(kind, motor_id, count, probability, delay_s, duration_s)

    def apply_faults(self, plan: FaultPlan) -> None:
        """Inject a parsed ``--faults`` plan: per-reply faults now, silences and the unplug on timers."""
        self._schedule = FaultSchedule(
            plan, self.inject_reply_fault, lambda: self.inject_reply_fault("unplug")
        )

    def clear_faults(self) -> None:
        with self._lock:
            self._injector.clear()
            self._late.clear()

    def fault_counts(self) -> dict[str, int]:
        """Replies each fault kind hit so far."""
        with self._lock:
            return dict(self._injector.counts)

    # --- the server thread ------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._bus is not None
        while not self._stop.is_set():
            msg = self._bus.recv(timeout=0.001)
            with self._lock:
                now = time.monotonic()
                self._step(now)
                due = self._due_late_replies(now)
                reply = None
                if msg is not None and not msg.is_error_frame and len(msg.data) == 8:
                    self.frames_received += 1
                    reply = self._with_faults(self._handle(msg.arbitration_id, bytes(msg.data)), now)
            for frame in [*due, reply]:
                if frame is not None:
                    self._bus.send(frame)

    def _with_faults(self, reply: can.Message | None, now: float) -> can.Message | None:
        """The reply after the active faults: ``None`` when lost or queued as a late reply."""
        if reply is None:
            return None
        motor_id = self._motor_of_master.get(reply.arbitration_id)
        if motor_id is None:
            return reply
        faults = self._injector.decide(motor_id)
        if faults is None or faults.corrupt:  # lost, or dropped by the controller's CAN CRC check
            return None
        data, arbitration_id = bytes(reply.data), reply.arbitration_id
        if faults.truncate:
            data = data[: len(data) // 2]
        if faults.wrong_id:
            others = sorted(m for m in self._motor_of_master if m != arbitration_id)
            arbitration_id = others[0] if others else arbitration_id + 1
        frame = can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False)
        if faults.delay_s:
            self._late_sequence += 1
            heapq.heappush(self._late, (now + faults.delay_s, self._late_sequence, frame))
            return None
        return frame

    def _due_late_replies(self, now: float) -> list[can.Message]:
        due = []
        while self._late and self._late[0][0] <= now:
            due.append(heapq.heappop(self._late)[2])
        return due

    @property
    def _motor_of_master(self) -> dict[int, int]:
        key = DAMIAO_PARAMS["Master_ID"].address
        return {m.params[key]: i for i, m in self._motors.items()}

    def _step(self, now: float) -> None:
        """Advance every motor to ``now``: command timeout first, then motion."""
        dt = now - self._last_step
        self._last_step = now
        for m in self._motors.values():
            timeout = m.params[DAMIAO_PARAMS["Timeout"].address] * TIMEOUT_UNIT_S
            if m.state == MotorState.ENABLED and timeout > 0 and now - m.last_command > timeout:
                m.state = MotorState.LOST_COMMUNICATION
                logger.info(
                    "emulated Damiao motor %d: no command for %.0f ms -> damping", m.motor_id, timeout * 1000
                )
            if m.state != MotorState.ENABLED or dt <= 0:
                m.velocity = 0.0
                m.torque = 0.0
                continue
            cmd = m.command
            if cmd.kp > 0:
                velocity = (cmd.position - m.position) / TRACKING_TIME_CONSTANT_S
            elif cmd.kd > 0:
                velocity = cmd.velocity
            else:  # pure torque: an unloaded joint spins up until it meets a stop
                velocity = cmd.torque * FREE_SPIN_RAD_S_PER_NM
            m.velocity = max(-m.model.v_max, min(m.model.v_max, velocity))
            position = m.position + m.velocity * min(dt, TRACKING_TIME_CONSTANT_S)
            lo, hi = m.hard_limits
            if not lo <= position <= hi:
                position, m.velocity = min(max(position, lo), hi), 0.0
            m.position = position
            torque = cmd.kp * (cmd.position - m.position) + cmd.kd * (cmd.velocity - m.velocity) + cmd.torque
            m.torque = max(-m.model.t_max, min(m.model.t_max, torque))

    def _handle(self, arbitration_id: int, data: bytes) -> can.Message | None:
        if arbitration_id == PARAM_ID:
            return self._handle_param(data)
        motor = self._motors.get(arbitration_id)
        if motor is None or motor.silent:
            return None
        motor.last_command = time.monotonic()
        if data[:7] == b"\xff" * 7 and data[7] in (CMD_ENABLE, CMD_DISABLE, CMD_SAVE_ZERO, CMD_CLEAR_ERROR):
            self._special(motor, data[7])
        else:
            motor.mit_count += 1
            if motor.state == MotorState.ENABLED:
                motor.command = unpack_mit(data, motor.model)
                self.command_log.append((motor.last_command, motor.motor_id, motor.command))
        return self._feedback(motor)

    def _special(self, motor: _Motor, code: int) -> None:
        if code == CMD_ENABLE and not motor.state.is_fault:
            motor.state = MotorState.ENABLED
            # hold where it is until the first MIT frame (the drive starts with zero gains)
            motor.command = MitCommand(position=motor.position)
        elif (code == CMD_DISABLE and not motor.state.is_fault) or (
            code == CMD_CLEAR_ERROR and motor.state.is_fault
        ):
            motor.state = MotorState.DISABLED  # a fault stays latched (and torque off) until cleared
        elif code == CMD_SAVE_ZERO and motor.state == MotorState.DISABLED:
            motor.position = 0.0

    def _handle_param(self, data: bytes) -> can.Message | None:
        motor_id = data[0] | (data[1] << 8)
        motor = self._motors.get(motor_id)
        if motor is None or motor.silent:
            return None
        op, rid = data[2], data[3]
        if op == PARAM_REFRESH:
            motor.last_command = time.monotonic()
            return self._feedback(motor)
        if op == PARAM_SAVE:
            return None
        if op == PARAM_WRITE and rid in motor.params:
            motor.params[rid] = struct.unpack("<I", data[4:8])[0]
        if op not in (PARAM_READ, PARAM_WRITE):
            return None
        if rid in motor.params:
            value = struct.pack("<I", motor.params[rid])
        elif rid in FLOAT_PARAMS.values():
            scale = {
                FLOAT_PARAMS["PMAX"]: motor.model.p_max,
                FLOAT_PARAMS["VMAX"]: motor.model.v_max,
                FLOAT_PARAMS["TMAX"]: motor.model.t_max,
            }
            value = struct.pack("<f", scale.get(rid, 1.0))
        else:
            return None
        master = motor.params[DAMIAO_PARAMS["Master_ID"].address]
        return can.Message(
            arbitration_id=master, data=bytes([data[0], data[1], op, rid]) + value, is_extended_id=False
        )

    def _feedback(self, motor: _Motor) -> can.Message:
        fb = MotorFeedback(
            motor.motor_id, motor.state, motor.position, motor.velocity, motor.torque, t_mos=35, t_rotor=38
        )
        master = motor.params[DAMIAO_PARAMS["Master_ID"].address]
        return can.Message(arbitration_id=master, data=pack_feedback(fb, motor.model), is_extended_id=False)
