"""LeRobotDataset: our v3.0 writer -> reader round trip, and LeRobot-layout v3.0 / v2.1 fixtures load."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from molmoact2_edge.data.lerobot_format import so101_features
from molmoact2_edge.data.reader import LeRobotDataset
from molmoact2_edge.data.stats import dataset_norm_stats
from molmoact2_edge.data.writer import LeRobotWriter
from molmoact2_edge.errors import DatasetError
from molmoact2_edge.normalization import NormStats
from tests import _lerobot_fixtures as fx

SIZE = 32
LENGTHS = [5, 8, 3]


def _image(ep: int, k: int) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 30 + 20 * ep + 8 * k, np.uint8)
    img[:, :, 2] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    return img


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "demo"
    writer = LeRobotWriter(
        root, fps=10, features=so101_features({"front": (SIZE, SIZE)}, 10, "libx264"), codec="libx264"
    )
    for ep, n in enumerate(LENGTHS):
        for k in range(n):
            state = np.arange(6, dtype=np.float32) + 10 * ep + k
            writer.add_frame(
                {
                    "observation.state": state,
                    "action": state + 0.5,
                    "observation.images.front": _image(ep, k),
                },
                task=["touch the red cube", "lift it"][ep % 2],
            )
        writer.save_episode()
    writer.add_frame(
        {"observation.state": np.zeros(6), "action": np.zeros(6), "observation.images.front": _image(0, 0)},
        "x",
    )
    writer.discard_episode()  # a failed episode leaves no trace
    writer.finalize()
    return root


def test_round_trip_vectors_tasks_and_layout(written):
    ds = LeRobotDataset(written)
    assert ds.version == "v3.0" and len(ds) == sum(LENGTHS) and ds.num_episodes == 3
    assert ds.tasks == {0: "touch the red cube", 1: "lift it"}
    np.testing.assert_array_equal(ds.columns["observation.state"][5], np.arange(6) + 10)
    info = json.loads((written / "meta/info.json").read_text())
    assert info["total_frames"] == 16 and info["features"]["observation.images.front"]["dtype"] == "video"
    episodes = pq.read_table(written / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in episodes] == [0, 5, 13]
    assert episodes[1]["videos/observation.images.front/from_timestamp"] == pytest.approx(0.5)
    stats = json.loads((written / "meta/stats.json").read_text())
    assert {"min", "max", "mean", "std", "count", "q01", "q99"} <= set(stats["action"])
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_sample_pads_action_chunk_at_episode_end(written):
    ds = LeRobotDataset(written)
    s = ds.sample(11, action_horizon=4)  # episode 1 covers rows 5..12, so rows 11, 12 then padding
    assert s.episode_index == 1 and s.frame_index == 6 and s.task == "lift it"
    np.testing.assert_array_equal(s.action_mask, [True, True, False, False])
    np.testing.assert_array_equal(s.actions[2], s.actions[1])  # padded with the last real action
    np.testing.assert_allclose(s.actions[0], np.arange(6) + 10 + 6 + 0.5)
    diff = np.abs(s.images["observation.images.front"].astype(int) - _image(1, 6)).mean()
    assert diff < 6, f"decoded frame differs from the written one by {diff:.1f} on average"


def test_decode_cache_files_are_reused(written, tmp_path):
    ds = LeRobotDataset(written, cache_dir=tmp_path)
    ds.warm_cache()
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 3
    again = LeRobotDataset(written, cache_dir=tmp_path)
    frames = again.episode_frames(again.episodes[2], "observation.images.front")
    assert isinstance(frames, np.memmap) and frames.shape == (3, SIZE, SIZE, 3)


def test_norm_stats_from_dataset_load_back(written, tmp_path):
    stats = dataset_norm_stats(LeRobotDataset(written))
    stats.save(tmp_path / "norm_stats.json")
    meta = NormStats.load(tmp_path / "norm_stats.json").tag("so100_so101_molmoact2")
    assert meta.action_dim == 6 and meta.state_dim == 6 and meta.control_mode == "absolute joint pose"
    assert meta.action_stats.names[0] == "shoulder_pan.pos"


def test_writer_refuses_existing_dataset(written):
    with pytest.raises(DatasetError, match="already holds a dataset"):
        LeRobotWriter(written, fps=10, features=so101_features({}, 10, "libx264"))


@pytest.mark.parametrize("writer_fn", [fx.write_v30, fx.write_v21], ids=["v3.0", "v2.1"])
def test_lerobot_layout_fixture_loads(tmp_path, writer_fn):
    root = tmp_path / "so101_rec"
    root.mkdir()
    writer_fn(root)
    ds = LeRobotDataset(root)
    assert len(ds) == sum(fx.LENGTHS) and ds.camera_keys == ["observation.images.front"]
    assert ds.features["observation.state"]["names"] == fx.JOINTS
    i = fx.LENGTHS[0] + 4  # episode 1, frame 4
    s = ds.sample(i, action_horizon=10)
    assert (s.episode_index, s.frame_index, s.task) == (1, 4, fx.TASKS[1])
    np.testing.assert_allclose(s.state, fx.joint_values(1, fx.LENGTHS[1], 0.0)[4])
    np.testing.assert_allclose(s.actions[:8], fx.joint_values(1, fx.LENGTHS[1], 0.5)[4:12])
    assert s.action_mask.sum() == fx.LENGTHS[1] - 4
    img = s.images["observation.images.front"]
    assert img.shape == (fx.H, fx.W, 3)
    assert abs(float(img[..., 0].mean()) - float(fx.frame_image(1, 4)[..., 0].mean())) < 4


def test_missing_info_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="meta/info.json is missing"):
        LeRobotDataset(tmp_path)
