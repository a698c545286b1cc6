"""Observations for int8 calibration and the parity gate: from a LeRobot dataset, a recorded .npz, or synthesized.

``--calib`` accepts:

- a LeRobot-format dataset directory (``meta/info.json``; read with ``molmoact2_edge.data``):
  frames spread evenly over the dataset, cameras matched to the bundle's camera
  names (``observation.images.front`` -> ``front``);
- an ``.npz`` of recorded observations: ``state`` (N, s) float32, ``task`` (N,) str, and one
  ``images_<camera>`` (N, h, w, 3) uint8 array per camera (``save_observations`` writes it).

Parity needs observations too, but only numerically: without ``--calib`` it uses
seeded synthetic ones (random images, states spread over the stats range).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from molmoact2_edge.errors import DatasetError, ExportError
from molmoact2_edge.normalization import TagMetadata
from molmoact2_edge.types import Observation

log = logging.getLogger(__name__)

IMAGE_PREFIX = "images_"
DEFAULT_TASK = "pick up the cube and place it in the bin"


def load_observations(path: str | Path, cameras: Sequence[str] | None, limit: int = 16) -> list[Observation]:
    """Up to ``limit`` observations from a dataset directory or an .npz (see the module docstring).

    cameras: the names to load (None: every camera the source has, by its short name).
    """
    path = Path(path)
    if path.is_dir():
        return _from_dataset(path, cameras, limit)
    if path.suffix == ".npz" and path.is_file():
        return _from_npz(path, cameras, limit)
    raise ExportError(f"--calib {path}: expected a LeRobot dataset directory or an .npz of observations")


def save_observations(path: str | Path, observations: Sequence[Observation]) -> None:
    """Write observations as the .npz that ``load_observations`` reads (e.g. recorded on the robot)."""
    names = sorted(observations[0].images)
    arrays: dict[str, np.ndarray] = {
        "state": np.stack([o.state for o in observations]).astype(np.float32),
        "task": np.array([o.task for o in observations]),
    }
    for name in names:
        arrays[IMAGE_PREFIX + name] = np.stack([o.images[name] for o in observations])
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first kwarg as allow_pickle


def _from_npz(path: Path, cameras: Sequence[str] | None, limit: int) -> list[Observation]:
    with np.load(path, allow_pickle=False) as data:
        if cameras is None:
            cameras = sorted(k[len(IMAGE_PREFIX) :] for k in data.files if k.startswith(IMAGE_PREFIX))
        missing = [c for c in cameras if IMAGE_PREFIX + c not in data]
        if "state" not in data or "task" not in data or missing:
            raise ExportError(
                f"{path}: needs 'state', 'task' and images_<camera> for {list(cameras)} "
                f"(missing cameras {missing}); it has {sorted(data.files)}"
            )
        n = min(limit, len(data["state"]))
        return [
            Observation(
                images={c: np.asarray(data[IMAGE_PREFIX + c][i], dtype=np.uint8) for c in cameras},
                state=np.asarray(data["state"][i], dtype=np.float32),
                task=str(data["task"][i]),
            )
            for i in range(n)
        ]


def _from_dataset(path: Path, cameras: Sequence[str] | None, limit: int) -> list[Observation]:
    from molmoact2_edge.data.reader import LeRobotDataset

    try:
        dataset = LeRobotDataset(path)
    except DatasetError as err:
        raise ExportError(f"--calib {path}: {err}") from err
    if cameras is None:
        cameras = [k.rsplit(".", 1)[-1] for k in dataset.camera_keys]
    keys = {}
    for camera in cameras:
        match = [k for k in dataset.camera_keys if k == camera or k.rsplit(".", 1)[-1] == camera]
        if not match:
            raise ExportError(f"--calib {path}: no camera '{camera}' (dataset cameras: {dataset.camera_keys})")
        keys[camera] = match[0]
    frames = np.linspace(0, len(dataset) - 1, num=min(limit, len(dataset))).round().astype(int)
    out = []
    for i in frames:
        sample = dataset.sample(int(i), 1, camera_keys=list(keys.values()))
        out.append(
            Observation(
                images={c: sample.images[k] for c, k in keys.items()},
                state=np.asarray(sample.state, dtype=np.float32),
                task=sample.task,
            )
        )
    log.info("calibration: %d frames of %s", len(out), path)
    return out


def synthetic_observations(
    cameras: Sequence[str], meta: TagMetadata, count: int, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> list[Observation]:
    """Seeded random observations: smooth random images (not pure noise, so pooling sees structure) and
    states uniform over each dim's [q01, q99] (or [min, max]) range."""
    rng = np.random.default_rng(seed)
    stats = meta.state_stats
    out = []
    for _ in range(count):
        images = {}
        for camera in cameras:
            coarse = rng.integers(0, 256, size=(size[0] // 8, size[1] // 8, 3)).astype(np.float32)
            images[camera] = np.kron(coarse, np.ones((8, 8, 1), dtype=np.float32)).astype(np.uint8)
        if stats is None:
            state = np.zeros(0, dtype=np.float32)
        else:
            lo_key, hi_key = ("q01", "q99") if "q01" in stats.values else ("min", "max")
            lo, hi = stats.values[lo_key], stats.values[hi_key]
            state = (lo + (hi - lo) * rng.random(lo.shape)).astype(np.float32)
        out.append(Observation(images=images, state=state, task=DEFAULT_TASK))
    return out
