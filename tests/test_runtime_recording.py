"""Recording the control loop: LeRobot dataset at episode end, a spool that survives a crash, recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molmoact2_edge.runtimes.recording import SPOOL, DatasetRecorder, recover_spool
from molmoact2_edge.types import Observation

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


def _obs(i: int) -> Observation:
    rng = np.random.default_rng(i)
    return Observation(
        images={"front": rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)},
        state=np.full(6, i, np.float32),
        task="pick up the cube",
    )


def test_episode_is_saved_and_spool_removed(tmp_path: Path) -> None:
    recorder = DatasetRecorder(tmp_path / "ds", fps=30, joint_names=JOINTS, robot_type="so101_follower")
    for i in range(10):
        recorder.add(_obs(i), np.full(6, i + 0.5, np.float32))
        if i == 4:
            recorder.flush()
            assert len(list(recorder.spool_dir.glob("part_*.npz"))) == 1
    assert recorder.end_episode() == 0
    recorder.finalize()
    assert (tmp_path / "ds/meta/info.json").is_file()
    assert not (tmp_path / "ds" / SPOOL).exists()


def test_crash_loses_at_most_the_unflushed_frames(tmp_path: Path) -> None:
    recorder = DatasetRecorder(tmp_path / "crashed", fps=30, joint_names=JOINTS, robot_type="so101_follower")
    for i in range(7):
        recorder.add(_obs(i), np.full(6, i, np.float32))
        if i in (2, 5):
            recorder.flush()
    # "crash": the process dies here; frame 6 was never flushed
    assert recover_spool(tmp_path / "crashed", tmp_path / "recovered", 30, JOINTS, "so101_follower") == 1
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "recovered/data").rglob("*.parquet")))
    states = np.stack(table.column("observation.state").to_numpy(zero_copy_only=False))
    assert states[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
