"""Simulated SO-101: scene renders, units, seeded resets, experts solve every task, record CLI."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.data.reader import LeRobotDataset
from molmoact2_edge.errors import SimulationError
from molmoact2_edge.sim.env import SimEnv
from molmoact2_edge.sim.scene import CAMERA_NAMES, RenderConfig, Scene
from molmoact2_edge.sim.tasks import TASKS


@pytest.fixture(scope="module")
def scene():
    s = Scene(RenderConfig(width=64, height=48))
    s.reset(0)
    yield s
    s.close()


@pytest.mark.parametrize("camera", CAMERA_NAMES)
def test_scene_renders_rgb_and_depth(scene, camera):
    rgb = scene.render(camera)
    depth = scene.render_depth(camera)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 5, "image is flat: the camera sees nothing"
    assert depth.shape == (48, 64) and depth.dtype == np.float32
    assert 0.01 < depth.min() < depth.max() <= 5.0  # metres, inside the znear/zfar of scene.xml


def test_front_camera_sees_the_red_cube(scene):
    rgb = scene.render("front").astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 5


def test_units_round_trip(scene):
    joints = np.array([10.0, -20.0, 30.0, 45.0, -90.0, 37.5])
    np.testing.assert_allclose(scene.to_normalized(scene.to_radians(joints)), joints, atol=1e-9)
    lo, hi = scene.joint_range[5]
    np.testing.assert_allclose(scene.to_radians(np.array([0, 0, 0, 0, 0, 100.0]))[5], hi)
    np.testing.assert_allclose(scene.to_radians(np.array([0, 0, 0, 0, 0, 0.0]))[5], lo)


def test_reset_is_seeded(scene):
    scene.reset(7)
    a = (scene.cube_position(), scene.goal_position(), scene.joint_positions())
    scene.reset(8)
    assert not np.allclose(a[0], scene.cube_position())
    scene.reset(7)
    for x, y in zip(a, (scene.cube_position(), scene.goal_position(), scene.joint_positions()), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_targets_raise(scene):
    with pytest.raises(SimulationError, match="6 finite values"):
        scene.set_targets(np.array([0.0, np.nan, 0, 0, 0, 0]))


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_solves_task(task, seed):
    env = SimEnv(task, cameras=())
    env.reset(seed)
    succeeded = False
    done = False
    while not done:
        _, success, done = env.step(env.expert_action())
        succeeded |= success
    assert succeeded, f"expert failed {task} seed {seed} after {env.steps} steps"
    assert env.steps < env.max_steps


def test_env_observation_matches_contract():
    with SimEnv("touch", render=RenderConfig(width=32, height=32, depth=True)) as env:
        obs = env.reset(3)
        obs.validate(list(CAMERA_NAMES), 6)
        assert obs.task == "touch the red cube" and set(obs.depth) == set(CAMERA_NAMES)
        action = env.expert_action()
        assert action.shape == (6,)
        obs2, _, _ = env.step(action)
        assert not np.allclose(obs.state, obs2.state)


def test_unknown_task_suggests_name():
    with pytest.raises(SimulationError, match="Did you mean 'lift'"):
        SimEnv("lfit")


def test_sim_record_cli_writes_a_loadable_dataset(tmp_path):
    out = tmp_path / "demos"
    result = CliRunner().invoke(
        cli,
        ["sim", "record", "--task", "touch", "--task", "lift", "--episodes", "2", "--size", "32",
         "--noise", "1.0", "--codec", "libx264", "--depth-camera", "front", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 2 episodes" in result.output
    ds = LeRobotDataset(out)
    assert ds.num_episodes == 2 and ds.fps == 10
    assert sorted(ds.tasks.values()) == ["pick up the red cube and lift it", "touch the red cube"]
    sample = ds.sample(0, action_horizon=30)
    assert sample.images["observation.images.wrist"].shape == (32, 32, 3)
    assert sample.actions.shape == (30, 6)
    depth = ds.columns["observation.depth.front"]  # flattened [h, w] maps, metres
    assert ds.features["observation.depth.front"]["shape"] == [32, 32] and depth.shape == (len(ds), 32 * 32)
    assert 0.05 < depth.min() < depth.max() <= 5.0


def test_sim_record_cli_rejects_odd_size(tmp_path):
    result = CliRunner().invoke(cli, ["sim", "record", "--size", "33", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--size must be an even number" in result.output
