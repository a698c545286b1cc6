"""YAM and bimanual YAM over the Damiao driver against emulated drive chains."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from molmoact2_edge.errors import SafetyError
from molmoact2_edge.hardware.buses.damiao import DamiaoBus, MotorState
from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
from molmoact2_edge.hardware.robots.yam import ARM_MODELS, GRIPPER_ID, YAM, BimanualYAM
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer

MOTORS = {i + 1: m for i, m in enumerate(ARM_MODELS)} | {GRIPPER_ID: "dm4310"}
_channels = itertools.count()


def _bus(emulator: DamiaoEmulator) -> DamiaoBus:
    # 200 ms replies: the emulator is a Python thread on a shared CI box, a real drive answers in < 1 ms
    return DamiaoBus(emulator.channel, MOTORS, interface="virtual", reply_timeout_s=0.2)


def _emulated_arm(**kw) -> DamiaoEmulator:
    emulator = DamiaoEmulator(
        MOTORS, channel=f"test-yam-{next(_channels)}", hard_limits={GRIPPER_ID: (-0.2, 1.8)}, **kw
    )
    emulator.start()
    emulator.set_positions({2: 0.5, 3: 0.4})
    return emulator


def test_connect_finds_gripper_stops_and_holds_measured_pose() -> None:
    emu = _emulated_arm()
    try:
        arm = YAM(emu.channel, bus=_bus(emu))
        with arm:
            assert arm.gripper_range == pytest.approx((-0.2, 1.8), abs=0.01)
            state = arm.read_state()
            assert state.shape == (7,) and arm.joint_names[-1] == "gripper"
            np.testing.assert_allclose(state[1:3], [0.5, 0.4], atol=1e-3)
            assert state[6] == pytest.approx(1.0, abs=0.01)  # the probe leaves the gripper open
            assert all(emu.enabled(i) for i in MOTORS)
            assert emu.targets()[2].kp == pytest.approx(80.0, abs=0.2)
        assert not any(emu.enabled(i) for i in MOTORS)  # default: torque off on disconnect
    finally:
        emu.stop()


def test_safety_watchdog_keeps_drives_alive_past_their_timeout() -> None:
    emu = _emulated_arm(command_timeout_s=0.15)
    try:
        arm = YAM(emu.channel, gripper_range=(-0.2, 1.8), bus=_bus(emu))
        arm.connect()
        with SafetyLayer(arm, SafetyConfig(watchdog_s=0.03, handle_signals=False)) as safety:
            target = safety.last_commanded.copy()
            target[0] += 0.2
            for _ in range(20):
                sent = safety.send(target)
            assert sent[0] == pytest.approx(target[0], abs=1e-4)  # reached in 0.03 rad steps
            time.sleep(0.6)  # inference stall, 4x the drives' timeout
            assert all(emu.enabled(i) for i in MOTORS), "the watchdog must refresh the hold"
            assert safety.counts["watchdog_holds"] > 3
        arm.disconnect()
        # on_exit=hold leaves the drives enabled; with nobody commanding, their own timeout drops them to damping
        time.sleep(0.4)
        assert emu.state(1) == MotorState.LOST_COMMUNICATION
    finally:
        emu.stop()


def test_drive_timeout_without_watchdog_is_a_safe_stop() -> None:
    emu = _emulated_arm(command_timeout_s=0.05)
    try:
        arm = YAM(emu.channel, gripper_range=(-0.2, 1.8), bus=_bus(emu))
        arm.connect()
        with SafetyLayer(
            arm, SafetyConfig(watchdog_thread=False, handle_signals=False, on_exit="disable")
        ) as safety:
            time.sleep(0.15)
            with pytest.raises(SafetyError, match="LOST_COMMUNICATION"):
                safety.send(safety.last_commanded)
        arm.disconnect()
    finally:
        emu.stop()


def test_bimanual_state_is_left_then_right() -> None:
    left, right = _emulated_arm(), _emulated_arm()
    right.set_positions({1: -0.7})
    try:
        robot = BimanualYAM(
            YAM(left.channel, gripper_range=(-0.2, 1.8), joint_prefix="left_", bus=_bus(left)),
            YAM(right.channel, gripper_range=(-0.2, 1.8), joint_prefix="right_", bus=_bus(right)),
        )
        with robot:
            state = robot.read_state()
            assert state.shape == (14,)
            assert robot.joint_names[0] == "left_joint_1" and robot.joint_names[7] == "right_joint_1"
            assert state[7] == pytest.approx(-0.7, abs=1e-3) and state[0] == pytest.approx(0.0, abs=1e-3)
            sent = robot.send_action(np.concatenate([state[:7], state[7:] + np.float32(0.01)]))
            assert sent.shape == (14,)
            assert robot.limits().lower.shape == (14,)
    finally:
        left.stop()
        right.stop()
