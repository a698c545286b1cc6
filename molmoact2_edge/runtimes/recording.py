"""Record what the control loop saw and sent as a LeRobot v3 dataset, crash-safe to within a second.

``DatasetRecorder`` feeds ``data.writer.LeRobotWriter`` (which encodes an episode
when it ends) and, every ``flush()`` (the loop calls it once a second), also
spools the frames since the last flush to ``<root>/.spool/episode_<i>/part_<k>.npz``
(with ``.spool/meta.json``: rate, joints, robot type, joint frame). The spool keeps every
episode until ``finalize`` has written the dataset's metadata: after a crash (even a
``kill -9``) it holds everything but the last second, nothing is deleted, and ``recover``
(``molmo-edge recover DIR``) turns it into a valid dataset in place. ``run --record`` refuses
a folder holding a spool (pre-flight) instead of overwriting it.

Features follow LeRobot's SO-101 naming: ``observation.state`` and ``action``
with ``<joint>.pos`` names, one ``observation.images.<camera>`` video per camera.
pyarrow and PyAV are imported only when recording (``pip install 'molmoact2-edge[sim]'``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.errors import DatasetError, DependencyError
from molmoact2_edge.types import Observation

log = logging.getLogger(__name__)

SPOOL = ".spool"
SPOOL_META = "meta.json"


def _writer_module() -> Any:
    try:
        from molmoact2_edge.data import writer
    except ImportError as err:
        raise DependencyError(
            f"recording needs pyarrow and av ({err}): pip install 'molmoact2-edge[sim]'"
        ) from err
    return writer


def features(
    joint_names: tuple[str, ...], cameras: dict[str, tuple[int, int]], fps: int, codec: str
) -> dict[str, dict]:
    """LeRobot features for a robot with ``joint_names`` and cameras name -> (h, w)."""
    from molmoact2_edge.data import lerobot_format as fmt

    names = [f"{j}.pos" for j in joint_names]
    out: dict[str, dict] = {
        "action": {"dtype": "float32", "shape": [len(names)], "names": names},
        "observation.state": {"dtype": "float32", "shape": [len(names)], "names": names},
    }
    for cam, (h, w) in cameras.items():
        out[f"observation.images.{cam}"] = fmt.video_feature(h, w, fps, codec)
    return out


class DatasetRecorder:
    """Observation + sent action pairs -> LeRobot dataset at ``root`` (the control loop's ``Recorder``)."""

    def __init__(
        self,
        root: str | Path,
        fps: int,
        joint_names: tuple[str, ...],
        robot_type: str,
        codec: str | None = None,
        joint_frame: str | None = None,
    ):
        """joint_frame: the frame of state and action (written to meta/info.json for the robot contract)."""
        self.root = Path(root)
        self.joint_frame = joint_frame
        self.fps, self.joint_names, self.robot_type, self.codec = (
            int(fps),
            tuple(joint_names),
            robot_type,
            codec,
        )
        self._writer: Any = None
        self._pending: list[tuple[dict[str, np.ndarray], str]] = []
        self.episode = 0
        self._part = 0
        self._frames_in_episode = 0

    def _open(self, observation: Observation) -> None:
        writer = _writer_module()
        cameras = {name: (int(img.shape[0]), int(img.shape[1])) for name, img in observation.images.items()}
        codec = writer.pick_codec(self.codec)
        feats = features(self.joint_names, cameras, self.fps, codec)
        self._writer = writer.LeRobotWriter(
            self.root, fps=self.fps, features=feats, robot_type=self.robot_type, joint_frame=self.joint_frame, codec=codec
        )

    def add(self, observation: Observation, action: np.ndarray) -> None:
        if self._writer is None:
            self._open(observation)
        frame = {
            "observation.state": np.asarray(observation.state, np.float32),
            "action": np.asarray(action, np.float32),
        }
        for name, img in observation.images.items():
            frame[f"observation.images.{name}"] = img
        self._writer.add_frame(frame, observation.task)
        self._pending.append((frame, observation.task))
        self._frames_in_episode += 1

    @property
    def spool_dir(self) -> Path:
        return self.root / SPOOL / f"episode_{self.episode:06d}"

    def flush(self) -> None:
        """Spool the frames added since the last flush (one npz per flush)."""
        if not self._pending:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        meta = self.root / SPOOL / SPOOL_META
        if not meta.is_file():
            facts = {"fps": self.fps, "joint_names": list(self.joint_names), "robot_type": self.robot_type}
            meta.write_text(json.dumps({**facts, "joint_frame": self.joint_frame}) + "\n")
        keys = list(self._pending[0][0])
        arrays: dict[str, Any] = {
            k.replace("/", "_"): np.stack([f[k] for f, _ in self._pending]) for k in keys
        }
        arrays["task"] = np.array([t for _, t in self._pending])
        path = self.spool_dir / f"part_{self._part:05d}.npz"
        np.savez(path.with_suffix(".tmp.npz"), **arrays)
        path.with_suffix(".tmp.npz").replace(path)  # atomic: a crash mid-write leaves no half part
        self._part += 1
        self._pending.clear()

    def end_episode(self, keep: bool = True) -> int | None:
        """Save (or discard) the episode; returns the episode index saved.

        A kept episode stays whole in the spool until ``finalize`` (a crash before the dataset's
        metadata exists must not lose it); a discarded one's spool is deleted.
        """
        if keep:
            self.flush()
        self._pending.clear()
        saved = None
        if self._writer is not None and self._frames_in_episode:
            if keep:
                saved = self._writer.save_episode()
            else:
                self._writer.discard_episode()
        if not keep:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        self.episode += 1
        self._part = 0
        self._frames_in_episode = 0
        return saved

    def finalize(self) -> None:
        """Write the dataset's metadata; removes the spool."""
        if self._writer is None:
            raise DatasetError(f"nothing was recorded to {self.root}")
        self._writer.finalize()
        shutil.rmtree(self.root / SPOOL, ignore_errors=True)
        log.info("recorded %d episode(s) to %s", len(self._writer.episodes), self.root)


def recover(root: str | Path) -> int:
    """Turn the interrupted recording at ``root`` into a valid dataset at ``root``; returns the episodes recovered.

    The dataset is written beside it first; only then is the crashed folder (partial files and
    spool) replaced, so an interruption of the recovery itself loses nothing either.
    """
    root = Path(root)
    meta_path = root / SPOOL / SPOOL_META
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no interrupted recording here ({meta_path} is missing)")
    meta = json.loads(meta_path.read_text())
    staging = root.parent / f".{root.name}.recovering"
    shutil.rmtree(staging, ignore_errors=True)
    count = recover_spool(
        root, staging, int(meta["fps"]), tuple(meta["joint_names"]), meta["robot_type"], meta.get("joint_frame")
    )
    crashed = root.parent / f".{root.name}.crashed"
    root.rename(crashed)
    staging.rename(root)
    shutil.rmtree(crashed)
    log.info("recovered %d episode(s) into %s", count, root)
    return count


def recover_spool(
    root: str | Path,
    out: str | Path,
    fps: int,
    joint_names: tuple[str, ...],
    robot_type: str,
    joint_frame: str | None = None,
) -> int:
    """Turn a crashed recording's spool at ``root`` into a dataset at ``out``; returns the episodes written."""
    spool = Path(root) / SPOOL
    episodes = sorted(p for p in spool.glob("episode_*") if p.is_dir())
    if not episodes:
        raise DatasetError(f"{spool}: no spooled episodes to recover")
    recorder = DatasetRecorder(out, fps, joint_names, robot_type, joint_frame=joint_frame)
    for episode in episodes:
        for part in sorted(episode.glob("part_*.npz")):
            with np.load(part) as data:
                cams = [k for k in data.files if k.startswith("observation.images.")]
                for i in range(len(data["task"])):
                    obs = Observation(
                        images={k.removeprefix("observation.images."): data[k][i] for k in cams},
                        state=data["observation.state"][i],
                        task=str(data["task"][i]),
                    )
                    recorder.add(obs, data["action"][i])
        recorder._pending.clear()
        recorder.end_episode(keep=True)
    recorder.finalize()
    return len(episodes)
