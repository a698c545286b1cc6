"""Plain-numpy values that cross module boundaries: what a robot observes and what a policy returns.

Torch-free on purpose: the device side (runtimes, hardware, cli) and the
PyTorch reference policy exchange exactly these. Shape legend (used across the
project): b batch, n cameras, h w c pixels, p patches, t prompt tokens,
l layers, kh KV heads, hd head dim, d width, ah chunk length, ad action dim,
s state dim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from molmoact2_edge.errors import ObservationError

# The stage names every act() times, in pipeline order (telemetry and bench use the same names).
STAGES = ("vision", "prefill", "depth", "decode", "flow", "total")


def flow_noise(seed: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """The flow's initial noise: standard normal float32 from numpy's PCG64 (``seed`` None: fresh entropy).

    The PyTorch reference and the device session both draw their noise with this function, so a
    seed means the same chunk on every backend.
    """
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@dataclass
class Observation:
    """One time step as the policy sees it.

    images: camera name -> (h, w, 3) uint8 RGB, in any order (the bundle's camera order picks them).
    state: (s,) float32 joint state in the robot's normalized units (degrees, gripper 0-100), unnormalized.
    task: the language instruction.
    timestamp: time.monotonic() when the observation was taken (used to align stale chunks).
    depth: optional camera name -> (h, w) float32 metres (simulation ground truth; never needed by a policy).
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    task: str
    timestamp: float = field(default_factory=time.monotonic)
    depth: dict[str, np.ndarray] | None = None

    def validate(self, camera_order: list[str] | tuple[str, ...], state_dim: int) -> None:
        """Raise ObservationError naming what is missing or mis-shaped."""
        missing = [name for name in camera_order if name not in self.images]
        if missing:
            raise ObservationError(
                f"observation lacks camera(s) {missing}; it has {sorted(self.images)} (expected order {list(camera_order)})"
            )
        for name in camera_order:
            img = self.images[name]
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ObservationError(
                    f"camera '{name}': expected (h, w, 3) uint8 RGB, got shape {img.shape} dtype {img.dtype}"
                )
        if self.state.shape != (state_dim,):
            raise ObservationError(f"state: expected shape ({state_dim},), got {tuple(self.state.shape)}")
        if not np.all(np.isfinite(self.state)):
            raise ObservationError(f"state has non-finite values: {self.state.tolist()}")


@dataclass
class ActionChunk:
    """What ``act()`` returns.

    actions: (ah, ad) float32 absolute joint targets in the robot's units (un-normalized).
    timestamp: the observation timestamp the chunk was computed from; action k is meant for
        ``timestamp + k / control_hz``.
    timings: stage name -> seconds (``vision``, ``prefill``, ``depth``, ``decode``, ``flow``, ``total``).
    info: extras, e.g. ``depth_cells_repredicted``, ``decode_ok`` (False when a discrete chunk failed to decode).
    """

    actions: np.ndarray
    timestamp: float
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])
