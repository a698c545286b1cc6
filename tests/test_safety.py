"""SafetyLayer unit behaviour on an emulated SO-101: first command, envelope, step clamp, watchdog, exit policy."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact2_edge.errors import SafetyError
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
from tests._hardware_helpers import FakeClock, emulated_so101, goal_writes


def _config(**kw) -> SafetyConfig:
    return SafetyConfig(**{"watchdog_thread": False, "handle_signals": False, "fault_check_every": 0, **kw})


def test_first_command_is_the_measured_pose() -> None:
    with emulated_so101(start_steps=2300) as (robot, emu):
        robot.connect()
        measured = robot.read_state()
        emu.write_log.clear()
        with SafetyLayer(robot, _config()) as safety:
            np.testing.assert_allclose(safety.last_commanded, measured, atol=1e-4)
            assert goal_writes(emu, 6) == [2300] * 6  # the pose it already holds, nothing else
        robot.disconnect()


def test_step_is_clamped_against_last_commanded_not_measured() -> None:
    with emulated_so101() as (robot, emu):
        robot.connect()
        with SafetyLayer(robot, _config(max_step=2.0)) as safety:
            start = safety.last_commanded.copy()
            target = start + np.array([10, 0, 0, 0, 0, 0], np.float32)
            sent = [safety.send(target) for _ in range(3)]
            # 2 degrees per tick from the previous command (to one servo step), whatever the arm measured
            steps = np.diff([start[0]] + [s[0] for s in sent])
            np.testing.assert_allclose(steps, 2.0, atol=360 / 4095)
            assert safety.counts["clipped_step"] == 3
        robot.disconnect()


def test_step_scaling_preserves_direction() -> None:
    with emulated_so101() as (robot, _):
        robot.connect()
        with SafetyLayer(robot, _config(max_step=1.0)) as safety:
            start = safety.last_commanded.copy()
            sent = safety.send(start + np.array([4, 2, 0, 0, 0, 0], np.float32))
            delta = sent - start
            assert delta[0] == pytest.approx(1.0, abs=0.1)
            assert delta[1] == pytest.approx(0.5, abs=0.1)  # same direction: scaled by 1/4 too
        robot.disconnect()


def test_default_step_is_a_joint_speed_at_any_loop_rate() -> None:
    """The robot's per-tick default is defined at its control_hz: a 10 Hz loop may step 3x further per tick."""
    with emulated_so101() as (robot, _):
        robot.connect()
        limits = robot.limits()
        with SafetyLayer(robot, _config(control_hz=limits.control_hz / 3)) as safety:
            np.testing.assert_allclose(safety.max_step, limits.max_step * 3, rtol=1e-6)
        with SafetyLayer(robot, _config()) as safety:
            np.testing.assert_allclose(safety.max_step, limits.max_step, rtol=1e-6)
        robot.disconnect()
    with pytest.raises(SafetyError, match="control_hz"):
        SafetyConfig(control_hz=0.0)


def test_envelope_with_margin() -> None:
    with emulated_so101() as (robot, _):
        robot.connect()
        limits = robot.limits()
        with SafetyLayer(robot, _config(margin=5.0, max_step=1000.0)) as safety:
            sent = safety.send(np.full(6, 1e4, np.float32))
            np.testing.assert_allclose(sent, limits.upper - 5.0, atol=0.1)
            assert safety.counts["clipped_limits"] == 1
        robot.disconnect()
    with pytest.raises(SafetyError, match="leaves no room"), emulated_so101() as (robot, _):
        robot.connect()
        try:
            SafetyLayer(robot, _config(margin=500.0))
        finally:
            robot.disconnect()


def test_non_finite_action_holds() -> None:
    with emulated_so101() as (robot, _):
        robot.connect()
        with SafetyLayer(robot, _config()) as safety:
            before = safety.last_commanded.copy()
            sent = safety.send(np.array([np.nan, 0, 0, 0, 0, 0], np.float32))
            np.testing.assert_array_equal(sent, before)
            assert safety.counts["refused_nonfinite"] == 1
        robot.disconnect()


def test_watchdog_holds_when_no_action_arrives() -> None:
    clock = FakeClock()
    with emulated_so101() as (robot, emu):
        robot.connect()
        emu.write_log.clear()
        with SafetyLayer(robot, _config(watchdog_s=0.2), clock=clock) as safety:
            safety.send(safety.last_commanded + 1.0)
            commanded = safety.last_commanded.copy()
            clock.now += 0.1
            assert not safety.poll_watchdog()
            before = goal_writes(emu, 12)  # start pose + one send, applied by the emulator thread
            clock.now += 0.15
            assert safety.poll_watchdog()
            after = goal_writes(emu, 18)
            assert len(before) == 12 and after[12:] == before[6:]  # the hold re-sent the last command
            np.testing.assert_allclose(safety.last_commanded, commanded)
            assert safety.counts["watchdog_holds"] == 1
        robot.disconnect()


def test_watchdog_thread_keeps_holding() -> None:
    with emulated_so101() as (robot, _):
        robot.connect()
        with SafetyLayer(robot, SafetyConfig(watchdog_s=0.02, handle_signals=False)) as safety:
            import time

            time.sleep(0.2)
            assert safety.counts["watchdog_holds"] >= 2
        robot.disconnect()


@pytest.mark.parametrize("policy", ["hold", "disable"])
def test_exit_policy_on_exception(policy: str) -> None:
    with emulated_so101() as (robot, emu):
        robot.connect()
        emu.write_log.clear()
        with (
            pytest.raises(RuntimeError, match="policy crashed"),
            SafetyLayer(robot, _config(on_exit=policy)) as safety,
        ):
            safety.send(safety.last_commanded + 2.0)
            sent_goals = goal_writes(emu, 12)[6:]
            raise RuntimeError("policy crashed")
        if policy == "hold":
            assert goal_writes(emu, 18)[12:] == sent_goals  # the last command again: never a jump
            assert all(emu.torque_enabled(i) for i in range(1, 7))
            assert robot.disable_torque_on_disconnect is False
        else:
            assert len(goal_writes(emu, 13, timeout_s=0.05)) == 12  # no new position
            assert not any(emu.torque_enabled(i) for i in range(1, 7))
        robot.disconnect()
        assert any(emu.torque_enabled(i) for i in range(1, 7)) == (policy == "hold")


def test_telemetry_and_stopped_layer_refuses() -> None:
    with emulated_so101() as (robot, _):
        robot.connect()
        safety = SafetyLayer(robot, _config())
        with pytest.raises(SafetyError, match="not started"):
            safety.send(np.zeros(6, np.float32))
        with safety:
            safety.send(safety.last_commanded)
        info = safety.telemetry()
        assert info["ticks"] == 1 and info["stopped"] == "closed (on_exit=hold)"
        with pytest.raises(SafetyError, match="stopped"):
            safety.send(np.zeros(6, np.float32))
        robot.disconnect()
