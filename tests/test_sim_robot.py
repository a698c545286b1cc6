"""SimSO101: the real SO101 robot class drives the MuJoCo arm over the Feetech emulator's pty."""

from __future__ import annotations

import time

import numpy as np
import pytest

from molmoact2_edge.hardware.calibration import NormMode, normalize, unnormalize
from molmoact2_edge.sim.robot import JOINT_NAMES, make_sim_so101, sim_calibration
from molmoact2_edge.sim.scene import Scene


def test_sim_calibration_maps_steps_to_sim_units():
    scene = Scene()
    cal = sim_calibration(scene)
    assert cal["shoulder_pan"].range_min + cal["shoulder_pan"].range_max == 2 * 2048
    for k, name in enumerate(JOINT_NAMES):
        mode = NormMode.RANGE_0_100 if name == "gripper" else NormMode.DEGREES
        lo, hi = np.rad2deg(scene.joint_range[k]) if name != "gripper" else (0.0, 100.0)
        for value in (lo, 0.5 * (lo + hi), hi):
            raw = unnormalize(value, cal[name], mode)
            assert cal[name].range_min <= raw <= cal[name].range_max, name
            # one servo step is 0.088 degrees, or 0.08 gripper units over the jaw's range
            assert normalize(raw, cal[name], mode) == pytest.approx(value, abs=0.1), name


@pytest.fixture(scope="module")
def sim_robot():
    handle = make_sim_so101("touch", seed=1, size=32, cameras=("front",))
    yield handle
    handle.close()


def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_state_read_over_the_bus_matches_the_sim(sim_robot):
    state = sim_robot.robot.read_state()
    np.testing.assert_allclose(state, sim_robot.sim.scene.joint_positions(), atol=0.2)


def test_actions_over_the_pty_move_the_sim_joints(sim_robot):
    robot, sim = sim_robot.robot, sim_robot.sim
    target = robot.read_state().copy()
    target[0] += 8.0  # shoulder_pan, degrees
    target[5] = 30.0  # gripper
    sent = robot.send_action(target)
    np.testing.assert_allclose(sent, target, atol=0.1)
    # The physics loop runs in real time (slower under CPU load): wait for the joints to arrive.
    arrived = _wait_until(lambda: abs(sim.scene.joint_positions()[0] - target[0]) < 1.0, timeout_s=20.0)
    assert arrived, f"sim shoulder_pan {sim.scene.joint_positions()[0]:.1f}, wanted {target[0]:.1f}"
    assert _wait_until(lambda: abs(robot.read_state()[0] - target[0]) < 1.0, timeout_s=5.0)


def test_sim_camera_delivers_frames(sim_robot):
    obs = sim_robot.robot.get_observation(sim_robot.instruction)
    assert obs.images["front"].shape == (32, 32, 3) and obs.images["front"].dtype == np.uint8
    assert obs.task == "touch the red cube"


def test_torque_off_makes_the_arm_limp(sim_robot):
    robot, sim = sim_robot.robot, sim_robot.sim
    robot.set_torque(False)
    try:
        assert _wait_until(lambda: sim.scene.model.actuator_gainprm[sim.scene.ctrl_ids[0], 0] == 0.0, 10.0)
    finally:
        robot.set_torque(True)
    assert _wait_until(lambda: sim.scene.model.actuator_gainprm[sim.scene.ctrl_ids[0], 0] > 0.0, 10.0)


def test_make_robot_builds_the_sim_kind():
    import molmoact2_edge.sim  # noqa: F401  (registers sim-so101)
    from molmoact2_edge.hardware.robots import make_robot
    from molmoact2_edge.sim.robot import SimSO101Robot

    robot = make_robot("sim-so101", task="lift", seed=0, size=32, cameras=("wrist",))
    try:
        assert isinstance(robot, SimSO101Robot) and robot.instruction == "pick up the red cube and lift it"
        assert not robot.success()
    finally:
        robot.disconnect()  # never connected: still stops the simulation thread and the pty
    assert not robot.sim.running
