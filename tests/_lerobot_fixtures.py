"""LeRobot-layout SO-101 datasets written with pyarrow and PyAV directly (not with our writer).

They mirror what ``lerobot-record`` produces for an SO-101 follower (lerobot 0.4.x): feature
names ``observation.state``, ``action``, ``observation.images.<cam>``, joint names
``<joint>.pos``, vectors as list columns, AV1 (v3.0) or H.264 (v2.1) mp4s, v3.0 tasks stored
the way pandas writes ``DataFrame({"task_index": ...}, index=tasks)``.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

JOINTS = [
    f"{j}.pos" for j in ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
]
FPS = 30
H, W = 48, 64
TASKS = ["Grab the cube", "Put the cube in the box"]
LENGTHS = [7, 12, 9]


def frame_image(episode: int, frame: int) -> np.ndarray:
    """A smooth, codec-friendly test image whose mean brightness encodes (episode, frame)."""
    level = 40 + 10 * episode + 5 * frame
    img = np.full((H, W, 3), level, np.uint8)
    img[:, :, 1] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    return img


def joint_values(episode: int, n: int, offset: float) -> np.ndarray:
    t = np.arange(n, dtype=np.float32)[:, None]
    return (offset + 100 * episode + t + np.arange(6, dtype=np.float32)[None, :] / 10).astype(np.float32)


def _encode(path: Path, frames: list[np.ndarray], codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=FPS, options={"crf": "20", "g": "2"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = Fraction(1, FPS)
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _video_info(codec: str) -> dict:
    return {
        "dtype": "video",
        "shape": [H, W, 3],
        "names": ["height", "width", "channels"],
        "info": {
            "video.height": H,
            "video.width": W,
            "video.codec": codec,
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": FPS,
            "video.channels": 3,
            "has_audio": False,
        },
    }


def _features(codec: str) -> dict:
    return {
        "action": {"dtype": "float32", "shape": [6], "names": JOINTS},
        "observation.state": {"dtype": "float32", "shape": [6], "names": JOINTS},
        "observation.images.front": _video_info(codec),
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def _episode_table(ep: int, start: int, pose: np.ndarray | None = None) -> pa.Table:
    """pose: (6,) joint values every frame sits near (a fraction of a degree apart) instead of joint_values."""
    n = LENGTHS[ep]
    list_type = pa.list_(pa.float32())  # variable-length lists, as some HF datasets versions write them
    action, state = joint_values(ep, n, 0.5), joint_values(ep, n, 0.0)
    if pose is not None:
        action = state = (pose[None, :] + (action - action.mean(0)) / 100).astype(np.float32)
    return pa.table(
        {
            "action": pa.array(action.tolist(), list_type),
            "observation.state": pa.array(state.tolist(), list_type),
            "timestamp": pa.array(np.arange(n, dtype=np.float32) / FPS),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, ep, np.int64)),
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, ep % 2, np.int64)),
        }
    )


def write_v30(root: Path, *, large_strings: bool = False, pose: np.ndarray | None = None) -> None:
    """v3.0: one data file, one concatenated AV1 mp4, episodes + tasks parquet, stats.json.

    large_strings: text columns as pyarrow ``large_string`` (``tasks`` as ``list<large_string>``),
    the way LeRobot 0.4+ writes them under pandas 3 (../shared/reference/deployment-2026-12.md §5).
    pose: the joints of every frame sit near this pose (see ``_episode_table``).
    """
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    tables, frames, rows, start = [], [], [], 0
    for ep, n in enumerate(LENGTHS):
        tables.append(_episode_table(ep, start, pose))
        rows.append(
            {
                "episode_index": ep,
                "tasks": [TASKS[ep % 2]],
                "length": n,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": start,
                "dataset_to_index": start + n,
                "videos/observation.images.front/chunk_index": 0,
                "videos/observation.images.front/file_index": 0,
                "videos/observation.images.front/from_timestamp": start / FPS,
                "videos/observation.images.front/to_timestamp": (start + n) / FPS,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
            }
        )
        frames += [frame_image(ep, k) for k in range(n)]
        start += n
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.concat_tables(tables), root / "data/chunk-000/file-000.parquet")
    _encode(root / "videos/observation.images.front/chunk-000/file-000.mp4", frames, "libsvtav1")
    text = pa.large_string() if large_strings else pa.string()
    episodes = pa.Table.from_pylist(rows)
    if large_strings:
        episodes = episodes.set_column(
            episodes.column_names.index("tasks"), "tasks", episodes["tasks"].cast(pa.list_(text))
        )
    pq.write_table(episodes, root / "meta/episodes/chunk-000/file-000.parquet")
    tasks = pa.table({"task_index": pa.array([0, 1], pa.int64()), "__index_level_0__": pa.array(TASKS, text)})
    pq.write_table(tasks, root / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": "so101_follower",
        "total_episodes": len(LENGTHS),
        "total_frames": start,
        "total_tasks": 2,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": FPS,
        "splits": {"train": f"0:{len(LENGTHS)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": _features("av1"),
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))


def write_v21(root: Path) -> None:
    """v2.1: one parquet and one H.264 mp4 per episode, jsonl metadata."""
    (root / "meta").mkdir(parents=True)
    start = 0
    episodes, stats = [], []
    for ep, n in enumerate(LENGTHS):
        path = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_episode_table(ep, start), path)
        _encode(
            root / f"videos/chunk-000/observation.images.front/episode_{ep:06d}.mp4",
            [frame_image(ep, k) for k in range(n)],
            "libx264",
        )
        episodes.append({"episode_index": ep, "tasks": [TASKS[ep % 2]], "length": n})
        stats.append({"episode_index": ep, "stats": {}})
        start += n
    (root / "meta/episodes.jsonl").write_text("\n".join(json.dumps(e) for e in episodes) + "\n")
    (root / "meta/episodes_stats.jsonl").write_text("\n".join(json.dumps(s) for s in stats) + "\n")
    (root / "meta/tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(TASKS)) + "\n"
    )
    info = {
        "codebase_version": "v2.1",
        "robot_type": "so101_follower",
        "total_episodes": len(LENGTHS),
        "total_frames": start,
        "total_tasks": 2,
        "total_videos": len(LENGTHS),
        "total_chunks": 1,
        "chunks_size": 1000,
        "fps": FPS,
        "splits": {"train": f"0:{len(LENGTHS)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": _features("h264"),
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
