"""Closed-loop success rate of a policy in the simulator, with optional mp4 videos.

Protocol: episode k resets ``SimEnv(task)`` with seed ``seed + k`` (use seeds the training
demos did not: ``molmo-edge sim record`` counts up from its --seed), then repeatedly asks the
policy for a chunk and executes its ``n_action_steps`` actions open loop, one per control
step, until the task's success signal holds for ``hold_steps`` steps (success) or the
episode cap (failure). A failed episode in which any discrete chunk failed to decode
(``info["decode_ok"] is False``: the policy then returned zeros) counts as a *decode*
failure, the others as *task* failures, so a head that cannot write a chunk is not
mistaken for one that writes wrong chunks. The flow noise of chunk j in episode k is seeded ``(seed + k) * 1000 + j``
so a run is reproducible.

``policy`` is anything with ``act(observation, seed=...) -> ActionChunk`` and ``reset()``:
the PyTorch ``model.policy.Policy`` for a checkpoint, or ``runtimes.session.PolicySession``
for an exported bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)


class ChunkPolicy(Protocol):
    def act(self, observation: Observation, seed: int | None = None) -> ActionChunk: ...

    def reset(self) -> None: ...


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    chunks: int
    seconds_per_chunk: float
    decode_failures: int = 0  # chunks whose discrete tokens did not decode (the policy returned zeros)

    @property
    def failure(self) -> str | None:
        """None on success, else ``decode`` (some chunk failed to decode) or ``task``."""
        if self.success:
            return None
        return "decode" if self.decode_failures else "task"


@dataclass
class EvalResult:
    task: str
    episodes: list[EpisodeResult] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.episodes) / max(1, len(self.episodes))

    def to_dict(self) -> dict[str, object]:
        failures = [e.failure for e in self.episodes]
        return {
            "task": self.task,
            "episodes": len(self.episodes),
            "successes": sum(e.success for e in self.episodes),
            "success_rate": self.success_rate,
            "task_failures": failures.count("task"),
            "decode_failures": failures.count("decode"),
            "chunks_not_decoded": sum(e.decode_failures for e in self.episodes),
            "mean_steps": float(np.mean([e.steps for e in self.episodes])) if self.episodes else 0.0,
            "mean_seconds_per_chunk": float(np.mean([e.seconds_per_chunk for e in self.episodes]))
            if self.episodes
            else 0.0,
            "videos": self.videos,
            "per_episode": [asdict(e) for e in self.episodes],
        }


def evaluate(
    policy: ChunkPolicy,
    task: str,
    episodes: int,
    *,
    seed: int = 100_000,
    image_size: int = 112,
    video_dir: Path | None = None,
    num_videos: int = 3,
) -> EvalResult:
    """Run ``episodes`` closed-loop episodes of ``task``; writes the first ``num_videos`` as mp4 to ``video_dir``."""
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    result = EvalResult(task)
    with SimEnv(task, render=RenderConfig(width=image_size, height=image_size, depth=False)) as env:
        for k in range(episodes):
            frames: list[np.ndarray] | None = [] if video_dir is not None and k < num_videos else None
            result.episodes.append(_episode(env, policy, seed + k, frames))
            if frames:
                assert video_dir is not None
                path = (
                    video_dir
                    / f"{task}_seed{seed + k}_{'success' if result.episodes[-1].success else 'failure'}.mp4"
                )
                _write_video(path, frames, int(env.control_hz))
                result.videos.append(str(path))
            log.info("episode %d (seed %d): %s", k, seed + k, result.episodes[-1])
    return result


def _episode(env, policy: ChunkPolicy, seed: int, frames: list[np.ndarray] | None) -> EpisodeResult:  # type: ignore[no-untyped-def]
    obs = env.reset(seed)
    policy.reset()
    streak = steps = chunks = not_decoded = 0
    spent = 0.0
    while True:
        start = time.perf_counter()
        chunk = policy.act(obs, seed=seed * 1000 + chunks)
        spent += time.perf_counter() - start
        chunks += 1
        not_decoded += chunk.info.get("decode_ok") is False
        for action in chunk.actions:
            if frames is not None:
                frames.append(np.concatenate([obs.images[c] for c in env.cameras], axis=1))
            obs, success, done = env.step(np.asarray(action, dtype=np.float64))
            steps += 1
            streak = streak + 1 if success else 0
            if done:
                success = streak >= env.task.hold_steps
                return EpisodeResult(seed, success, steps, chunks, spent / chunks, not_decoded)


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    from molmoact2_edge.data.video import VideoEncoder

    h, w = frames[0].shape[:2]
    encoder = VideoEncoder(path, fps=fps, width=w, height=h, codec="libx264", crf=23)
    try:
        for frame in frames:
            encoder.add(frame)
    finally:
        encoder.close()
