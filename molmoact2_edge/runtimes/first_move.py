"""The first move of a run: from the arm's present pose to the policy's first target, slowly, or not at all.

The first target of a policy run in the wrong joint frame (the SO100_101 legacy frame is 90
degrees off on two joints) or on a badly calibrated arm is far from where the arm is. The
safety layer's rate limit would still walk the arm there at full joint speed; ``FirstMoveGuard``
instead:

- refuses a first target farther than ``max_fraction`` of a joint's envelope from the present
  pose (grippers exempt: open or closed is a legitimate first command), raising
  ``FirstMoveError`` that names the joints, the distances and the likely cause before a single
  position is commanded (the safety layer then applies its exit policy: hold where it is);
- otherwise approaches the first target at ``approach_fraction`` of the arm's rated joint
  speed, one interpolated target per control period through the safety layer.

``first_move`` runs before the control loop: one policy call on the present observation gives
the first target (it also warms the backend up), the arm approaches it, and the loop then starts
from there with fresh observations, so no stale chunk is replayed after a long approach.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from molmoact2_edge.errors import FirstMoveError
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirstMoveConfig:
    max_fraction: float = 0.35  # of each joint's envelope (SO-101: ~60 deg; the frame mistake is ~90)
    approach_fraction: float = 0.25  # of the robot's rated joint speed (limits.max_step * limits.control_hz)
    likely_cause: str = "the joint frame or the calibration"  # named in the error (the caller knows more)


class FirstMoveGuard:
    """Around a started ``SafetyLayer``: the first target becomes a slow approach, or an error before any motion."""

    def __init__(
        self,
        layer: Any,
        hz: float,
        config: FirstMoveConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.layer = layer
        self.hz = hz
        self.config = config or FirstMoveConfig()
        self.sleep = sleep
        limits = layer.limits
        self.names: tuple[str, ...] = tuple(limits.names)
        span = np.asarray(limits.upper, np.float32) - np.asarray(limits.lower, np.float32)
        self.max_distance = np.where(
            ["gripper" in n for n in self.names], np.inf, span * np.float32(self.config.max_fraction)
        ).astype(np.float32)
        self.speed = np.asarray(limits.max_step, np.float32) * np.float32(limits.control_hz * self.config.approach_fraction)
        self.approach_ticks = 0  # control periods the approach took

    def check(self, present: np.ndarray, target: np.ndarray) -> None:
        """Raise FirstMoveError when ``target`` is farther than allowed from ``present`` on any joint."""
        distance = np.abs(target - present)
        far = [i for i in range(len(self.names)) if distance[i] > self.max_distance[i]]
        if far:
            detail = ", ".join(
                f"{self.names[i]} {float(present[i]):.1f} -> {float(target[i]):.1f} "
                f"({float(distance[i]):.1f} > {float(self.max_distance[i]):.1f})"
                for i in far
            )
            raise FirstMoveError(
                f"the policy's first target is too far from the arm's present pose on {[self.names[i] for i in far]}: "
                f"{detail}; the arm was not moved. Likely cause: {self.config.likely_cause}"
            )

    def approach(self, target: np.ndarray) -> None:
        """Check ``target`` against the pose the layer started from, then move there slowly (ending on it)."""
        target = np.asarray(target, np.float32)
        present = np.asarray(self.layer.last_commanded, np.float32)  # the measured pose the layer started from
        self.check(present, target)
        finite = np.isfinite(target)
        seconds = float(np.max(np.abs(target - present)[finite] / self.speed[finite], initial=0.0))
        ticks = max(1, math.ceil(seconds * self.hz))
        log.info("first move: approaching the first target over %.2f s (%d ticks)", seconds, ticks)
        for i in range(1, ticks + 1):
            self.layer.send(present + (target - present) * np.float32(i / ticks))
            self.sleep(1.0 / self.hz)
        self.approach_ticks = ticks


def first_move(
    policy: Callable[[Observation], ActionChunk],
    layer: Any,
    task: str,
    hz: float,
    config: FirstMoveConfig | None = None,
) -> dict[str, Any]:
    """Before the loop: the policy's first target from the present observation, approached slowly or refused.

    Returns what happened, for telemetry: the target, the ticks the approach took, the policy call's seconds.
    """
    t0 = time.perf_counter()
    chunk = policy(layer.observe(task))
    seconds = time.perf_counter() - t0
    target = np.asarray(chunk.actions[0], np.float32)
    guard = FirstMoveGuard(layer, hz, config)
    guard.approach(target)
    return {"target": target.round(3).tolist(), "approach_ticks": guard.approach_ticks, "policy_s": round(seconds, 3)}
