"""``molmo-edge motors | calibrate | emulate`` end to end on emulated buses (CliRunner on the real CLI)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.hardware.calibration import load_calibration
from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator

_channels = itertools.count()
SLOW = ["--timeout-ms", "50"]  # the emulators are Python threads on a shared CI box


@pytest.fixture
def feetech():
    emulator = FeetechEmulator([1, 2, 3, 5], seed=0)
    emulator.start()
    yield emulator
    emulator.stop()


def test_motors_scan_finds_the_emulated_ids(feetech) -> None:
    result = CliRunner().invoke(
        cli, ["motors", "scan", *SLOW, "--bus", "feetech", "--port", feetech.port, "--ids", "1-6"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["1", "2", "3", "5"]
    assert all("sts3215" in line and line.split()[0] == "1000000" for line in lines)


def test_motors_scan_nothing_found_is_an_error(feetech) -> None:
    result = CliRunner().invoke(
        cli, ["motors", "scan", *SLOW, "--bus", "feetech", "--port", feetech.port, "--ids", "7-8"]
    )
    assert result.exit_code == 4
    assert "no motor answered" in result.output


def test_motors_read_and_write_registers_by_name(feetech) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "motors",
            "write",
            *SLOW,
            "--bus",
            "feetech",
            "--port",
            feetech.port,
            "--id",
            "2",
            "Goal_Position",
            "1234",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Goal_Position <- 1234, reads 1234" in result.output
    assert feetech.get_register(2, "Goal_Position") == 1234
    result = runner.invoke(
        cli,
        [
            "motors",
            "read",
            "--bus",
            "feetech",
            "--port",
            feetech.port,
            "--id",
            "1-3",
            "Model_Number",
            "Goal_Position",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1:777  2:777  3:777" in result.output and "2:1234" in result.output
    result = runner.invoke(
        cli, ["motors", "read", *SLOW, "--bus", "feetech", "--port", feetech.port, "Goal_Positon"]
    )
    assert result.exit_code != 0 and "did you mean Goal_Position" in result.output


def test_motors_on_damiao_can() -> None:
    channel = f"cli-dm-{next(_channels)}"
    with DamiaoEmulator({1: "dm4340", 2: "dm4310"}, channel=channel):
        runner = CliRunner()
        result = runner.invoke(
            cli,
            [
                "motors",
                "scan",
                "--bus",
                "damiao",
                "--interface",
                "virtual",
                "--port",
                channel,
                "--ids",
                "1-4",
            ],
        )
        assert result.exit_code == 0, result.output
        assert [line.split()[2] for line in result.output.strip().splitlines()] == ["1", "2"]
        result = runner.invoke(
            cli,
            [
                "motors",
                "write",
                "--bus",
                "damiao",
                "--interface",
                "virtual",
                "--port",
                channel,
                "--id",
                "2",
                "Timeout",
                "4000",
            ],
        )
        assert result.exit_code == 0 and "reads 4000" in result.output, result.output
        result = runner.invoke(
            cli,
            [
                "motors",
                "read",
                "--bus",
                "damiao",
                "--interface",
                "virtual",
                "--port",
                channel,
                "--id",
                "1-2",
                "Timeout",
            ],
        )
        assert "1:8000  2:4000" in result.output, result.output


def test_calibrate_so101_writes_a_lerobot_file(tmp_path) -> None:
    emulator = FeetechEmulator(range(1, 7), seed=0)
    emulator.start()
    emulator.set_present_positions(dict.fromkeys(range(1, 7), 1900))
    out = tmp_path / "follower.json"

    def sweep() -> None:  # the user moving the joints while ranges are recorded
        time.sleep(0.3)
        for steps in (1300, 2800, 2047):
            emulator.set_present_positions(dict.fromkeys(range(1, 7), steps))
            time.sleep(0.15)

    mover = threading.Thread(target=sweep)
    mover.start()
    try:
        result = CliRunner().invoke(
            cli,
            ["calibrate", "so101", *SLOW, "--port", emulator.port, "--output", str(out), "--duration", "1.2"],
            input="\n",
        )
        mover.join()
        assert result.exit_code == 0, result.output
        assert "calibration saved" in result.output
        cal = load_calibration(out)
        assert cal["shoulder_pan"].homing_offset == 1900 - 2047
        assert (cal["elbow_flex"].range_min, cal["elbow_flex"].range_max) == (1300, 2800)
        assert (cal["wrist_roll"].range_min, cal["wrist_roll"].range_max) == (0, 4095)
        assert emulator.get_register(1, "Homing_Offset") == -147
        # a second run offers to reuse the file
        result = CliRunner().invoke(
            cli, ["calibrate", "so101", *SLOW, "--port", emulator.port, "--output", str(out)], input="\n"
        )
        assert result.exit_code == 0 and "wrote" in result.output, result.output
    finally:
        mover.join()
        emulator.stop()


def test_emulate_so101_prints_a_port_the_driver_can_open() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "molmoact2_edge.cli.main", "emulate", "so101", "--seconds", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("emulated so101 running: --port /dev/"), line
        port = line.split("--port ")[1].strip()
        result = CliRunner().invoke(
            cli, ["motors", "scan", *SLOW, "--bus", "feetech", "--port", port, "--ids", "1-7"]
        )
        assert result.exit_code == 0, result.output
        assert len(result.output.strip().splitlines()) == 6
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_emulate_yam_over_udp_multicast() -> None:
    pytest.importorskip("msgpack")
    group = "239.74.163.9"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "molmoact2_edge.cli.main",
            "emulate",
            "yam",
            "--channel",
            group,
            "--seconds",
            "20",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().endswith(f"--bus damiao --interface udp_multicast --port {group}"), line
        result = CliRunner().invoke(
            cli,
            [
                "motors",
                "scan",
                *SLOW,
                "--bus",
                "damiao",
                "--interface",
                "udp_multicast",
                "--port",
                group,
                "--ids",
                "1-8",
            ],
        )
        assert result.exit_code == 0, result.output
        assert [line.split()[2] for line in result.output.strip().splitlines()] == [
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "7",
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_motors_setup_gives_a_new_servo_its_joint_id() -> None:
    emulator = FeetechEmulator([1], seed=0)  # a servo out of the box answers at id 1
    emulator.start()
    try:
        result = CliRunner().invoke(
            cli,
            [
                "motors",
                "setup",
                "so101",
                *SLOW,
                "--port",
                emulator.port,
                "--motor",
                "gripper",
                "--ids",
                "1-3",
            ],
            input="\n",
        )
        assert result.exit_code == 0, result.output
        assert "'gripper' motor: id 1 @ 1000000 -> id 6 @ 1000000" in result.output
        assert emulator.motor_ids == [6]
        assert emulator.get_register(6, "Lock") == 0  # EEPROM writable while it was renumbered
        result = CliRunner().invoke(
            cli, ["motors", "setup", "so101", "--port", emulator.port, "--motor", "elbow", "--ids", "1-3"]
        )
        assert result.exit_code != 0 and "unknown joint 'elbow'" in result.output
    finally:
        emulator.stop()
