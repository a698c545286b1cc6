"""The control loop's side of real-time chunking: the committed prefix and the delay, from what was actually sent.

``ChunkHandoff`` follows one request at a time through the loop (``runtimes/control.py``):

- ``request(current, t_obs, held)`` when the loop hands an observation to inference: the prefix
  is the current chunk from the observation's tick on (index by time, as the loop picks actions),
  the delay is the one measured at the last swap. No prefix without a current chunk (the first
  chunk, warm-up), when the loop was holding (a stall) or when the current chunk has nothing left
  for that tick (stale): the policy then samples a plain chunk.
- ``sent(target)`` on every tick that sends from the current chunk: kept while a request is in flight.
- ``swap(new, deadline, last_target)`` when the new chunk takes over: the delay in ticks is the index
  of the new chunk's first action used (the ticks that ran since its observation), and the seam jump
  is the largest joint change from the last sent target to that action. Returned for telemetry.

``seam_statistics`` turns a run's per-tick picks into the eval's seam numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from molmoact2_edge.rtc import CommittedPrefix
from molmoact2_edge.types import ActionChunk


def tick_index(chunk: ActionChunk, t: float, hz: float) -> int:
    """Which action of ``chunk`` is meant for time ``t`` (may be past its end)."""
    return max(0, int(round((t - chunk.timestamp) * hz)))


@dataclass
class ChunkHandoff:
    """What the loop committed to while the chunk in flight was being computed."""

    hz: float
    delay: int | None = None  # ticks of the last swap: what the next prefix's weights assume
    prefix: CommittedPrefix | None = None  # handed to the request in flight
    sent_during: list[np.ndarray] = field(default_factory=list)  # targets sent since that request

    def request(self, current: ActionChunk | None, t_obs: float, held: bool) -> CommittedPrefix | None:
        """The committed prefix for an observation taken at ``t_obs`` (None: sample without one)."""
        self.sent_during = []
        self.prefix = None
        if current is None or held:
            return None
        remaining = np.asarray(current.actions[tick_index(current, t_obs, self.hz) :], np.float32)
        if len(remaining) == 0:
            return None
        self.prefix = CommittedPrefix(remaining, min(self.delay or 0, len(remaining)))
        return self.prefix

    def sent(self, target: np.ndarray) -> None:
        self.sent_during.append(np.asarray(target, np.float32))

    def swap(self, new: ActionChunk, deadline: float, last_target: np.ndarray | None) -> dict[str, float | int | None]:
        """Measure the swap to ``new`` at ``deadline``: {delay_ticks, seam_jump, sent_during_inference}."""
        self.delay = tick_index(new, deadline, self.hz)
        jump = None
        if last_target is not None and self.delay < len(new):
            jump = float(np.max(np.abs(np.asarray(new.actions[self.delay]) - last_target)))
        return {"delay_ticks": self.delay, "seam_jump": jump, "sent_during_inference": len(self.sent_during)}


def seam_statistics(
    picks: Sequence[tuple[int, int]], targets: Sequence[np.ndarray], joints: slice = slice(None)
) -> tuple[list[float], list[float]]:
    """(seam jumps, within-chunk steps) of the largest ``joints`` change of the policy's targets.

    picks[i] = (chunk index, action index) of tick i, chunk -1 for a held tick; targets[i] = what the
    policy asked for at tick i. A seam is the first tick of a new chunk against the last target sent
    from a chunk (held ticks in between keep that target); a within-chunk step is a tick against the
    tick before it from the same chunk.
    """
    seams: list[float] = []
    steps: list[float] = []
    last: tuple[int, int] | None = None  # (chunk, tick) of the last tick that sent from a chunk
    for i, (chunk, _) in enumerate(picks):
        if chunk < 0:
            continue
        if last is not None:
            jump = float(np.max(np.abs(np.asarray(targets[i])[joints] - np.asarray(targets[last[1]])[joints])))
            if chunk != last[0]:
                seams.append(jump)
            elif last[1] == i - 1:
                steps.append(jump)
        last = (chunk, i)
    return seams, steps
