"""Closed-loop success rate of a policy in the simulator, with optional mp4 videos (cameras beside
commanded vs actual joints, ``viz.episode_video``).

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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from molmoact2_edge.types import ActionChunk, Observation

if TYPE_CHECKING:
    from molmoact2_edge.viz.episode_video import EpisodeFrames

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
    on_episode: Callable[[int, EpisodeResult], None] | None = None,
    watch: Watcher | None = None,
) -> EvalResult:
    """Run ``episodes`` closed-loop episodes of ``task``; writes the first ``num_videos`` as mp4 to ``video_dir``.

    on_episode(k, result): called after each episode (live progress).
    watch: sees the run as telemetry-shaped records (``docs/telemetry.md``) on the sim's clock
    (seconds of simulated time, episodes back to back), plus ``observation`` records with the
    camera images: the rerun display of ``eval --display``.
    """
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import JOINT_NAMES, RenderConfig
    from molmoact2_edge.viz.episode_video import EpisodeFrames, write_episode_video

    result = EvalResult(task)
    with SimEnv(task, render=RenderConfig(width=image_size, height=image_size, depth=False)) as env:
        clock = _SimClock(env.control_hz, watch)
        clock.emit("start", control_hz=env.control_hz)
        for k in range(episodes):
            clock.emit("episode_start", episode=k, joint_names=list(JOINT_NAMES), task=env.instruction)
            frames = None
            if video_dir is not None and k < num_videos:
                lower, upper = env.scene.to_normalized(env.scene.joint_range.T)
                frames = EpisodeFrames(JOINT_NAMES, lower, upper, env.control_hz)
            result.episodes.append(_episode(env, policy, seed + k, frames, clock))
            if frames is not None and frames.frames:
                assert video_dir is not None
                path = (
                    video_dir
                    / f"{task}_seed{seed + k}_{'success' if result.episodes[-1].success else 'failure'}.mp4"
                )
                write_episode_video(frames, path)
                result.videos.append(str(path))
            log.info("episode %d (seed %d): %s", k, seed + k, result.episodes[-1])
            clock.emit("episode", episode=k, end="success" if result.episodes[-1].success else "duration")
            if on_episode is not None:
                on_episode(k, result.episodes[-1])
    return result


Watcher = Callable[[Mapping[str, Any]], None]


class _SimClock:
    """Simulated time across an evaluation, and the records ``watch`` sees on it."""

    def __init__(self, hz: float, watch: Watcher | None) -> None:
        self.hz, self.watch, self.steps = hz, watch, 0

    def emit(self, kind: str, **fields: Any) -> None:
        if self.watch is not None:
            self.watch({"type": kind, "t": self.steps / self.hz, **fields})


def _episode(env, policy: ChunkPolicy, seed: int, frames: EpisodeFrames | None, clock: _SimClock) -> EpisodeResult:  # type: ignore[no-untyped-def]
    obs = env.reset(seed)
    policy.reset()
    streak = steps = chunks = not_decoded = 0
    spent = 0.0
    while True:
        start = time.perf_counter()
        clock.emit("observation", images=obs.images)
        chunk = policy.act(obs, seed=seed * 1000 + chunks)
        spent += time.perf_counter() - start
        timings = {stage: seconds * 1e3 for stage, seconds in chunk.timings.items()}
        clock.emit("chunk", index=chunks, timings_ms=timings, info=chunk.info, actions=chunk.actions)
        chunks += 1
        not_decoded += chunk.info.get("decode_ok") is False
        for action in chunk.actions:
            if frames is not None:  # the sim executes actions as given: commanded = sent
                frames.add(np.concatenate([obs.images[c] for c in env.cameras], axis=1), obs.state, action, action)
            clock.emit("tick", tick=steps, state=obs.state, target=action, sent=action, held=False)
            obs, success, done = env.step(np.asarray(action, dtype=np.float64))
            steps += 1
            clock.steps += 1
            streak = streak + 1 if success else 0
            if done:
                success = streak >= env.task.hold_steps
                return EpisodeResult(seed, success, steps, chunks, spent / chunks, not_decoded)

