"""``eval`` tells decode failures from task failures; the demo's Wilson interval; ``--hold-past-end`` data.

The policies here are scripted (hold the arm where it is), so the episodes fail for a known reason:
one claims every chunk decoded, the other that none did (what the discrete head reports when its
OpenFAST tokens do not form a chunk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molmoact2_edge.cli.demo import measured_rate, wilson_interval
from molmoact2_edge.training.evaluation import evaluate
from molmoact2_edge.types import ActionChunk, Observation


class HoldStill:
    """Returns a chunk that keeps the arm at its current joint state."""

    def __init__(self, decode_ok: bool) -> None:
        self.decode_ok = decode_ok

    def act(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        actions = np.repeat(observation.state[None].astype(np.float32), 5, axis=0)
        return ActionChunk(actions, observation.timestamp, info={"decode_ok": self.decode_ok})

    def reset(self) -> None:
        pass


@pytest.mark.parametrize(("decode_ok", "kind"), [(True, "task"), (False, "decode")])
def test_eval_counts_decode_failures_apart_from_task_failures(decode_ok: bool, kind: str) -> None:
    summary = evaluate(HoldStill(decode_ok), "touch", 1, image_size=64).to_dict()
    assert summary["successes"] == 0
    assert summary["task_failures"] == (1 if kind == "task" else 0)
    assert summary["decode_failures"] == (1 if kind == "decode" else 0)
    chunks = summary["per_episode"][0]["chunks"]  # type: ignore[index]
    assert summary["chunks_not_decoded"] == (0 if decode_ok else chunks) and chunks == 12  # 60 steps / 5


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson_interval(40, 50)
    assert (round(low, 3), round(high, 3)) == (0.670, 0.888)
    assert wilson_interval(0, 50)[0] == 0.0 and round(wilson_interval(0, 50)[1], 3) == 0.071
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0) and wilson_interval(0, 0) == (0.0, 1.0)


def test_demo_prints_the_recorded_rate_of_its_precision_and_task(tmp_path: Path) -> None:
    (tmp_path / "eval_demo_fp32.json").write_text(
        '{"task": "touch", "seed": 100000, "episodes": 50, "successes": 42}'
    )
    line = measured_rate(tmp_path, "touch", "fp32")
    assert line is not None and "42/50 (84 %" in line and "100000-100049" in line
    assert measured_rate(tmp_path, "lift", "fp32") is None
    assert measured_rate(tmp_path, "touch", "int8") is None


def test_hold_past_end_trains_the_chunk_tail(tmp_path: Path) -> None:
    from molmoact2_edge.config import get_preset
    from molmoact2_edge.sim.record import record_demos
    from molmoact2_edge.training.setup import read_dataset
    from molmoact2_edge.training.trainer import TrainConfig

    data = tmp_path / "touch"
    record_demos(data, ["touch"], 2, seed=0, size=64, codec="libx264")
    config = get_preset("tiny")
    masked, _, _ = read_dataset(TrainConfig(data=str(data), out="", action_horizon=8), config)
    held, _, _ = read_dataset(
        TrainConfig(data=str(data), out="", action_horizon=8, hold_past_end=True), config
    )
    assert not masked.chunk_valid.all() and held.chunk_valid.all()
    # the tail repeats the episode's last action: exactly what "hold still" means
    last = masked.chunks[-1]
    assert np.array_equal(last, np.repeat(last[:1], len(last), axis=0))
    assert np.array_equal(masked.chunks, held.chunks)
