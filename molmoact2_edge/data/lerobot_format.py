"""The LeRobotDataset on-disk layouts (v3.0 written and read, v2.1 read), as data.

v3.0 (current)::

    meta/info.json  meta/stats.json  meta/tasks.parquet
    meta/episodes/chunk-000/file-000.parquet                 one row per episode
    data/chunk-000/file-000.parquet                          many episodes per file
    videos/<video_key>/chunk-000/file-000.mp4                many episodes per file

v2.1::

    meta/info.json  meta/episodes.jsonl  meta/tasks.jsonl  meta/episodes_stats.jsonl
    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4

Reference: ``/work/shared/reference/sim-data.md`` §3 (taken from lerobot 0.4.4).
"""

from __future__ import annotations

V30 = "v3.0"
V21 = "v2.1"
READABLE_VERSIONS = (V30, V21, "v2.0")

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CHUNKS_SIZE = 1000  # files per chunk directory
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200

# v2.1 metadata files
EPISODES_JSONL = "meta/episodes.jsonl"
TASKS_JSONL = "meta/tasks.jsonl"

# Per-frame bookkeeping columns every LeRobot dataset has.
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
SO101_ROBOT_TYPE = "so101_follower"


def video_feature(height: int, width: int, fps: int, codec: str) -> dict:
    return {
        "dtype": "video",
        "shape": [height, width, 3],
        "names": ["height", "width", "channels"],
        "info": {
            "video.height": height,
            "video.width": width,
            "video.codec": {"libsvtav1": "av1", "libx264": "h264"}.get(codec, codec),
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": fps,
            "video.channels": 3,
            "has_audio": False,
        },
    }


DEPTH_PREFIX = "observation.depth."  # + camera name: per-frame depth map (metres), a float column


def so101_features(
    cameras: dict[str, tuple[int, int]], fps: int, codec: str, depth_cameras: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Features of a LeRobot SO-101 recording: 6-joint state and action (``<joint>.pos`` names), cameras as video.

    ``depth_cameras`` add ``observation.depth.<camera>`` float32 [h, w] features (metres, stored
    flattened in the data parquet; not a LeRobot convention, used for MolmoAct2-Think depth codes).
    """
    names = [f"{j}.pos" for j in SO101_JOINTS]
    features = {
        "action": {"dtype": "float32", "shape": [len(names)], "names": names},
        "observation.state": {"dtype": "float32", "shape": [len(names)], "names": names},
    }
    for cam, (h, w) in cameras.items():
        features[f"observation.images.{cam}"] = video_feature(h, w, fps, codec)
    for cam in depth_cameras:
        h, w = cameras[cam]
        features[DEPTH_PREFIX + cam] = {"dtype": "float32", "shape": [h, w], "names": ["height", "width"]}
    return features


def is_visual(feature: dict) -> bool:
    return feature["dtype"] in ("video", "image")
