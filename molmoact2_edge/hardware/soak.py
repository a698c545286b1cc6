"""Soak a robot's driver through the safety layer against its emulator under injected faults.

What ``tests/test_soak.py`` runs briefly and ``benchmarks/soak.py`` runs long: a misbehaving
policy (random walk with jumps past the limits, NaNs, stalls) drives the robot through
``SafetyLayer`` at a fake 30 Hz clock while the emulator drops, corrupts, delays, truncates and
re-addresses replies and silences one motor for a while; at the end the port is unplugged. Every
position command the emulator received is decoded back into the robot's units and checked against
the joint limits and the per-tick step. A safe stop (``SafetyError``) ends a session and the soak
reconnects, as an operator would; any exception that is not one of the project's typed errors is
counted as untyped.

Rigs: ``so101`` (Feetech emulator, ``SO101``), ``koch`` (Dynamixel emulator, ``Koch``), ``yam``
(Damiao emulator on python-can's ``virtual`` interface, ``YAM``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from molmoact2_edge.errors import HardwareError, MolmoEdgeError, SafetyError
from molmoact2_edge.hardware.calibration import MotorCalibration, NormMode, normalize
from molmoact2_edge.hardware.emulators.faults import FaultPlan
from molmoact2_edge.hardware.robots.base import Robot
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer

logger = logging.getLogger(__name__)

ROBOTS = ("so101", "koch", "yam")
HZ = 30.0
# a stop must come within this after the unplug; the loop ticks at a real 30 Hz after it
STOP_BUDGET_S = 0.1
DEFAULT_MARGIN_S = 0.010  # the drivers' default reply deadline margin (Feetech, Dynamixel, Damiao)


@dataclass
class Rig:
    """A robot on its emulator, plus how to read back what reached the wire."""

    robot: Robot
    inject: Callable[..., None]  # inject(kind, motor_id=..., duration_s=...); "unplug" too
    apply_faults: Callable[[FaultPlan], None]
    fault_counts: Callable[[], dict[str, int]]
    wire_commands: Callable[[], list[tuple[int, float]]]  # (joint index, value in robot units), in order
    quantum: np.ndarray  # one wire step per joint, in robot units
    use_default_deadlines: Callable[[], None]  # back to the driver's own reply deadlines


@dataclass
class SoakReport:
    robot: str
    cycles: int  # control ticks run
    faults: dict[str, int]  # replies hit per fault kind
    sessions: int = 0  # safety-layer sessions (each safe stop ends one)
    safe_stops: list[str] = field(default_factory=list)  # reasons, before the unplug
    connect_failures: int = 0  # typed errors while (re)connecting under faults
    commands_checked: int = 0
    beyond_step: int = 0
    beyond_limits: int = 0
    untyped: list[str] = field(default_factory=list)
    unplug_to_stop_s: float | None = None
    wall_s: float = 0.0

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


# --- rigs ------------------------------------------------------------------------------------------

_channels = itertools.count()


def _serial_calibration(names: tuple[str, ...]) -> dict[str, MotorCalibration]:
    return {
        name: MotorCalibration(id=i + 1, drive_mode=0, homing_offset=0, range_min=1000, range_max=3000)
        for i, name in enumerate(names)
    }


@contextmanager
def rig(
    robot_kind: str, seed: int = 0, reply_margin_s: float = 0.05, log_limit: int = 100_000
) -> Iterator[Rig]:
    """A robot of ``robot_kind`` on a started emulator. ``reply_margin_s`` is the drivers' reply
    deadline margin: the emulator is a Python thread on a possibly loaded host. ``log_limit``:
    wire commands the emulator keeps (all of a soak's must fit)."""
    if robot_kind == "yam":
        with _yam_rig(seed, reply_margin_s, log_limit) as made:
            yield made
        return
    if robot_kind not in ROBOTS:
        raise MolmoEdgeError(f"unknown soak robot {robot_kind!r}; known: {', '.join(ROBOTS)}")
    with _serial_rig(robot_kind, seed, reply_margin_s, log_limit) as made:
        yield made


@contextmanager
def _serial_rig(robot_kind: str, seed: int, margin_s: float, log_limit: int) -> Iterator[Rig]:
    from molmoact2_edge.hardware.robots.serial_arm import SerialArm

    if robot_kind == "so101":
        from molmoact2_edge.hardware.buses.feetech import FeetechBus
        from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
        from molmoact2_edge.hardware.robots.so101 import SO101, SO101_JOINTS

        emu: FeetechEmulator | DynamixelEmulator = FeetechEmulator(
            range(1, 7), seed=seed, write_log_limit=log_limit
        )
        port = emu.start()
        robot: SerialArm = SO101(
            port,
            _serial_calibration(SO101_JOINTS),
            joint_frame=None,
            bus=FeetechBus(port, timeout_margin_s=margin_s),
        )
    else:
        from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
        from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
        from molmoact2_edge.hardware.robots.koch import KOCH_MOTORS, Koch

        emu = DynamixelEmulator(range(1, 7), seed=seed, write_log_limit=log_limit)
        port = emu.start()
        for i, (_, model) in enumerate(KOCH_MOTORS):
            emu.set_register(i + 1, "Model_Number", model)
            emu.set_register(i + 1, "Return_Delay_Time", 0)  # as LeRobot configures Koch arms
        names = tuple(name for name, _ in KOCH_MOTORS)
        robot = Koch(port, _serial_calibration(names), bus=DynamixelBus(port, timeout_margin_s=margin_s))
    emu.set_present_positions(dict.fromkeys(range(1, 7), 2048))
    cal = robot.calibration or {}
    by_id = {m.id: (k, name, m.norm_mode) for k, (name, m) in enumerate(robot.motors.items())}

    def to_units(motor_id: int, raw: int) -> tuple[int, float]:
        k, name, mode = by_id[motor_id]
        return k, normalize(raw, cal[name], mode, robot.resolution, apply_drive_mode=robot.apply_drive_mode)

    def wire_commands() -> list[tuple[int, float]]:
        return [to_units(r.motor_id, r.value) for r in list(emu.write_log) if r.register == "Goal_Position"]

    quantum = np.array(
        [
            100 / 2000
            if m.norm_mode is NormMode.RANGE_0_100
            else 200 / 2000
            if m.norm_mode is NormMode.RANGE_M100_100
            else 360 / (robot.resolution - 1)
            for m in robot.motors.values()
        ],
        np.float32,
    )
    try:
        yield Rig(
            robot,
            emu.inject_fault,
            emu.apply_faults,
            emu.fault_counts,
            wire_commands,
            quantum,
            lambda: setattr(robot.bus, "timeout_margin_s", DEFAULT_MARGIN_S),
        )
    finally:
        if robot.bus.is_connected:
            robot.bus.disconnect()
        emu.stop()


@contextmanager
def _yam_rig(seed: int, margin_s: float, log_limit: int) -> Iterator[Rig]:
    from molmoact2_edge.hardware.buses.damiao import DamiaoBus
    from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
    from molmoact2_edge.hardware.robots.yam import ARM_MODELS, GRIPPER_ID, YAM

    motors = {i + 1: m for i, m in enumerate(ARM_MODELS)} | {GRIPPER_ID: "dm4310"}
    gripper_range = (-0.2, 1.8)
    emu = DamiaoEmulator(
        motors,
        channel=f"molmo-soak-{next(_channels)}",
        hard_limits={GRIPPER_ID: gripper_range},
        seed=seed,
        command_log_limit=log_limit,
    )
    emu.start()
    emu.set_positions({2: 0.5, 3: 0.4})  # inside the joint limits (their lower bound is 0)
    bus = DamiaoBus(emu.channel, motors, interface="virtual", reply_timeout_s=margin_s)
    robot = YAM(emu.channel, gripper_range=gripper_range, bus=bus)
    closed, opened = gripper_range

    def wire_commands() -> list[tuple[int, float]]:
        return [
            (i - 1, (c.position - closed) / (opened - closed) if i == GRIPPER_ID else c.position)
            for _, i, c in list(emu.command_log)
        ]

    mit_step = 25.0 / 65535  # 16-bit position over +-12.5 rad
    quantum = np.array([mit_step] * 6 + [mit_step / (opened - closed)], np.float32)
    try:
        yield Rig(
            robot,
            emu.inject_reply_fault,
            emu.apply_faults,
            emu.fault_counts,
            wire_commands,
            quantum,
            lambda: setattr(bus, "reply_timeout_s", DEFAULT_MARGIN_S),
        )
    finally:
        if robot.bus.is_connected:
            robot.bus.disconnect()
        emu.stop()


# --- the soak --------------------------------------------------------------------------------------


def policy_targets(rng: np.random.Generator, n: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """A misbehaving policy in the robot's units: a wandering pose with jumps past the limits, NaNs
    and stalls (rows of +inf: no action that tick)."""
    span = upper - lower
    walk = np.zeros((n, len(lower)), np.float32)
    noise = rng.normal(0, 0.03, walk.shape).astype(np.float32) * span
    walk[0] = (lower + upper) / 2
    for k in range(1, n):
        walk[k] = walk[k - 1] + noise[k] - 0.02 * (walk[k - 1] - walk[0])
    jumps = rng.random(n) < 0.02
    walk[jumps] += (rng.normal(0, 1.0, (int(jumps.sum()), len(lower))) * span).astype(np.float32)
    walk[rng.random(n) < 0.005, 0] = np.nan
    for start in rng.choice(max(n - 10, 1), max(n // 300, 1), replace=False):
        walk[start : start + 10] = np.inf
    return walk


def soak(
    robot_kind: str,
    cycles: int,
    plan: FaultPlan,
    *,
    silence_at: float = 0.5,
    silence_s: float = 0.2,
    reply_margin_s: float = 0.05,
) -> SoakReport:
    """Run ``cycles`` control ticks of ``robot_kind`` under ``plan``'s per-reply faults, silence
    motor 2 for ``silence_s`` at the ``silence_at`` fraction of the run, then unplug the port and
    time the safe stop. ``plan.seed`` seeds the faults and the policy."""
    rng = np.random.default_rng(plan.seed)
    t0 = time.perf_counter()
    # every joint of every tick, plus the holds of the reconnects, must stay in the emulator's log
    with rig(robot_kind, plan.seed, reply_margin_s, log_limit=10 * cycles + 10_000) as r:
        limits = r.robot.limits()
        lower, upper = np.asarray(limits.lower, np.float32), np.asarray(limits.upper, np.float32)
        targets = policy_targets(rng, cycles, lower, upper)
        report = SoakReport(robot_kind, 0, {})
        clock = _FakeClock()
        config = SafetyConfig(watchdog_thread=False, handle_signals=False, watchdog_s=0.2)
        session_starts: list[int] = []  # index into the wire commands where each session began
        max_step = None
        r.apply_faults(plan)
        silence_tick = int(cycles * silence_at)
        k = 0
        while k < cycles:
            session_starts.append(len(r.wire_commands()))  # connecting may command a hold already
            if not _connect(r.robot, report):
                continue
            # serial goal writes are applied asynchronously; the connect's acknowledged pings mean
            # every earlier one is in the log now
            session_starts.append(len(r.wire_commands()))
            report.sessions += 1
            try:
                with SafetyLayer(r.robot, config, clock=clock) as safety:
                    max_step = safety.max_step
                    while k < cycles:
                        clock.now += 1 / HZ
                        if k == silence_tick:
                            r.inject("silence", motor_id=2, duration_s=silence_s)
                        target = targets[k]
                        k += 1
                        report.cycles += 1
                        if np.isinf(target).all():
                            safety.poll_watchdog()
                        else:
                            safety.send(target)
            except SafetyError as err:
                report.safe_stops.append(str(err).split(": ", 1)[0])
            except Exception as err:  # noqa: BLE001 (what the soak counts)
                report.untyped.append(f"{type(err).__name__}: {err}")
            _disconnect(r.robot, report)
        report.unplug_to_stop_s = _unplug_and_time_stop(r, report, clock, config, session_starts)
        time.sleep(0.05)  # the emulator thread applies the last writes
        _check_wire(r, report, session_starts, lower, upper, max_step)
        report.faults = r.fault_counts()
    report.wall_s = time.perf_counter() - t0
    return report


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _connect(robot: Robot, report: SoakReport) -> bool:
    """Connect for a new session; typed failures under faults count and are retried."""
    try:
        robot.connect()
        return True
    except HardwareError:
        report.connect_failures += 1
    except Exception as err:  # noqa: BLE001
        report.untyped.append(f"{type(err).__name__} while connecting: {err}")
    _disconnect(robot, report)
    if report.connect_failures + len(report.untyped) > 50:
        raise SafetyError(
            f"{robot.name}: the soak could not reconnect 50 times; is the fault plan too heavy?"
        )
    return False


def _disconnect(robot: Robot, report: SoakReport) -> None:
    try:
        robot.disconnect()
    except HardwareError:
        pass  # a dead bus while disconnecting is expected under faults
    except Exception as err:  # noqa: BLE001
        report.untyped.append(f"{type(err).__name__} while disconnecting: {err}")


def _unplug_and_time_stop(
    r: Rig, report: SoakReport, clock: _FakeClock, config: SafetyConfig, session_starts: list[int]
) -> float | None:
    """Start a session with the driver's own deadlines, unplug, keep ticking at a real 30 Hz:
    seconds to the safe stop."""
    r.use_default_deadlines()
    for _ in range(20):  # the per-reply faults stay on
        session_starts.append(len(r.wire_commands()))
        if _connect(r.robot, report):
            break
    else:
        return None
    session_starts.append(len(r.wire_commands()))
    report.sessions += 1
    stopped_after: float | None = None
    try:
        with SafetyLayer(r.robot, config, clock=clock) as safety:
            assert safety.last_commanded is not None  # set by start()
            hold = safety.last_commanded.copy()
            r.inject("unplug")
            unplugged = time.perf_counter()
            try:
                for _ in range(int(HZ)):  # one second of ticks
                    clock.now += 1 / HZ
                    safety.send(hold)
                    time.sleep(1 / HZ)
            except SafetyError:
                stopped_after = time.perf_counter() - unplugged
    except SafetyError as err:  # the unplug hit while starting the session
        report.safe_stops.append(str(err).split(": ", 1)[0])
    except Exception as err:  # noqa: BLE001
        report.untyped.append(f"{type(err).__name__} after the unplug: {err}")
    _disconnect(r.robot, report)
    return stopped_after


def _check_wire(
    r: Rig,
    report: SoakReport,
    session_starts: list[int],
    lower: np.ndarray,
    upper: np.ndarray,
    max_step: np.ndarray | None,
) -> None:
    """Every command that reached the emulator: inside the limits, and within one step of the
    previous command of its joint. A session starts by commanding the measured pose, so the step
    check restarts at each session boundary (marked before and after each connect: the log of a
    serial chain is only complete once the connect's acknowledged transactions went through)."""
    commands = r.wire_commands()
    starts = set(session_starts)
    previous: dict[int, float] = {}
    tolerance = 1.5 * r.quantum
    for n, (joint, value) in enumerate(commands):
        if n in starts:
            previous.clear()
        report.commands_checked += 1
        if not lower[joint] - tolerance[joint] <= value <= upper[joint] + tolerance[joint]:
            report.beyond_limits += 1
        step = abs(value - previous[joint]) if joint in previous else 0.0
        if max_step is not None and step > max_step[joint] + tolerance[joint]:
            report.beyond_step += 1
        previous[joint] = value
