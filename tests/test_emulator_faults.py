"""The emulators rehearse the bench: fault injection (API, ``--faults`` plans, CLI), baud rates that
matter, and a sweep that lets ``molmo-edge calibrate`` finish against ``molmo-edge emulate so101``."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.errors import BusTimeoutError, ChecksumError, ConfigError, PortError
from molmoact2_edge.hardware.buses.damiao import DamiaoBus
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.buses.feetech import FeetechBus
from molmoact2_edge.hardware.calibration import load_calibration
from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
from molmoact2_edge.hardware.emulators.faults import FaultPlan, Silence, parse_faults
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator

SLOW = ["--timeout-ms", "50"]  # the emulators are Python threads on a shared CI box
_channels = itertools.count()


# --- the --faults spelling -------------------------------------------------------------------------


def test_parse_faults_reads_every_key() -> None:
    plan = parse_faults(
        "drop=0.01,corrupt=0.005,late=0.002,late_ms=30,truncate=0.001,wrong_id=0.003,silence=5@10+2,unplug=60,seed=7"
    )
    assert plan == FaultPlan(
        {"drop_reply": 0.01, "corrupt_checksum": 0.005, "delay": 0.002, "truncate": 0.001, "wrong_id": 0.003},
        late_s=0.03,
        silences=(Silence(5, 10.0, 2.0),),
        unplug_after_s=60.0,
        seed=7,
    )


@pytest.mark.parametrize("spec", ["drop", "drop=1.5", "drop=x", "loss=0.1", "silence=5@x+2", "seed=1.5"])
def test_parse_faults_refuses_typos_with_the_spelling(spec: str) -> None:
    with pytest.raises(ConfigError, match="drop=P, corrupt=P"):
        parse_faults(spec)


# --- serial emulators -------------------------------------------------------------------------------


@contextmanager
def feetech(**kw) -> Iterator[tuple[FeetechEmulator, FeetechBus]]:
    with FeetechEmulator([1, 2, 3], seed=0, **kw) as emu, FeetechBus(emu.port, timeout_margin_s=0.05) as bus:
        yield emu, bus


def test_wrong_id_reply_is_refused_and_retried() -> None:
    with feetech() as (emu, bus):
        emu.inject_fault("wrong_id", motor_id=2, count=1)
        assert bus.sync_read("Present_Position", [1, 2, 3]) == {1: 2048, 2: 2048, 3: 2048}  # the retry
        emu.inject_fault("wrong_id", motor_id=2)
        with pytest.raises(ChecksumError, match="unexpected status packet from id 4"):
            bus.read("Present_Position", 2)
        assert emu.fault_counts()["wrong_id"] == 4


def test_silence_for_a_time_then_the_servo_answers_again() -> None:
    with feetech() as (emu, bus):
        emu.inject_fault("silence", motor_id=3, duration_s=1.0)
        with pytest.raises(BusTimeoutError, match="no status packet from motor 3"):
            bus.sync_read("Present_Position", [1, 2, 3])
        time.sleep(1.05)
        assert bus.read("Present_Position", 3) == 2048


def _outcomes_until_unplugged(read: Callable[[], object], limit_s: float = 5.0) -> list[str]:
    """Poll ``read`` (timers on a loaded host fire late, so no fixed sleeps): what each try met."""
    outcomes: list[str] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            read()
            outcomes.append("ok")
        except BusTimeoutError:
            outcomes.append("silent")
        except PortError:
            return [*outcomes, "unplugged"]
        time.sleep(0.02)
    return outcomes


def test_a_fault_plan_silences_then_unplugs_on_schedule() -> None:
    with feetech() as (emu, bus):
        emu.apply_faults(FaultPlan(silences=(Silence(1, 0.1, 0.3),), unplug_after_s=0.8))
        outcomes = _outcomes_until_unplugged(lambda: bus.read("Present_Position", 1))
    assert outcomes[0] == "ok" and outcomes[-1] == "unplugged", outcomes
    silent = outcomes.index("silent")  # the silence came, then went, then the port
    assert "ok" in outcomes[silent:-1], outcomes


def test_a_driver_at_the_wrong_baud_rate_gets_nothing() -> None:
    with FeetechEmulator([1], baudrate=500_000) as emu:
        with FeetechBus(emu.port, baudrate=1_000_000, retries=0) as bus, pytest.raises(BusTimeoutError):
            bus.ping(1)
        with FeetechBus(emu.port, baudrate=500_000) as bus:
            assert bus.ping(1) == 777
            bus.write("Baud_Rate", 1, 0)  # the servo moves to 1 Mbps, as the setup wizard does
            with pytest.raises(BusTimeoutError):
                bus.ping(1)
    with DynamixelEmulator([1], baudrate=57_600) as emu:
        with DynamixelBus(emu.port, baudrate=1_000_000, retries=0) as bus, pytest.raises(BusTimeoutError):
            bus.ping(1)
        with DynamixelBus(emu.port, baudrate=57_600) as bus:
            assert bus.ping(1) == 1020
    with pytest.raises(ConfigError, match="cannot run at 1234"):
        FeetechEmulator([1], baudrate=1234)


def test_sweep_moves_torque_off_joints_and_torque_holds_them() -> None:
    with feetech(sweep=True, sweep_period_s=0.5) as (emu, bus):
        seen = set()
        for _ in range(20):
            seen.add(bus.read("Present_Position", 1))
            time.sleep(0.03)
        assert max(seen) - min(seen) > 900  # most of the +-900-step sweep
        bus.write("Torque_Enable", 1, 1)
        held = bus.read("Present_Position", 1)
        time.sleep(0.3)
        assert abs(bus.read("Present_Position", 1) - held) <= 2  # torque on: it follows its goal


# --- Damiao emulator --------------------------------------------------------------------------------


@contextmanager
def damiao() -> Iterator[tuple[DamiaoEmulator, DamiaoBus]]:
    motors = {1: "dm4340", 2: "dm4310"}
    emu = DamiaoEmulator(motors, channel=f"faults-damiao-{next(_channels)}")
    emu.start()
    # 200 ms: the emulator is a Python thread that a loaded CI machine can starve past 50 ms
    bus = DamiaoBus(emu.channel, motors, interface="virtual", retries=0, reply_timeout_s=0.2)
    bus.connect()
    try:
        yield emu, bus
    finally:
        bus.disconnect()
        emu.stop()


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("drop_reply", BusTimeoutError, r"no feedback from motor\(s\) \[2\]"),
        ("corrupt_checksum", BusTimeoutError, r"no feedback from motor\(s\) \[2\]"),  # the CAN CRC drops it
        ("truncate", ChecksumError, "8 data bytes, got 4"),
        ("wrong_id", ChecksumError, "names motor 2"),
        ("delay", BusTimeoutError, r"no feedback from motor\(s\) \[2\]"),
    ],
)
def test_damiao_reply_faults_map_to_typed_errors(kind: str, error: type, match: str) -> None:
    with damiao() as (emu, bus):
        emu.inject_reply_fault(kind, motor_id=2, count=1, delay_s=0.3)  # later than the bus waits
        with pytest.raises(error, match=match):
            bus.refresh()
        time.sleep(0.15)  # a late reply arrives now; the next transaction drains it
        assert set(bus.refresh()) == {1, 2}


def test_damiao_plan_unplugs_the_chain() -> None:
    with damiao() as (emu, bus):
        emu.apply_faults(parse_faults("unplug=0.3"))
        outcomes = []
        deadline = time.monotonic() + 5.0
        while "silent" not in outcomes and time.monotonic() < deadline:
            try:
                bus.refresh()
                outcomes.append("ok")
            except BusTimeoutError:
                outcomes.append("silent")
            time.sleep(0.02)
    assert outcomes[0] == "ok" and outcomes[-1] == "silent", outcomes


# --- the CLI ------------------------------------------------------------------------------------------


@contextmanager
def emulate(*args: str) -> Iterator[str]:
    """``molmo-edge emulate ...`` in a subprocess; yields the --port it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "molmoact2_edge.cli.main", "emulate", *args, "--seconds", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "--port /dev/" in line, line
        yield line.split("--port ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_calibrate_completes_against_molmo_edge_emulate_so101(tmp_path) -> None:
    out = tmp_path / "follower.json"
    with emulate("so101", "--sweep", "--sweep-period", "1.0") as port:
        result = CliRunner().invoke(
            cli,
            ["calibrate", "so101", *SLOW, "--port", port, "--output", str(out), "--duration", "1.5"],
            input="\n",
        )
        assert result.exit_code == 0, result.output
        assert "calibration saved" in result.output
        cal = load_calibration(out)
        for name in ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "gripper"):
            assert cal[name].range_max - cal[name].range_min > 1200, (name, cal[name])
            # the middle pose reads 2047 after homing: the recorded range lies around it
            assert cal[name].range_min < 2047 + 900 and cal[name].range_max > 2047 - 900
        assert (cal["wrist_roll"].range_min, cal["wrist_roll"].range_max) == (0, 4095)
        # the calibration file works on the emulated arm: connect writes it to the servos
        result = CliRunner().invoke(
            cli, ["motors", "read", *SLOW, "--bus", "feetech", "--port", port, "--id", "1", "Homing_Offset"]
        )
        assert result.exit_code == 0 and f"1:{cal['shoulder_pan'].homing_offset}" in result.output, (
            result.output
        )


def test_emulate_honours_baud_and_faults() -> None:
    with emulate("so101", "--baud", "500000") as port:
        scan = ["motors", "scan", *SLOW, "--bus", "feetech", "--port", port, "--ids", "1-6"]
        result = CliRunner().invoke(cli, scan)
        assert result.exit_code != 0 and "no motor answered" in result.output
        result = CliRunner().invoke(cli, [*scan, "--all-baudrates"])
        assert result.exit_code == 0, result.output
        assert {line.split()[0] for line in result.output.strip().splitlines()} == {"500000"}
    with emulate("so101", "--faults", "drop=1") as port:
        result = CliRunner().invoke(
            cli, ["motors", "read", *SLOW, "--bus", "feetech", "--port", port, "--id", "1", "ID"]
        )
        assert result.exit_code != 0 and "no status packet from motor 1" in result.output, result.output
    result = CliRunner().invoke(cli, ["emulate", "so101", "--faults", "drop=2"])
    assert result.exit_code != 0 and "--faults: cannot read 'drop=2'" in result.output
