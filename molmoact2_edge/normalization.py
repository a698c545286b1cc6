"""Normalization statistics: ``norm_stats.json`` (format ``molmoact2_norm_stats.v1``), numpy only.

Reference §5 and §11 A17 (the release's ``_FeatureNormalizer``). One file holds a
``norm_mode`` and, per embodiment tag (``so100_so101_molmoact2``, ...), the prompt
metadata (setup type, control mode, horizon) and per-dimension statistics of the
action and the state. The device runtime reads it, so no torch here.

Modes (``lo``/``hi`` are min/max, q01/q99 or q10/q90):

- bounded: ``n = clip(2 (x - lo) / max(hi - lo, 1e-6) - 1, -1, 1)``; inverse clips n to
  [-1, 1] first: ``x = (n + 1) (hi - lo) / 2 + lo``.
- ``mean_std``: ``(x - mean) / max(std, 1e-6)``, no clip; ``none``: identity.
- dims with ``mask = false`` pass through (the inverse returns the clipped model value);
  then dims with ``min == max`` normalize to 0 (only when min/max are stored).

Computation is float32, as the release (state bins can differ by one at exact .5 ties in fp64).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.errors import CheckpointError, ConfigError

FORMAT = "molmoact2_norm_stats.v1"
NORM_MODES = ("q01_q99", "q10_q90", "min_max", "mean_std", "none")
_BOUNDS = {"q01_q99": ("q01", "q99"), "q10_q90": ("q10", "q90"), "min_max": ("min", "max")}
_VECTOR_KEYS = ("mean", "std", "min", "max", "q01", "q99", "q10", "q90")  # order used to find the width
_EPS = 1e-6


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension statistics of one feature (action or state)."""

    values: dict[str, np.ndarray]  # name (mean, std, min, max, q01, q99, ...) -> (dim,) float32
    mask: np.ndarray  # (dim,) bool; false = pass through un-normalized
    names: tuple[str, ...] = ()
    count: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def dim(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> FeatureStats:
        vectors = {k: np.asarray(data[k], dtype=np.float32) for k in _VECTOR_KEYS if k in data}
        if not vectors:
            raise CheckpointError(f"{where}: no statistics (expected some of {list(_VECTOR_KEYS)})")
        dim = next(iter(vectors.values())).shape[0]
        for name, vec in vectors.items():
            if vec.shape != (dim,):
                raise CheckpointError(f"{where}.{name}: shape {vec.shape}, expected ({dim},) like the others")
        mask = np.asarray(data.get("mask", [True] * dim), dtype=bool)
        if mask.shape != (dim,):
            raise CheckpointError(f"{where}.mask: length {mask.shape[0]}, expected {dim}")
        known = set(_VECTOR_KEYS) | {"mask", "names", "count"}
        return cls(
            values=vectors,
            mask=mask,
            names=tuple(data.get("names") or ()),
            count=data.get("count"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.astype(float).tolist() for k, v in self.values.items()}
        out["mask"] = self.mask.tolist()
        if self.names:
            out["names"] = list(self.names)
        if self.count is not None:
            out["count"] = self.count
        out.update(self.extra)
        return out

    @classmethod
    def compute(cls, data: np.ndarray, mask: Sequence[bool] | None = None, names: Sequence[str] = ()) -> FeatureStats:
        """Statistics of samples (N, dim): min, max, mean, std, q01, q99, q10, q90."""
        x = np.asarray(data, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ConfigError(f"need samples shaped (N, dim) with N > 0, got {x.shape}")
        q = np.quantile(x, [0.01, 0.99, 0.10, 0.90], axis=0)
        values = {
            "min": x.min(0),
            "max": x.max(0),
            "mean": x.mean(0),
            "std": x.std(0),
            "q01": q[0],
            "q99": q[1],
            "q10": q[2],
            "q90": q[3],
        }
        m = np.ones(x.shape[1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        return cls({k: v.astype(np.float32) for k, v in values.items()}, m, tuple(names), int(x.shape[0]))

    def _need(self, mode: str, *keys: str) -> list[np.ndarray]:
        missing = [k for k in keys if k not in self.values]
        if missing:
            raise ConfigError(f"norm_mode {mode!r} needs statistics {missing}, which norm_stats.json lacks")
        return [self.values[k] for k in keys]

    def _constant(self) -> np.ndarray | None:
        if "min" in self.values and "max" in self.values:
            return self.values["min"] == self.values["max"]
        return None

    def normalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        """x (..., dim) raw -> normalized float32."""
        x = self._check(x)
        if mode == "none":
            return x
        if mode == "mean_std":
            mean, std = self._need(mode, "mean", "std")
            n = (x - mean) / np.maximum(std, np.float32(_EPS))
        else:
            lo, hi = self._need(mode, *_BOUNDS[mode])
            n = np.clip(2 * (x - lo) / np.maximum(hi - lo, np.float32(_EPS)) - 1, -1, 1)
        n = np.where(self.mask, n, x)
        constant = self._constant()
        if constant is not None:
            n = np.where(constant, np.float32(0.0), n)
        return n.astype(np.float32)

    def unnormalize(self, n: np.ndarray, mode: str) -> np.ndarray:
        """n (..., dim) normalized -> raw float32."""
        n = self._check(n)
        if mode == "none":
            return n
        if mode == "mean_std":
            mean, std = self._need(mode, "mean", "std")
            x = n * np.maximum(std, np.float32(_EPS)) + mean
            return np.where(self.mask, x, n).astype(np.float32)
        lo, hi = self._need(mode, *_BOUNDS[mode])
        y = np.clip(n, -1, 1)
        x = (y + 1) * (hi - lo) / 2 + lo
        return np.where(self.mask, x, y).astype(np.float32)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.dim:
            raise ConfigError(f"expected last dimension {self.dim}, got shape {x.shape}")
        return x


@dataclass(frozen=True)
class TagMetadata:
    """One embodiment tag of ``metadata_by_tag``."""

    action_stats: FeatureStats
    state_stats: FeatureStats | None = None
    setup_type: str = ""  # prompt text, e.g. "single so100/so101 robotic arm in molmoact2"
    control_mode: str = ""  # prompt text, e.g. "absolute joint pose"
    action_horizon: int | None = None  # ah generated for this tag (<= max_action_horizon)
    n_action_steps: int | None = None  # default number of steps returned
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)  # action_key, state_keys, ...

    @property
    def action_dim(self) -> int:
        """Inference action width = the stats' width (the ``action_dim`` key is a training setting)."""
        return self.action_stats.dim

    @property
    def state_dim(self) -> int:
        return self.state_stats.dim if self.state_stats is not None else 0

    @property
    def state_keys(self) -> list[str]:
        """Dataset state columns: ``state_keys`` (list) or the older ``state_key`` (string)."""
        keys = self.extra.get("state_keys", self.extra.get("state_key", []))
        return [keys] if isinstance(keys, str) else list(keys)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TagMetadata:
        if "action_stats" not in data:
            raise CheckpointError(f"{where}: no action_stats")
        known = {"action_stats", "state_stats", "setup_type", "control_mode", "action_horizon", "n_action_steps"}
        state = data.get("state_stats")
        return cls(
            action_stats=FeatureStats.from_dict(data["action_stats"], f"{where}.action_stats"),
            state_stats=FeatureStats.from_dict(state, f"{where}.state_stats") if state else None,
            setup_type=data.get("setup_type") or "",
            control_mode=data.get("control_mode") or "",
            action_horizon=data.get("action_horizon"),
            n_action_steps=data.get("n_action_steps"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            setup_type=self.setup_type,
            control_mode=self.control_mode,
            action_horizon=self.action_horizon,
            n_action_steps=self.n_action_steps,
            action_stats=self.action_stats.to_dict(),
        )
        if self.state_stats is not None:
            out["state_stats"] = self.state_stats.to_dict()
        return out


@dataclass(frozen=True)
class NormStats:
    """The whole ``norm_stats.json``."""

    tags: dict[str, TagMetadata]
    norm_mode: str = "q01_q99"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.norm_mode not in NORM_MODES:
            raise ConfigError(f"norm_mode {self.norm_mode!r} not in {NORM_MODES}")

    def tag(self, name: str | None = None) -> TagMetadata:
        """The named tag's metadata (None: the only tag); ConfigError with the closest name otherwise."""
        if name is None:
            if len(self.tags) != 1:
                raise ConfigError(f"norm_stats.json has tags {sorted(self.tags)}: name one")
            return next(iter(self.tags.values()))
        if name not in self.tags:
            close = difflib.get_close_matches(name, self.tags, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown norm-stats tag {name!r}.{hint} Known: {sorted(self.tags)}")
        return self.tags[name]

    def normalize_state(self, state: np.ndarray, tag: str | None = None) -> np.ndarray:
        meta = self.tag(tag)
        if meta.state_stats is None:
            raise ConfigError(f"tag {tag!r} has no state_stats")
        return meta.state_stats.normalize(state, self.norm_mode)

    def unnormalize_state(self, state: np.ndarray, tag: str | None = None) -> np.ndarray:
        meta = self.tag(tag)
        if meta.state_stats is None:
            raise ConfigError(f"tag {tag!r} has no state_stats")
        return meta.state_stats.unnormalize(state, self.norm_mode)

    def normalize_action(self, action: np.ndarray, tag: str | None = None) -> np.ndarray:
        return self.tag(tag).action_stats.normalize(action, self.norm_mode)

    def unnormalize_action(self, action: np.ndarray, tag: str | None = None) -> np.ndarray:
        return self.tag(tag).action_stats.unnormalize(action, self.norm_mode)

    def with_tag(self, name: str, meta: TagMetadata) -> NormStats:
        return dataclasses.replace(self, tags={**self.tags, name: meta})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "norm_stats.json") -> NormStats:
        fmt = data.get("format")
        if fmt != FORMAT:
            raise CheckpointError(f"{where}: format {fmt!r}, expected {FORMAT!r}")
        tags = data.get("metadata_by_tag")
        if not isinstance(tags, Mapping) or not tags:
            raise CheckpointError(f"{where}: metadata_by_tag is missing or empty")
        known = {"format", "norm_mode", "metadata_by_tag"}
        return cls(
            tags={name: TagMetadata.from_dict(meta, f"{where}:{name}") for name, meta in tags.items()},
            norm_mode=data.get("norm_mode") or "min_max",  # the release loader's default when absent
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "norm_mode": self.norm_mode}
        out.update(self.extra)
        out["metadata_by_tag"] = {name: meta.to_dict() for name, meta in self.tags.items()}
        return out

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"{path}: no such norm-stats file") from err
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def compute(
        cls,
        tag: str,
        actions: np.ndarray,
        states: np.ndarray | None = None,
        *,
        action_mask: Sequence[bool] | None = None,
        state_mask: Sequence[bool] | None = None,
        action_names: Sequence[str] = (),
        state_names: Sequence[str] = (),
        setup_type: str = "",
        control_mode: str = "",
        action_horizon: int | None = None,
        n_action_steps: int | None = None,
        norm_mode: str = "q01_q99",
        **metadata: Any,
    ) -> NormStats:
        """Stats for one tag from samples: actions (N, ad), states (N, s). ``metadata`` keeps extra keys
        (``action_key``, ``state_keys``, ``camera_keys``, ``normalize_gripper``, ...)."""
        meta = TagMetadata(
            action_stats=FeatureStats.compute(actions, action_mask, action_names),
            state_stats=FeatureStats.compute(states, state_mask, state_names) if states is not None else None,
            setup_type=setup_type,
            control_mode=control_mode,
            action_horizon=action_horizon,
            n_action_steps=n_action_steps,
            extra=dict(metadata),
        )
        return cls({tag: meta}, norm_mode)
