"""Per-tick telemetry through the real safety layer: schema round trip, report, progress lines, episode video."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from molmoact2_edge.errors import DatasetError
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
from molmoact2_edge.runtimes.control import LoopConfig, run_episode
from molmoact2_edge.runtimes.telemetry import Telemetry
from molmoact2_edge.runtimes.telemetry_schema import SCHEMA_VERSION, load_telemetry
from molmoact2_edge.types import ActionChunk, Observation
from molmoact2_edge.viz.progress import RunProgress
from tests._hardware_helpers import emulated_so101

HZ = 30.0
LENGTH = 8


class JumpyPolicy:
    """Chunks that ramp joint 0 by 3 degrees per action (over the 2-degree step limit) and push joint 1 past
    its upper limit; the first chunk is slow, so the loop holds before it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, obs: Observation) -> ActionChunk:
        import time

        time.sleep(0.12 if self.calls == 0 else 0.02)
        actions = np.repeat(obs.state[None].astype(np.float64), LENGTH, axis=0)
        actions[:, 0] += 3.0 * np.arange(1, LENGTH + 1)
        actions[:, 1] = 500.0  # far past the joint's range
        self.calls += 1
        return ActionChunk(
            actions=actions.astype(np.float32),
            timestamp=obs.timestamp,
            timings={"vision": 0.005, "flow": 0.01, "total": 0.02},
            info={"depth_cells_repredicted": 3},
        )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One 1.2 s episode on an emulated SO-101 behind the real safety layer, recorded to JSONL."""
    path = tmp_path_factory.mktemp("telemetry") / "run.jsonl"
    seen: list[dict] = []
    with emulated_so101() as (robot, _):
        robot.connect()
        telemetry = Telemetry(path, control_hz=HZ, meta={"robot": "so101"}, observers=[seen.append])
        telemetry.begin_episode(0, joint_names=list(robot.joint_names), task="t")
        config = SafetyConfig(max_step=2.0, watchdog_thread=False, handle_signals=False, fault_check_every=0)
        with SafetyLayer(robot, config) as layer:
            result = run_episode(JumpyPolicy(), layer, LoopConfig(task="t", hz=HZ, duration_s=1.2), telemetry)
            lower, upper = layer.lower.copy(), layer.upper.copy()
        telemetry.write({"type": "episode", "episode": 0, "end": result.end, "ticks": result.ticks})
        telemetry.close()
        robot.disconnect()
    return path, result, seen, (lower, upper)


def test_schema_round_trip_gives_per_tick_arrays(recorded) -> None:
    path, result, seen, (lower, upper) = recorded
    log = load_telemetry(path)
    assert log.version == SCHEMA_VERSION and log.hz == HZ
    assert log.joint_names[0] == "shoulder_pan" and len(log.joint_names) == 6
    ticks = log.ticks
    n = result.ticks
    assert ticks["sent"].shape == ticks["target"].shape == ticks["state"].shape == (n, 6)
    assert ticks["held"].sum() == result.held_ticks > 0
    np.testing.assert_allclose(ticks["sent"], np.stack(result.sent), atol=1e-3)  # what the loop sent, per tick
    # held ticks: no target, rule "hold"; every other tick had a rule fire (joint 1 is always out of range)
    assert set(ticks["rule"][ticks["held"]]) == {"hold"} and np.isnan(ticks["target"][ticks["held"]]).all()
    moving = ~ticks["held"]
    assert set(ticks["rule"][moving]) <= {"limit", "limit+max_step"} and "limit+max_step" in set(ticks["rule"])
    # the clip is sent - target, and joint 1 was clipped to the envelope
    np.testing.assert_allclose(ticks["clip"][moving], ticks["sent"][moving] - ticks["target"][moving], atol=2e-4)
    assert np.all(ticks["sent"][moving, 1] <= upper[1] + 1e-3)
    # the target of each tick is the chunk's action at the recorded index
    chunks = log.chunks
    assert (ticks["chunk_row"][moving] >= 0).all() and (ticks["chunk_row"][ticks["held"]][:1] == -1).all()
    for row in np.flatnonzero(moving)[:10]:
        actions = chunks["actions"][int(ticks["chunk_row"][row])]
        np.testing.assert_allclose(ticks["target"][row], actions[int(ticks["action"][row])], atol=1e-3)
    assert np.isfinite(ticks["state"][moving]).all() and np.nanmax(ticks["state_age_ms"]) < 1000
    assert len(log.swaps["delay_ms"]) == result.chunks and np.all(log.swaps["delay_ms"] > 0)
    assert chunks["timings_ms"]["flow"][0] == pytest.approx(10.0) and chunks["depth_cells_repredicted"][0] == 3
    # observers saw exactly what the file holds
    assert [r["type"] for r in seen] == [json.loads(line)["type"] for line in path.read_text().splitlines()]


def test_loader_refuses_newer_schemas_and_other_files(tmp_path) -> None:
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"type": "start", "schema": SCHEMA_VERSION + 1, "t": 0}) + "\n")
    with pytest.raises(DatasetError, match="newer"):
        load_telemetry(newer)
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n')
    with pytest.raises(DatasetError, match="start"):
        load_telemetry(other)


def test_report_writes_pngs_and_a_page(recorded, tmp_path) -> None:
    from click.testing import CliRunner

    from molmoact2_edge.cli.main import cli

    path, *_ = recorded
    result = CliRunner().invoke(cli, ["report", str(path), "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["index.html", "joints.png", "latency.png", "loop_period_error.png"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "max_step" in page and 'src="joints.png"' in page and "not measured" in page
    for png in (tmp_path / "r").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_progress_is_line_based_without_a_terminal(recorded) -> None:
    path, result, seen, _ = recorded
    out = io.StringIO()
    progress = RunProgress(1, console=Console(file=out, force_terminal=False, width=200), every_s=0.5)
    for record in seen:
        progress(record)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no redraws, no colour codes
    assert 1 <= len(lines) <= 4  # one line when the first tick arrives, then at most every 0.5 s, then the end
    assert lines[-1].startswith("episode 0 [1/1] | tick ") and "ended: duration" in lines[-1]
    assert f"held {result.held_ticks}" in lines[-1]


def test_episode_video_shows_camera_beside_joints(tmp_path) -> None:
    av = pytest.importorskip("av")
    from molmoact2_edge.viz.episode_video import EpisodeFrames, write_episode_video

    rng = np.random.default_rng(0)
    data = EpisodeFrames(["a", "b"], np.array([-10.0, 0.0]), np.array([10.0, 100.0]), fps=10)
    for k in range(12):
        frame = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        data.add(frame, [k - 6, 50], [k - 5, 120], [k - 5, 100], "limit" if k % 3 == 0 else None)
    path = write_episode_video(data, tmp_path / "episode.mp4")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (360, 720, 3)  # camera scaled to 360 px + a 360 px panel


def test_step_progress_prints_its_last_state_at_close_without_a_terminal() -> None:
    from molmoact2_edge.viz.progress import StepProgress

    out = io.StringIO()
    progress = StepProgress("train stage 1: step", 100, console=Console(file=out, force_terminal=False), every_s=60)
    for _ in range(50):
        progress.set_postfix({"loss": "0.5"})
        progress.update(1)
    progress.close()
    assert out.getvalue().splitlines() == ["train stage 1: step 1/100 | loss 0.5", "train stage 1: step 50/100 | loss 0.5"]
