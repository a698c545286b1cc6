"""``molmo-edge motors | calibrate | emulate``: the servo wizard, LeRobot-compatible calibration, emulated buses.

Library code (buses, robots, calibration procedure) stays free of terminal I/O; the prompts
and tables live here.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from molmoact2_edge.errors import HardwareError
from molmoact2_edge.hardware.emulators.faults import FAULTS_HELP

BUSES = ("feetech", "dynamixel", "damiao")


def _parse_ids(spec: str) -> list[int]:
    """``"1-6"``, ``"1,3,7"`` or ``"1-3,7"`` -> ids."""
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            ids.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise click.BadParameter(f"expected ids like 1-6 or 1,3,7, got {spec!r}") from None
    return ids


def _open_bus(
    bus: str, port: str, baudrate: int | None, interface: str, ids: list[int], timeout_ms: float
) -> Any:
    """A bus object for the wizard (not connected)."""
    if bus == "feetech":
        from molmoact2_edge.hardware.buses.feetech import FeetechBus

        return FeetechBus(port, baudrate=baudrate, timeout_margin_s=timeout_ms / 1000)
    if bus == "dynamixel":
        from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus

        return DynamixelBus(port, baudrate=baudrate, timeout_margin_s=timeout_ms / 1000)
    from molmoact2_edge.hardware.buses.damiao import DamiaoBus

    # the model only scales MIT frames; parameters (what the wizard touches) are model-independent
    return DamiaoBus(
        port,
        dict.fromkeys(ids, "dm4310"),
        interface=interface,
        baudrate=baudrate,
        reply_timeout_s=timeout_ms / 1000,
    )


def _baud_table(bus: str) -> dict[int, int]:
    if bus == "feetech":
        from molmoact2_edge.hardware.buses.feetech_tables import BAUD_RATES
    elif bus == "dynamixel":
        from molmoact2_edge.hardware.buses.dynamixel_tables import BAUD_RATES
    else:
        return {0: 1_000_000}
    return dict(BAUD_RATES)


bus_option = click.option(
    "--bus", "bus_kind", type=click.Choice(BUSES), required=True, help="Servo family on the port."
)
port_option = click.option(
    "--port", required=True, help="Serial device (/dev/ttyACM0) or CAN channel (can0)."
)
interface_option = click.option(
    "--interface",
    default="socketcan",
    show_default=True,
    help="python-can interface for --bus damiao (socketcan, slcan, udp_multicast).",
)
timeout_option = click.option(
    "--timeout-ms",
    type=float,
    default=10.0,
    show_default=True,
    help="Extra wait for replies per transaction (raise it for slow USB adapters or slcan).",
)
baud_option = click.option(
    "--baudrate", type=int, default=None, help="Bus speed (default: the family's 1 Mbps)."
)


@click.group()
def motors() -> None:
    """Servo wizard: find motors, read and write their registers.

    \b
    Examples:
      molmo-edge motors scan --bus feetech --port /dev/ttyACM0
      molmo-edge motors read --bus feetech --port /dev/ttyACM0 --ids 1-6 Present_Position Status
      molmo-edge motors write --bus feetech --port /dev/ttyACM0 --ids 6 Torque_Enable 0
      molmo-edge motors read --bus damiao --port can0 --ids 1-7 Timeout
      molmo-edge motors setup so101 --port /dev/ttyACM0
    """


@motors.command()
@bus_option
@port_option
@interface_option
@timeout_option
@click.option("--ids", "--id", "ids", default="1-20", show_default=True, help="Motor ids to ping, e.g. 1-20.")
@click.option(
    "--all-baudrates/--default-baudrate",
    default=False,
    help="Try every baud rate the family supports (slow).",
)
def scan(bus_kind: str, port: str, interface: str, timeout_ms: float, ids: str, all_baudrates: bool) -> None:
    """Ping ids (at one or every baud rate) and list what answers."""
    id_list = _parse_ids(ids)
    bus = _open_bus(bus_kind, port, None, interface, id_list, timeout_ms)
    rates = sorted(set(_baud_table(bus_kind).values()), reverse=True) if all_baudrates else [bus.baudrate]
    with bus:
        found = bus.scan(id_list, rates)
    if not found:
        raise HardwareError(
            f"no motor answered on {port} (ids {ids}, baud rates {rates}); check power, cabling and --bus"
        )
    for baud, motors_found in found.items():
        for motor_id, model in sorted(motors_found.items()):
            name = bus.model_numbers.get(model, "damiao drive" if bus_kind == "damiao" else f"model {model}")
            click.echo(f"{baud:>9}  id {motor_id:>3}  {name}")


def _bus_options(command: Callable[..., None]) -> Callable[..., None]:
    """--bus --port --interface --baudrate --timeout-ms, shared by read and write."""
    for option in reversed((bus_option, port_option, interface_option, baud_option, timeout_option)):
        command = option(command)
    return command


@motors.command()
@_bus_options
@click.option("--ids", "--id", "ids", default="1", show_default=True, help="Motor ids, e.g. 6, 1-6 or 1,3.")
@click.argument("registers", nargs=-1)
def read(
    bus_kind: str,
    port: str,
    interface: str,
    baudrate: int | None,
    timeout_ms: float,
    ids: str,
    registers: tuple[str, ...],
) -> None:
    """Read registers by name (default: every register of the control table)."""
    id_list = _parse_ids(ids)
    bus = _open_bus(bus_kind, port, baudrate, interface, id_list, timeout_ms)
    names = list(registers) or list(bus.control_table)
    with bus:
        for name in names:
            reg = bus.control_table.resolve(name)
            values = [str(bus.read(reg, i)) for i in id_list]
            click.echo(
                f"{reg.name:<28} @{reg.address:<4} "
                + "  ".join(f"{i}:{v}" for i, v in zip(id_list, values, strict=True))
            )


@motors.command()
@_bus_options
@click.option("--ids", "--id", "ids", required=True, help="Motor ids, e.g. 6, 1-6 or 1,3.")
@click.argument("register")
@click.argument("value", type=int)
def write(
    bus_kind: str,
    port: str,
    interface: str,
    baudrate: int | None,
    timeout_ms: float,
    ids: str,
    register: str,
    value: int,
) -> None:
    """Write one register of one or more motors and read it back.

    EEPROM registers (ID, Baud_Rate, limits, offsets) need torque off first (and Lock 0 on Feetech).
    """
    id_list = _parse_ids(ids)
    bus = _open_bus(bus_kind, port, baudrate, interface, id_list, timeout_ms)
    with bus:
        reg = bus.control_table.resolve(register)
        for motor_id in id_list:
            bus.write(reg, motor_id, value)
            if reg.name in ("ID", "CAN_ID", "Baud_Rate"):
                click.echo(
                    f"motor {motor_id}: {reg.name} <- {value} (the motor now answers at its new setting)"
                )
                continue
            click.echo(f"motor {motor_id}: {reg.name} <- {value}, reads {bus.read(reg, motor_id)}")


@motors.command()
@click.argument("robot_kind", type=click.Choice(["so101", "koch"]))
@port_option
@click.option("--motor", "only", default=None, help="Set up this joint only (default: all, gripper first).")
@click.option(
    "--ids", "--id", "ids", default="1-20", show_default=True, help="Motor ids to look for the connected motor at."
)
@timeout_option
def setup(robot_kind: str, port: str, only: str | None, ids: str, timeout_ms: float) -> None:
    """Give each motor of an arm its id and the bus baud rate, one motor connected at a time.

    
    What lerobot-setup-motors does: a new servo answers at id 1 (or anything); it is found by
    scanning ids and baud rates, then gets the joint's id and 1 Mbps.
      molmo-edge motors setup so101 --port /dev/ttyACM0
    """
    from molmoact2_edge.hardware.robots import make_robot
    from molmoact2_edge.hardware.robots.serial_arm import SerialArm

    bus = _open_bus(_bus_of(robot_kind), port, None, "", [], timeout_ms)
    robot = make_robot(robot_kind, port=port, calibration={}, bus=bus)
    assert isinstance(robot, SerialArm)
    names = [only] if only else list(reversed(robot.joint_names))
    unknown = [n for n in names if n not in robot.motors]
    if unknown:
        raise click.BadParameter(
            f"unknown joint {unknown[0]!r}; {robot_kind} has {', '.join(robot.joint_names)}"
        )
    # the bus's own rate first (a motor set up before), then the others, fastest first
    rates = [robot.bus.baudrate] + sorted(
        set(_baud_table(_bus_of(robot_kind)).values()) - {robot.bus.baudrate}, reverse=True
    )
    for name in names:
        click.prompt(
            f"Connect the controller board to the '{name}' motor only and press Enter",
            default="",
            show_default=False,
            prompt_suffix="",
        )
        found_id, found_baud = robot.find_lone_motor(_parse_ids(ids), rates)
        robot.assign_motor(name, found_id, found_baud)
        click.echo(
            f"'{name}' motor: id {found_id} @ {found_baud} -> id {robot.motors[name].id} @ {robot.bus.baudrate}"
        )


def _bus_of(robot_kind: str) -> str:
    return {"so101": "feetech", "koch": "dynamixel"}[robot_kind]


# --- calibrate ------------------------------------------------------------------------------


def _range_table(mins: Mapping[str, int], maxes: Mapping[str, int], current: Mapping[str, int]) -> str:
    rows = [f"{'joint':<15} {'min':>6} {'pos':>6} {'max':>6}"]
    rows += [f"{name:<15} {mins[name]:>6} {current.get(name, 0):>6} {maxes[name]:>6}" for name in mins]
    return "\n".join(rows)


@click.command()
@click.argument("robot_kind", type=click.Choice(["so101", "koch"]))
@port_option
@click.option(
    "--robot-id",
    default="follower",
    show_default=True,
    help="LeRobot --robot.id: names the calibration file.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to save (default: LeRobot's calibration folder).",
)
@click.option(
    "--duration", type=float, default=None, help="Record ranges for this many seconds instead of until Enter."
)
@click.option("--force", is_flag=True, help="Recalibrate even if a calibration file exists.")
@timeout_option
def calibrate(
    robot_kind: str,
    port: str,
    robot_id: str,
    output: str | None,
    duration: float | None,
    force: bool,
    timeout_ms: float,
) -> None:
    """Calibrate an SO-101 (or Koch) follower, LeRobot-compatible.

    \b
    Writes ~/.cache/huggingface/lerobot/calibration/robots/so_follower/<robot-id>.json, the
    file lerobot-calibrate writes, and the offsets/limits to the servos.
      molmo-edge calibrate so101 --port /dev/ttyACM0 --robot-id follower
    """
    from pathlib import Path

    from molmoact2_edge.hardware.calibration import load_calibration
    from molmoact2_edge.hardware.robots import make_robot
    from molmoact2_edge.hardware.robots.serial_arm import SerialArm
    from molmoact2_edge.runtimes.preflight import check_output_file

    # an empty calibration keeps the robot from loading (and validating) an existing file here
    bus = _open_bus(_bus_of(robot_kind), port, None, "", [], timeout_ms)
    robot = make_robot(robot_kind, port=port, robot_id=robot_id, calibration={}, bus=bus)
    assert isinstance(robot, SerialArm)
    robot.calibration = None
    path = Path(output) if output else robot.calibration_path()
    check_output_file(path, "--output")  # before any servo is touched: a calibration must never be lost
    robot.connect_for_calibration()
    try:
        if path.exists() and not force:
            answer = click.prompt(
                f"{path} exists. Enter to write it to the motors, or 'c' to recalibrate",
                default="",
                show_default=False,
            )
            if answer.strip().lower() != "c":
                robot.write_calibration(load_calibration(path, robot.joint_names))
                click.echo(f"wrote {path} to the motors on {port}")
                return
        click.prompt(
            f"Move {robot_kind} to the middle of its range of motion, then press Enter",
            default="",
            show_default=False,
            prompt_suffix="",
        )
        offsets = robot.set_half_turn_homings()
        swept = [n for n in robot.joint_names if n not in robot.full_turn_motors]
        click.echo(
            f"Move every joint except {', '.join(robot.full_turn_motors) or 'none'} through its full range ({', '.join(swept)})."
        )
        stop = threading.Event()
        if duration is None:
            click.echo("Press Enter to stop recording.")
            threading.Thread(target=_set_on_enter, args=(stop,), daemon=True).start()
        else:
            threading.Timer(duration, stop.set).start()
        mins, maxes = robot.record_ranges(stop.is_set)
        click.echo(_range_table(mins, maxes, {}))
        robot.finish_calibration(offsets, mins, maxes, path)
        click.echo(f"calibration saved to {path}")
    finally:
        robot.bus.disconnect()


def _set_on_enter(event: threading.Event) -> None:
    sys.stdin.readline()
    event.set()


# --- emulate --------------------------------------------------------------------------------


@click.command()
@click.argument("robot_kind", type=click.Choice(["so101", "koch", "yam"]))
@click.option(
    "--channel",
    default="239.74.163.2",
    show_default=True,
    help="yam: udp_multicast group used as the CAN channel.",
)
@click.option(
    "--baudrate",
    "--baud",
    type=int,
    default=1_000_000,
    show_default=True,
    help="so101/koch: the rate the servos listen at; a driver at another rate gets no reply.",
)
@click.option(
    "--sweep/--no-sweep",
    default=False,
    help="so101/koch: joints with torque off move through their range by themselves, as a hand "
    "would during `molmo-edge calibrate`.",
)
@click.option("--sweep-period", type=float, default=3.0, show_default=True, help="Seconds per sweep.")
@click.option("--faults", default=None, help=f"Inject faults into the replies: {FAULTS_HELP}.")
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: until Ctrl-C).")
def emulate(
    robot_kind: str,
    channel: str,
    baudrate: int,
    sweep: bool,
    sweep_period: float,
    faults: str | None,
    seconds: float | None,
) -> None:
    """Start an emulated bus with the robot's motors and print where to connect.

    \b
      molmo-edge emulate so101 --sweep      # prints a pty path: use it as --port
      molmo-edge emulate so101 --faults drop=0.01,corrupt=0.005,late=0.002,silence=5@10+2,unplug=60
      molmo-edge emulate yam        # prints: --bus damiao --interface udp_multicast --port 239.74.163.2
    """
    from molmoact2_edge.hardware.emulators.faults import parse_faults

    plan = parse_faults(faults) if faults else None  # a typo fails before anything starts
    emulator: Any
    if robot_kind in ("so101", "koch"):
        emulator = _serial_emulator(robot_kind, baudrate, sweep, sweep_period, plan.seed if plan else 0)
        where = f"--port {emulator.port}"
    else:
        from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
        from molmoact2_edge.hardware.robots.yam import ARM_MODELS, GRIPPER_ID

        _require_msgpack()
        motors_map = {i + 1: m for i, m in enumerate(ARM_MODELS)} | {GRIPPER_ID: "dm4310"}
        emulator = DamiaoEmulator(
            motors_map,
            channel=channel,
            interface="udp_multicast",
            hard_limits={GRIPPER_ID: (-0.2, 1.8)},
            seed=plan.seed if plan else 0,
        )
        where = f"--bus damiao --interface udp_multicast --port {emulator.start()}"
    if plan is not None:
        emulator.apply_faults(plan)
    click.echo(f"emulated {robot_kind} running: {where}", nl=True)
    if plan is not None:
        click.echo(f"injecting faults: {faults}")
    click.echo("Ctrl-C to stop.")
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        emulator.stop()


def _serial_emulator(robot_kind: str, baudrate: int, sweep: bool, sweep_period: float, seed: int) -> Any:
    """The started pty emulator of an SO-101 (Feetech) or Koch (Dynamixel) arm."""
    from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
    from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
    from molmoact2_edge.hardware.robots.koch import KOCH_MOTORS

    kind = FeetechEmulator if robot_kind == "so101" else DynamixelEmulator
    emulator = kind(range(1, 7), baudrate=baudrate, sweep=sweep, sweep_period_s=sweep_period, seed=seed)
    emulator.start()
    if robot_kind == "koch":
        for i, (_, model) in enumerate(KOCH_MOTORS):
            emulator.set_register(i + 1, "Model_Number", model)
    return emulator


def _require_msgpack() -> None:
    try:
        import msgpack  # noqa: F401  (python-can's udp_multicast interface needs it)
    except ImportError as err:
        from molmoact2_edge.errors import DependencyError

        raise DependencyError(
            "an emulated CAN bus other processes can reach uses python-can's udp_multicast: pip install msgpack"
        ) from err
