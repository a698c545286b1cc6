"""SO-101 and Koch against emulated servo chains: servo setup, calibration, joint frame, factory."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from molmoact2_edge.errors import CalibrationError, HardwareError
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.calibration import MotorCalibration, load_calibration
from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
from molmoact2_edge.hardware.robots import make_robot, register_robot
from molmoact2_edge.hardware.robots.koch import KOCH_MOTORS, Koch
from molmoact2_edge.hardware.robots.so101 import SO101
from tests._hardware_helpers import CALIBRATION, emulated_so101


def test_so101_connect_applies_lerobot_servo_setup_and_calibration() -> None:
    cal = {n: MotorCalibration(c.id, 0, 100 + c.id, 900 + c.id, 3100) for n, c in CALIBRATION.items()}
    with emulated_so101() as (robot, emu):
        robot.calibration = cal
        with robot:
            for i in range(1, 7):
                assert emu.get_register(i, "Return_Delay_Time") == 0
                assert emu.get_register(i, "Acceleration") == 254
                assert (
                    emu.get_register(i, "P_Coefficient"),
                    emu.get_register(i, "I_Coefficient"),
                    emu.get_register(i, "D_Coefficient"),
                ) == (16, 0, 32)
                assert emu.get_register(i, "Homing_Offset") == 100 + i
                assert emu.get_register(i, "Min_Position_Limit") == 900 + i
                assert emu.torque_enabled(i) and emu.get_register(i, "Lock") == 1
            assert emu.get_register(6, "Max_Torque_Limit") == 500  # gripper protection
            assert emu.get_register(6, "Overload_Torque") == 25
            assert emu.get_register(1, "Max_Torque_Limit") == 1000
        assert not any(emu.torque_enabled(i) for i in range(1, 7))  # LeRobot default on disconnect


def test_so101_legacy_joint_frame_for_released_norm_stats() -> None:
    with emulated_so101(start_steps=2000) as (robot, _):  # the calibrated middle: 0 degrees everywhere
        legacy = SO101(robot.bus.port, CALIBRATION, joint_frame="so100_101_legacy", bus=robot.bus)
        with legacy:
            state = legacy.read_state()
            np.testing.assert_allclose(state, [0, 90, 90, 0, 0, 50], atol=0.1)
            sent = legacy.send_action(state + np.float32(1.0))
            np.testing.assert_allclose(sent, state + 1.0, atol=0.1)
            limits = legacy.limits()
            assert limits.lower[1] == pytest.approx(90 - 87.9, abs=0.1)  # sign flip swaps the ends
            assert limits.upper[1] == pytest.approx(90 + 87.9, abs=0.1)
    with pytest.raises(CalibrationError, match="unknown joint frame"):
        SO101("/dev/null", CALIBRATION, joint_frame="so100")


def test_so101_without_calibration_says_how_to_calibrate(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path))
    robot = SO101("/dev/ttyACM9")
    assert robot.calibration is None
    with pytest.raises(CalibrationError, match="molmo-edge calibrate so101 --port /dev/ttyACM9"):
        robot.connect()


def test_so101_calibration_procedure_on_the_emulator(tmp_path) -> None:
    with emulated_so101(start_steps=1500) as (robot, emu):
        robot.calibration = None
        robot.connect_for_calibration()
        offsets = robot.set_half_turn_homings()
        assert offsets == dict.fromkeys(robot.joint_names, 1500 - 2047)
        assert robot.read_raw()["elbow_flex"] == 2047  # the middle pose now reads half a turn
        # the "user" sweeps every joint while ranges stream
        done = threading.Event()
        sweep = iter([{i: 2047 - 800 for i in range(1, 7)}, {i: 2047 + 700 for i in range(1, 7)}])

        def move(*_: object) -> None:
            step = next(sweep, None)
            if step is None:
                done.set()
            else:
                emu.set_present_positions(step)

        mins, maxes = robot.record_ranges(done.is_set, on_update=move, period_s=0.001)
        assert mins["elbow_flex"] == 1247 and maxes["elbow_flex"] == 2747
        assert (mins["wrist_roll"], maxes["wrist_roll"]) == (0, 4095)  # full-turn joint
        path = tmp_path / "follower.json"
        robot.finish_calibration(offsets, mins, maxes, path)
        saved = load_calibration(path, robot.joint_names)
        assert saved["gripper"] == MotorCalibration(6, 0, -547, 1247, 2747)
        assert emu.get_register(3, "Max_Position_Limit") == 2747
        robot.bus.disconnect()


def test_koch_on_the_dynamixel_emulator() -> None:
    cal = {n: MotorCalibration(i + 1, 0, 0, 1000, 3000) for i, (n, _) in enumerate(KOCH_MOTORS)}
    emu = DynamixelEmulator(range(1, 7))
    port = emu.start()
    try:
        for i, (_, model) in enumerate(KOCH_MOTORS):
            emu.set_register(i + 1, "Model_Number", model)
        emu.set_present_positions(dict.fromkeys(range(1, 7), 2100))
        with Koch(port, cal, bus=DynamixelBus(port, timeout_margin_s=0.05)) as koch:
            state = koch.read_state()
            np.testing.assert_allclose(state[:5], 100 * 360 / 4095, atol=1e-3)
            assert state[5] == pytest.approx(55.0)
            koch.send_action(state + np.float32(1.0))
            koch.check_faults()
            assert [emu.get_register(i, "Operating_Mode") for i in range(1, 7)] == [4, 4, 4, 4, 4, 5]
            assert emu.get_register(3, "Position_P_Gain") == 1500
    finally:
        emu.stop()


def test_make_robot_by_name() -> None:
    robot = make_robot("so101", port="/dev/ttyACM0", calibration=CALIBRATION)
    assert isinstance(robot, SO101) and robot.joint_names[0] == "shoulder_pan"
    yam = make_robot("bimanual-yam", left_channel="a", right_channel="b", interface="virtual")
    assert yam.state_dim == 14
    with pytest.raises(HardwareError, match="Did you mean 'so101'"):
        make_robot("so-101")
    register_robot("so101", "molmoact2_edge.hardware.robots.so101:SO101")  # same target: fine
    with pytest.raises(HardwareError, match="already registered"):
        register_robot("so101", "elsewhere:Robot")


def test_get_observation_has_state_and_latest_camera_frames() -> None:
    from molmoact2_edge.hardware.cameras import ReplayCamera

    frames = np.zeros((3, 8, 12, 3), np.uint8)
    cams = {
        "front": ReplayCamera("front", frames, realtime=False),
        "wrist": ReplayCamera("wrist", frames + 1, realtime=False),
    }
    with emulated_so101(start_steps=2000, cameras=cams) as (robot, _), robot:
        obs = robot.get_observation("pick up the cube", max_camera_age_ms=1000)
        obs.validate(["front", "wrist"], 6)
        assert obs.task == "pick up the cube"
        np.testing.assert_allclose(obs.state, [0, 0, 0, 0, 0, 50], atol=1e-3)
        assert int(obs.images["wrist"][0, 0, 0]) == 1
    assert not cams["front"].is_connected  # cameras disconnect with the robot
