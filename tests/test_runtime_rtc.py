"""Control loop with real-time chunking: the committed prefix is what was actually sent while inference ran,
the delay comes from the measured swap, no prefix on the first chunk or after a stall; seam statistics."""

from __future__ import annotations

import time

import numpy as np

from molmoact2_edge.rtc import CommittedPrefix
from molmoact2_edge.runtimes.control import DryRunGate, LoopConfig, run_episode
from molmoact2_edge.runtimes.rtc import ChunkHandoff, seam_statistics
from molmoact2_edge.runtimes.telemetry import Telemetry, read_jsonl
from molmoact2_edge.types import ActionChunk, Observation

HZ = 20.0


class PrefixRecordingPolicy:
    """Chunks of distinct values (call c, action k -> 100 c + k), ``latency_s`` per call; keeps each prefix."""

    def __init__(self, latency_s: float, length: int = 12) -> None:
        self.latency_s, self.length = latency_s, length
        self.prefixes: list[CommittedPrefix | None] = []

    def __call__(self, observation: Observation, prefix: CommittedPrefix | None = None) -> ActionChunk:
        self.prefixes.append(prefix)
        time.sleep(self.latency_s)
        c = len(self.prefixes) - 1
        actions = np.stack([100.0 * c + np.arange(self.length)] * 2, axis=1).astype(np.float32)
        return ActionChunk(actions=actions, timestamp=observation.timestamp, timings={"total": self.latency_s})


class CountingGate(DryRunGate):
    """A dry-run gate that also notes how many ticks (sends and holds) had gone out when each observation was taken."""

    def __init__(self) -> None:
        super().__init__(lambda task: Observation(images={}, state=np.zeros(2, np.float32), task=task), state_dim=2)
        self.ticks = 0
        self.observed_after: list[int] = []

    def observe(self, task: str) -> Observation:
        self.observed_after.append(self.ticks)
        return super().observe(task)

    def send(self, target: np.ndarray) -> np.ndarray:
        self.ticks += 1
        return super().send(target)

    def hold(self) -> np.ndarray:
        self.ticks += 1
        return super().hold()


def test_committed_prefix_equals_what_was_sent_while_inference_ran(tmp_path) -> None:
    policy = PrefixRecordingPolicy(latency_s=0.12, length=20)  # ~2-3 ticks at 20 Hz
    gate = CountingGate()
    telemetry = Telemetry(tmp_path / "t.jsonl", control_hz=HZ)
    config = LoopConfig("t", hz=HZ, duration_s=2.5, swap_threshold=0.6, rtc=True)
    result = run_episode(policy, gate, config, telemetry)
    telemetry.close()
    assert policy.prefixes[0] is None  # the first chunk: nothing to continue
    assert result.chunks >= 4
    for c in range(1, result.chunks):
        prefix = policy.prefixes[c]
        assert prefix is not None
        swap_tick = next(i for i, (chunk, _) in enumerate(result.picks) if chunk == c)
        # from the tick the observation followed up to the swap, the robot executed the old chunk; each
        # target actually sent is the prefix row meant for its tick (a tick the loaded machine skipped
        # skips its row: rows are times, as the new chunk's are)
        window = range(gate.observed_after[c] - 1, swap_tick)
        assert all(result.picks[i][0] == c - 1 for i in window)
        first = result.picks[window[0]][1]
        for i in window:
            np.testing.assert_array_equal(prefix.actions[result.picks[i][1] - first], result.sent[i])
        # the delay is counted in ticks from the observation to the swap ...
        assert result.swaps[c]["delay_ticks"] == result.picks[swap_tick][1] >= len(window)
        assert result.swaps[c]["sent_during_inference"] == len(window) - 1
        if c >= 2:  # ... and the one measured at the previous swap is what the next request assumes
            assert prefix.delay == min(result.swaps[c - 1]["delay_ticks"], len(prefix.actions))
    swaps = [r for r in read_jsonl(tmp_path / "t.jsonl") if r["type"] == "swap"]
    assert len(swaps) == result.chunks and all("delay_ticks" in r and "seam_jump" in r for r in swaps)
    assert swaps[0]["rtc"] is False and swaps[-1]["rtc"] is True


def test_without_rtc_the_policy_gets_no_prefix() -> None:
    policy = PrefixRecordingPolicy(latency_s=0.03)
    result = run_episode(policy, CountingGate(), LoopConfig("t", hz=HZ, duration_s=0.8))
    assert result.chunks >= 2 and all(p is None for p in policy.prefixes)


def test_no_prefix_from_a_stale_chunk_or_while_holding() -> None:
    handoff = ChunkHandoff(hz=10.0, delay=3)
    chunk = ActionChunk(actions=np.arange(10, dtype=np.float32)[:, None], timestamp=100.0)
    assert handoff.request(None, 100.0, held=False) is None  # first chunk
    assert handoff.request(chunk, 101.0, held=False) is None  # all ten actions are in the past
    assert handoff.request(chunk, 100.2, held=True) is None  # the loop was stalled
    prefix = handoff.request(chunk, 100.2, held=False)
    assert prefix is not None and prefix.delay == 3 and prefix.actions[0, 0] == 2 and len(prefix.actions) == 8


def test_seam_statistics_split_swaps_from_steps_inside_a_chunk() -> None:
    picks = [(0, 0), (0, 1), (1, 2), (1, 3), (-1, -1), (2, 1), (2, 2)]
    targets = [np.array([0.0, 50.0]), np.array([1.0, 0.0]), np.array([5.0, 0.0]), np.array([5.5, 0.0]),
               np.array([5.5, 0.0]), np.array([9.0, 0.0]), np.array([9.25, 0.0])]  # fmt: skip
    seams, steps = seam_statistics(picks, targets, joints=slice(0, 1))
    # a seam across a held tick counts against the last target sent; the gripper column is left out
    assert seams == [4.0, 3.5] and steps == [1.0, 0.5, 0.25]


def test_eval_cli_reports_seam_statistics_under_injected_latency(tmp_path) -> None:
    """End to end through the CLI: a tiny checkpoint in the simulator, virtual clock, 150 ms injected."""
    import json

    from click.testing import CliRunner

    from molmoact2_edge.cli import main as cli_main
    from tests.test_export import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "tiny", flow_matching_num_steps=2)
    args = ["eval", str(ckpt), "--task", "touch", "--episodes", "1", "--inject-latency-ms", "150",
            "--rtc", "inference", "--clock", "virtual", "--threads", "1", "--json"]  # fmt: skip
    out = CliRunner().invoke(cli_main.cli, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{") :])
    assert report["rtc"] == "inference" and report["episodes"] == 1 and 0.0 <= report["success_rate"] <= 1.0
    assert report["seam_jump_p99_deg"] > 0 and report["within_chunk_step_p99_deg"] > 0
    assert report["safety_clips_per_episode"] >= 0 and report["delay_ticks"]["p50"] == 2  # floor(1.5) + 1 ticks
