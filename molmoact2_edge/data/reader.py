"""Read a LeRobotDataset (v3.0 or v2.1) without ``lerobot``, with a training sample API.

    ds = LeRobotDataset("path/to/dataset", cache_dir="~/.cache/molmo-edge/frames")
    sample = ds.sample(i, action_horizon=30)
    sample.state            (s,)      float32, observation.state at frame i
    sample.actions          (ah, ad)  float32, action[i : i + ah], last action repeated past the episode end
    sample.action_mask      (ah,)     bool, False where padded
    sample.images           {camera key: (h, w, 3) uint8}
    sample.task             the frame's instruction

All vector columns are loaded into memory (a few MB per 100k frames). Video is decoded one
whole episode at a time into a uint8 array and kept in an in-memory LRU cache (``cache_mb``)
and, with ``cache_dir``, in ``.npy`` files that later runs and DataLoader workers memory-map,
so training pays for video decoding once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from molmoact2_edge.data import lerobot_format as fmt
from molmoact2_edge.data.video import decode_segment
from molmoact2_edge.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    state: np.ndarray  # (s,)
    actions: np.ndarray  # (ah, ad)
    action_mask: np.ndarray  # (ah,) bool
    images: dict[str, np.ndarray]  # key -> (h, w, 3) uint8
    task: str
    episode_index: int
    frame_index: int


@dataclass
class Episode:
    index: int
    length: int
    tasks: list[str]
    start: int  # first row of this episode in the dataset's frame arrays
    videos: dict[str, tuple[Path, float]]  # video key -> (mp4 path, from_timestamp)


class LeRobotDataset:
    def __init__(self, root: str | Path, *, cache_dir: str | Path | None = None, cache_mb: float = 2048):
        self.root = Path(root).expanduser()
        info_path = self.root / fmt.INFO_PATH
        if not info_path.exists():
            raise DatasetError(f"{self.root} is not a LeRobot dataset: {info_path} is missing")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{info_path} is not valid JSON: {err}") from err
        self.version = self.info.get("codebase_version")
        if self.version not in fmt.READABLE_VERSIONS:
            raise DatasetError(
                f"{info_path}: codebase_version {self.version!r} is not supported (readable: {fmt.READABLE_VERSIONS})"
            )
        self.fps = float(self.info["fps"])
        self.features: dict[str, dict] = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in self.features.items() if f["dtype"] == "image"]
        self.camera_keys = self.video_keys + self.image_keys
        self.vector_keys = [
            k for k, f in self.features.items() if not fmt.is_visual(f) and k not in fmt.DEFAULT_FEATURES
        ]
        if self.version == fmt.V30:
            self.tasks = self._read_tasks_v30()
            rows, data_files = self._read_episodes_v30()
        else:
            self.tasks = self._read_tasks_v21()
            rows, data_files = self._read_episodes_v21()
        self._load_frames(data_files)
        self.episodes = self._make_episodes(rows)
        self._starts = np.array([e.start for e in self.episodes], dtype=np.int64)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = int(cache_mb * 2**20)
        self.cache_dir = Path(cache_dir).expanduser() / self._fingerprint() if cache_dir else None
        stats_path = self.root / fmt.STATS_PATH
        self.stats = json.loads(stats_path.read_text()) if stats_path.exists() else None

    # --- metadata -------------------------------------------------------------------------

    def _read_tasks_v30(self) -> dict[int, str]:
        table = _read_parquet(self.root / fmt.TASKS_PATH)
        text_cols = [
            n
            for n in table.column_names
            if n != "task_index" and _is_text(table.schema.field(n).type)
        ]
        if "task_index" not in table.column_names or not text_cols:
            raise DatasetError(
                f"{self.root / fmt.TASKS_PATH}: expected a task_index column and a task string column"
            )
        col = "task" if "task" in text_cols else text_cols[0]  # pandas stores the index as __index_level_0__
        return dict(zip(table["task_index"].to_pylist(), table[col].to_pylist(), strict=True))

    def _read_tasks_v21(self) -> dict[int, str]:
        rows = _read_jsonl(self.root / fmt.TASKS_JSONL)
        return {int(r["task_index"]): r["task"] for r in rows}

    def _read_episodes_v30(self) -> tuple[list[dict], list[Path]]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root}/meta/episodes/ has no parquet files")
        rows = [r for f in files for r in _read_parquet(f).to_pylist()]
        rows.sort(key=lambda r: r["episode_index"])
        data_files = sorted({(r["data/chunk_index"], r["data/file_index"]) for r in rows})
        paths = [self.root / fmt.DATA_PATH.format(chunk_index=c, file_index=f) for c, f in data_files]
        for row in rows:
            row["_videos"] = {
                key: (
                    self.root
                    / fmt.VIDEO_PATH.format(
                        video_key=key,
                        chunk_index=row[f"videos/{key}/chunk_index"],
                        file_index=row[f"videos/{key}/file_index"],
                    ),
                    float(row[f"videos/{key}/from_timestamp"]),
                )
                for key in self.video_keys
            }
        return rows, paths

    def _read_episodes_v21(self) -> tuple[list[dict], list[Path]]:
        rows = sorted(_read_jsonl(self.root / fmt.EPISODES_JSONL), key=lambda r: r["episode_index"])
        chunks = int(self.info.get("chunks_size", fmt.CHUNKS_SIZE))
        paths = []
        for row in rows:
            ep = row["episode_index"]
            paths.append(
                self.root / self.info["data_path"].format(episode_chunk=ep // chunks, episode_index=ep)
            )
            row["_videos"] = {
                key: (
                    self.root
                    / self.info["video_path"].format(
                        episode_chunk=ep // chunks, video_key=key, episode_index=ep
                    ),
                    0.0,
                )
                for key in self.video_keys
            }
        return rows, paths

    def _load_frames(self, data_files: list[Path]) -> None:
        tables = [_read_parquet(p) for p in data_files]
        if not tables:
            raise DatasetError(f"{self.root} has no data files")
        table = pa.concat_tables(tables, promote_options="default")
        missing = [
            k
            for k in ("episode_index", "frame_index", "timestamp", *self.vector_keys)
            if k not in table.column_names
        ]
        if missing:
            raise DatasetError(f"{data_files[0]}: data parquet lacks column(s) {missing}")
        order = np.lexsort((table["frame_index"].to_numpy(), table["episode_index"].to_numpy()))
        table = table.take(pa.array(order))
        self.episode_index = table["episode_index"].to_numpy().astype(np.int64)
        self.frame_index = table["frame_index"].to_numpy().astype(np.int64)
        self.timestamp = table["timestamp"].to_numpy().astype(np.float64)
        self.task_index = (
            table["task_index"].to_numpy().astype(np.int64) if "task_index" in table.column_names else None
        )
        self.columns: dict[str, np.ndarray] = {}
        for key in self.vector_keys:
            col = table[key].combine_chunks()
            if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:
                values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
            elif (
                pa.types.is_list(col.type)
                or pa.types.is_fixed_size_list(col.type)
                or pa.types.is_large_list(col.type)
            ):
                values = np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
            else:
                values = col.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
            self.columns[key] = values
        self._image_columns = {k: table[k] for k in self.image_keys}

    def _make_episodes(self, rows: list[dict]) -> list[Episode]:
        starts = np.searchsorted(self.episode_index, [r["episode_index"] for r in rows])
        episodes = []
        for row, start in zip(rows, starts, strict=True):
            length = int(row["length"])
            ep = int(row["episode_index"])
            if start + length > len(self.episode_index) or self.episode_index[start + length - 1] != ep:
                raise DatasetError(
                    f"{self.root}: episode {ep} metadata says {length} frames, the data disagrees"
                )
            episodes.append(Episode(ep, length, list(row.get("tasks") or []), int(start), row["_videos"]))
        return episodes

    def _fingerprint(self) -> str:
        info = (self.root / fmt.INFO_PATH).read_bytes()
        return f"{self.root.name}-{hashlib.sha1(info + str(self.root.resolve()).encode()).hexdigest()[:12]}"

    # --- access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.episode_index)

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def _episode_of(self, i: int) -> Episode:
        # episodes are in episode_index order and self.episode_index is sorted
        pos = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.episodes[pos]

    def task_of(self, i: int) -> str:
        if self.task_index is not None:
            return self.tasks[int(self.task_index[i])]
        return self._episode_of(i).tasks[0]

    def episode_frames(self, episode: Episode, key: str) -> np.ndarray:
        """(t, h, w, 3) uint8 frames of camera ``key`` for a whole episode (cached)."""
        cache_key = (key, episode.index)
        if cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            return self._cache[cache_key]
        frames = self._load_cached_file(key, episode)
        if frames is None:
            frames = self._decode(key, episode)
            self._store_cached_file(key, episode, frames)
        self._cache[cache_key] = frames
        self._cache_bytes += frames.nbytes if isinstance(frames, np.ndarray) and frames.flags.owndata else 0
        while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes if old.flags.owndata else 0
        return frames

    def _decode(self, key: str, episode: Episode) -> np.ndarray:
        rows = slice(episode.start, episode.start + episode.length)
        if key in self._image_columns:
            return _decode_images(self._image_columns[key][rows].to_pylist(), self.root, key)
        if key not in episode.videos:
            raise DatasetError(f"unknown camera key '{key}'; cameras are {self.camera_keys}")
        path, start = episode.videos[key]
        return decode_segment(path, start, self.timestamp[rows], self.fps)

    def _cache_file(self, key: str, episode: Episode) -> Path | None:
        return self.cache_dir / key / f"episode_{episode.index:06d}.npy" if self.cache_dir else None

    def _load_cached_file(self, key: str, episode: Episode) -> np.ndarray | None:
        path = self._cache_file(key, episode)
        if path is None or not path.exists():
            return None
        return np.load(path, mmap_mode="r")

    def _store_cached_file(self, key: str, episode: Episode, frames: np.ndarray) -> None:
        path = self._cache_file(key, episode)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
        np.save(tmp, frames)
        tmp.replace(path)  # atomic, so concurrent DataLoader workers never read half a file

    def warm_cache(self, keys: list[str] | None = None) -> None:
        """Decode every episode of ``keys`` (default: all cameras) into the cache now."""
        for episode in self.episodes:
            for key in keys or self.camera_keys:
                self.episode_frames(episode, key)

    def sample(
        self,
        i: int,
        action_horizon: int,
        *,
        state_key: str = "observation.state",
        action_key: str = "action",
        camera_keys: list[str] | None = None,
    ) -> Sample:
        """Frame ``i``'s state, the next ``action_horizon`` actions (padded at the episode end) and images."""
        if not 0 <= i < len(self):
            raise IndexError(f"frame index {i} out of range [0, {len(self)})")
        for key in (state_key, action_key):
            if key not in self.columns:
                raise DatasetError(f"dataset has no vector feature '{key}'; it has {sorted(self.columns)}")
        episode = self._episode_of(i)
        end = episode.start + episode.length
        idx = np.arange(i, i + action_horizon)
        mask = idx < end
        actions = self.columns[action_key][np.minimum(idx, end - 1)]
        images = {}
        for key in camera_keys if camera_keys is not None else self.camera_keys:
            images[key] = np.asarray(self.episode_frames(episode, key)[i - episode.start])
        return Sample(
            state=self.columns[state_key][i],
            actions=actions,
            action_mask=mask,
            images=images,
            task=self.task_of(i),
            episode_index=episode.index,
            frame_index=int(self.frame_index[i]),
        )


def _is_text(kind: pa.DataType) -> bool:
    """``string`` or ``large_string``: LeRobot 0.4+ under pandas 3 writes the latter."""
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _read_parquet(path: Path) -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path} is missing")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"could not read parquet {path}: {err}") from err


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DatasetError(f"{path} is missing")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: invalid JSON line: {err}") from err


def _decode_images(cells: list[dict], root: Path, key: str) -> np.ndarray:
    """HF ``Image`` cells ({"bytes", "path"}) -> (t, h, w, 3) uint8."""
    from PIL import Image

    frames = []
    for cell in cells:
        if cell.get("bytes"):
            img = Image.open(io.BytesIO(cell["bytes"]))
        elif cell.get("path"):
            img = Image.open(root / cell["path"])
        else:
            raise DatasetError(f"image feature '{key}' has a cell with neither bytes nor path")
        frames.append(np.asarray(img.convert("RGB")))
    return np.stack(frames)
