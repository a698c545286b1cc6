"""Write a LeRobotDataset v3.0 without depending on ``lerobot``.

    writer = LeRobotWriter(out_dir, fps=10, features=so101_features({"front": (128, 128)}, 10, codec))
    for each frame: writer.add_frame({"observation.state": s, "action": a, "observation.images.front": rgb}, task)
    writer.save_episode()          # or writer.discard_episode()
    writer.finalize()              # stats.json, episodes and tasks parquet, info.json

Data parquet files and mp4 files roll over at ``data_file_mb`` / ``video_file_mb`` like
LeRobot's; each episode is one parquet row group and one contiguous span of every mp4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from molmoact2_edge.data import lerobot_format as fmt
from molmoact2_edge.data.stats import image_stats, merge_stats, to_json, vector_stats
from molmoact2_edge.data.video import VideoEncoder, pick_codec
from molmoact2_edge.errors import DatasetError


class LeRobotWriter:
    def __init__(
        self,
        root: Path,
        *,
        fps: int,
        features: dict[str, dict],
        robot_type: str = fmt.SO101_ROBOT_TYPE,
        joint_frame: str | None = None,
        codec: str | None = None,
        crf: int = 30,
        data_file_mb: float = fmt.DATA_FILE_MB,
        video_file_mb: float = fmt.VIDEO_FILE_MB,
    ):
        self.root = Path(root)
        if (self.root / fmt.INFO_PATH).exists():
            raise DatasetError(
                f"{self.root} already holds a dataset (meta/info.json); choose a new --out directory"
            )
        for name in features:
            if "/" in name:
                raise DatasetError(f"feature name '{name}' contains '/', which LeRobot does not allow")
        self.fps = int(fps)
        self.features = features
        self.robot_type = robot_type
        # not a LeRobot key: the joint frame of state/action, which training writes into the robot contract
        self.joint_frame = joint_frame
        self.codec = pick_codec(codec)
        self.crf = crf
        self.data_file_mb = data_file_mb
        self.video_file_mb = video_file_mb
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.vector_keys = [k for k, f in features.items() if not fmt.is_visual(f)]
        if any(f["dtype"] == "image" for f in features.values()):
            raise DatasetError("image-dtype features are read but not written; store cameras as video")
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.total_frames = 0
        self._frames: list[dict[str, np.ndarray]] = []
        self._frame_tasks: list[str] = []
        self._data_file = (0, 0)  # (chunk, file)
        self._data_writer: pq.ParquetWriter | None = None
        self._video_file: dict[str, tuple[int, int]] = {k: (0, 0) for k in self.video_keys}
        self._encoders: dict[str, VideoEncoder] = {}
        self._episode_stats: list[dict[str, dict[str, np.ndarray]]] = []

    # --- frames and episodes --------------------------------------------------------------

    def add_frame(self, frame: dict[str, np.ndarray], task: str) -> None:
        """Buffer one frame; every feature except the default columns must be present."""
        missing = [k for k in self.features if k not in frame]
        if missing:
            raise DatasetError(f"frame lacks feature(s) {missing}")
        for key in self.video_keys:
            want = tuple(self.features[key]["shape"])
            img = frame[key]
            if img.shape != want or img.dtype != np.uint8:
                raise DatasetError(f"frame '{key}': expected {want} uint8, got {img.shape} {img.dtype}")
        self._frames.append(frame)
        self._frame_tasks.append(task)

    def discard_episode(self) -> None:
        self._frames.clear()
        self._frame_tasks.clear()

    def save_episode(self) -> int:
        """Write the buffered frames as the next episode; returns its episode_index."""
        if not self._frames:
            raise DatasetError("save_episode() with no frames added")
        ep = len(self.episodes)
        n = len(self._frames)
        for task in self._frame_tasks:
            self.tasks.setdefault(task, len(self.tasks))
        columns: dict[str, np.ndarray] = {
            k: np.stack([np.asarray(f[k], dtype=np.float32).reshape(-1) for f in self._frames])
            for k in self.vector_keys
        }
        # Maps ([h, w] features such as depth) get stats over all their values, not per pixel.
        stats = {}
        for k, v in columns.items():
            is_map = len(self.features[k]["shape"]) > 1
            stats[k] = vector_stats(v.reshape(-1, 1)) if is_map else vector_stats(v)
            stats[k]["count"] = np.array([n])  # frames, as LeRobot counts
        row = {
            "episode_index": ep,
            "tasks": sorted(set(self._frame_tasks), key=self._frame_tasks.index),
            "length": n,
            "dataset_from_index": self.total_frames,
            "dataset_to_index": self.total_frames + n,
        }
        row.update(self._write_data(ep, n, columns))
        for key in self.video_keys:
            frames = np.stack([f[key] for f in self._frames])
            row.update(self._write_video(key, frames))
            stats[key] = image_stats(frames)
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        self._episode_stats.append(stats)
        self.episodes.append(row)
        self.total_frames += n
        self.discard_episode()
        return ep

    def _write_data(self, ep: int, n: int, columns: dict[str, np.ndarray]) -> dict:
        arrays = {}
        for key, values in columns.items():
            dim = values.shape[1]
            arrays[key] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
        arrays["timestamp"] = pa.array(np.arange(n, dtype=np.float32) / self.fps)
        arrays["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        arrays["episode_index"] = pa.array(np.full(n, ep, dtype=np.int64))
        arrays["index"] = pa.array(np.arange(self.total_frames, self.total_frames + n, dtype=np.int64))
        arrays["task_index"] = pa.array(np.array([self.tasks[t] for t in self._frame_tasks], dtype=np.int64))
        table = pa.table(arrays)
        path = self._data_path()
        if self._data_writer is not None and path.stat().st_size / 2**20 > self.data_file_mb:
            self._data_writer.close()
            self._data_writer = None
            self._data_file = _next_file(*self._data_file)
            path = self._data_path()
        if self._data_writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(path, table.schema)
        self._data_writer.write_table(table)
        chunk, file = self._data_file
        return {"data/chunk_index": chunk, "data/file_index": file}

    def _data_path(self) -> Path:
        chunk, file = self._data_file
        return self.root / fmt.DATA_PATH.format(chunk_index=chunk, file_index=file)

    def _write_video(self, key: str, frames: np.ndarray) -> dict:
        enc = self._encoders.get(key)
        if enc is not None and enc.path.exists() and enc.path.stat().st_size / 2**20 > self.video_file_mb:
            enc.close()
            del self._encoders[key]
            self._video_file[key] = _next_file(*self._video_file[key])
            enc = None
        if enc is None:
            chunk, file = self._video_file[key]
            path = self.root / fmt.VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            h, w = frames.shape[1:3]
            enc = self._encoders[key] = VideoEncoder(path, self.fps, w, h, self.codec, self.crf)
        start = enc.frames / self.fps
        for rgb in frames:
            enc.add(rgb)
        chunk, file = self._video_file[key]
        return {
            f"videos/{key}/chunk_index": chunk,
            f"videos/{key}/file_index": file,
            f"videos/{key}/from_timestamp": start,
            f"videos/{key}/to_timestamp": start + len(frames) / self.fps,
        }

    # --- metadata -------------------------------------------------------------------------

    def finalize(self) -> None:
        """Close the data and video files and write meta/ (info, stats, tasks, episodes)."""
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        for enc in self._encoders.values():
            enc.close()
        self._encoders.clear()
        if not self.episodes:
            raise DatasetError(f"no episodes were saved to {self.root}")
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        self._write_tasks()
        self._write_episodes()
        stats = {k: merge_stats([s[k] for s in self._episode_stats]) for k in self._episode_stats[0]}
        (self.root / fmt.STATS_PATH).write_text(json.dumps(to_json(stats), indent=2) + "\n")
        self._write_info()

    def _write_tasks(self) -> None:
        # pandas' to_parquet of DataFrame({"task_index": ...}, index=tasks), as LeRobot writes it.
        names = list(self.tasks)
        table = pa.table(
            {"task_index": pa.array([self.tasks[t] for t in names], pa.int64()), "__index_level_0__": names}
        )
        pandas_meta = {
            "index_columns": ["__index_level_0__"],
            "column_indexes": [],
            "columns": [
                {
                    "name": "task_index",
                    "field_name": "task_index",
                    "pandas_type": "int64",
                    "numpy_type": "int64",
                    "metadata": None,
                },
                {
                    "name": None,
                    "field_name": "__index_level_0__",
                    "pandas_type": "unicode",
                    "numpy_type": "object",
                    "metadata": None,
                },
            ],
            "pandas_version": "2.2.3",
        }
        table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
        pq.write_table(table, self.root / fmt.TASKS_PATH)

    def _write_episodes(self) -> None:
        rows = [dict(r) for r in self.episodes]
        for row, stats in zip(rows, self._episode_stats, strict=True):
            for feat, s in stats.items():
                for name, value in s.items():
                    row[f"stats/{feat}/{name}"] = np.asarray(value).reshape(-1).tolist()
        table = pa.Table.from_pylist(rows)
        path = self.root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)

    def _write_info(self) -> None:
        features = {}
        for key, feat in self.features.items():
            feat = dict(feat)
            if feat["dtype"] != "video":
                feat["fps"] = float(self.fps)
            features[key] = feat
        for key, feat in fmt.DEFAULT_FEATURES.items():
            features[key] = {**feat, "fps": float(self.fps)}
        info = {
            "codebase_version": fmt.V30,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": fmt.CHUNKS_SIZE,
            "data_files_size_in_mb": self.data_file_mb,
            "video_files_size_in_mb": self.video_file_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": fmt.DATA_PATH,
            "video_path": fmt.VIDEO_PATH if self.video_keys else None,
            "features": features,
        }
        if self.joint_frame is not None:
            info["joint_frame"] = self.joint_frame
        (self.root / fmt.INFO_PATH).write_text(json.dumps(info, indent=4) + "\n")


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    file += 1
    if file >= fmt.CHUNKS_SIZE:
        return chunk + 1, 0
    return chunk, file
