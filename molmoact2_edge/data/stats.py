"""Feature statistics in LeRobot's ``stats.json`` form and the released ``norm_stats.json``.

LeRobot keeps, per feature, ``min max mean std count`` and the quantiles ``q01 q10 q50 q90 q99``
(per dimension for vectors; per channel, shape [3, 1, 1], in [0, 1] for images). MolmoAct2's
``norm_stats.json`` (reference: molmoact2-checkpoint.md §5) wraps the action and state stats of
one dataset under a tag with the prompt metadata (``molmoact2_edge.normalization.NormStats``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from molmoact2_edge.data.reader import LeRobotDataset
    from molmoact2_edge.normalization import NormStats

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
SO101_TAG = "so100_so101_molmoact2"
SO101_SETUP = "single so100/so101 robotic arm in molmoact2"


def vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Stats over axis 0 of a (frames, dim) array."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    stats = {
        "min": values.min(axis=0),
        "max": values.max(axis=0),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0),
        "count": np.array([len(values)]),
    }
    for name, q in QUANTILES.items():
        stats[name] = np.quantile(values, q, axis=0)
    return stats


def image_stats(frames: np.ndarray, max_frames: int = 200) -> dict[str, np.ndarray]:
    """Per-channel stats of (t, h, w, 3) uint8 frames, scaled to [0, 1], each shaped (3, 1, 1).

    At most ``max_frames`` evenly spaced frames, subsampled 4x spatially (as LeRobot does,
    stats of images are only used for normalization and need not be exact).
    """
    t = len(frames)
    pick = np.linspace(0, t - 1, min(t, max_frames)).astype(np.int64)
    pixels = frames[pick, ::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0
    stats = vector_stats(pixels)
    out = {k: v.reshape(3, 1, 1) for k, v in stats.items() if k != "count"}
    out["count"] = np.array([t])
    return out


def merge_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-episode stats: exact min/max/mean/std, count-weighted quantiles (LeRobot's approximation)."""
    counts = np.array([float(s["count"][0]) for s in per_episode])
    w = counts / counts.sum()
    means = np.stack([s["mean"] for s in per_episode])
    mean = np.tensordot(w, means, axes=1)
    second = np.tensordot(w, np.stack([s["std"] ** 2 + s["mean"] ** 2 for s in per_episode]), axes=1)
    out = {
        "min": np.min(np.stack([s["min"] for s in per_episode]), axis=0),
        "max": np.max(np.stack([s["max"] for s in per_episode]), axis=0),
        "mean": mean,
        "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
        "count": np.array([int(counts.sum())]),
    }
    for name in QUANTILES:
        if all(name in s for s in per_episode):
            out[name] = np.tensordot(w, np.stack([s[name] for s in per_episode]), axes=1)
    return out


def to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    return {feat: {k: np.asarray(v).tolist() for k, v in s.items()} for feat, s in stats.items()}


def dataset_norm_stats(
    dataset: LeRobotDataset,
    *,
    tag: str = SO101_TAG,
    action_key: str = "action",
    state_key: str = "observation.state",
    action_horizon: int = 30,
    setup_type: str = SO101_SETUP,
    control_mode: str = "absolute joint pose",
    normalize_gripper: bool = True,
    gripper_index: int | None = -1,
) -> NormStats:
    """``NormStats`` (norm_stats.json, q01_q99) of one dataset's action and state columns, all frames.

    ``gripper_index`` names the gripper dimension, whose mask is ``normalize_gripper``.
    """
    from molmoact2_edge.normalization import NormStats

    actions, states = dataset.columns[action_key], dataset.columns[state_key]

    def mask(dim: int) -> list[bool]:
        m = [True] * dim
        if gripper_index is not None:
            m[gripper_index] = normalize_gripper
        return m

    return NormStats.compute(
        tag,
        actions,
        states,
        action_mask=mask(actions.shape[1]),
        state_mask=mask(states.shape[1]),
        action_names=_names(dataset.features[action_key], actions.shape[1], action_key),
        state_names=_names(dataset.features[state_key], states.shape[1], state_key),
        setup_type=setup_type,
        control_mode=control_mode,
        action_horizon=action_horizon,
        n_action_steps=action_horizon,
        action_key=action_key,
        state_keys=[state_key],
        camera_keys=[],
        normalize_gripper=normalize_gripper,
        action_dim=32,
    )


def _names(feature: dict, dim: int, key: str) -> list[str]:
    names = feature.get("names") or [f"{key}_{i}" for i in range(dim)]
    if isinstance(names, dict):  # older LeRobot writes {"motors": [...]}
        names = next(iter(names.values()))
    return list(names)
