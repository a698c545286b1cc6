"""The runtime's commands through the real CLI group: doctor (and run/bench once a bundle exists)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from click.testing import CliRunner

from molmoact2_edge.cli.main import cli


def test_doctor_reports_backends_power_and_what_is_missing() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["inference"]["backends"]["onnxruntime"] is None
    assert "pip install" in report["inference"]["backends"]["tensorrt"]
    assert report["power"]["sampler"] == "unavailable" and "ina3221" in report["power"]["reason"]
    assert report["features"]["GPU inference (TensorRT)"]
    text = CliRunner().invoke(cli, ["doctor"])
    assert text.exit_code == 0 and "features:" in text.output and "onnxruntime" in text.output


def test_device_side_imports_without_torch() -> None:
    """runtimes, hardware and cli load (and doctor runs) with torch made unimportable, as on a JetPack without torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import importlib, pkgutil\n"
        "import molmoact2_edge.runtimes, molmoact2_edge.hardware, molmoact2_edge.cli\n"
        "for pkg in (molmoact2_edge.runtimes, molmoact2_edge.hardware, molmoact2_edge.cli):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.endswith('backends.torch'):  # the one module allowed to need torch\n"
        "            continue\n"
        "        importlib.import_module(m.name)\n"
        "from molmoact2_edge.cli.main import main\n"
        "main(['doctor'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in proc.stdout  # the torch backend is listed as unavailable, not crashing the report


# --- end to end on the tiny exported bundle (built once, cached: see tests/_runtime_bundle.py) ---------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from molmoact2_edge.runtimes.telemetry import read_jsonl  # noqa: E402
from tests._runtime_bundle import tiny_bundle  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_bundle()


@pytest.mark.slow
def test_run_cli_drives_the_simulated_so101_and_times_every_stage(tiny, tmp_path) -> None:
    _, _, bundle = tiny
    log = tmp_path / "run.jsonl"
    args = [
        "run",
        str(bundle),
        "--robot",
        "sim-so101",
        "--duration",
        "3",
        "--hz",
        "10",
        "--telemetry",
        str(log),
    ]
    args += ["--stall-timeout", "10"]  # the shared machine can starve inference for seconds
    args += ["--first-move-limit", "1"]  # a random policy's first target may be anywhere in the range
    args += ["--sim-task", "lift"]  # its first move may touch the cube (a touch success ends the episode at once)
    dataset = tmp_path / "recorded"
    result = CliRunner().invoke(
        cli, [*args, "--backend", "onnxruntime", "--sim-size", "64", "--record", str(dataset)]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 1 and info["total_frames"] >= 5
    assert "observation.images.front" in info["features"] and not (dataset / ".spool").exists()
    assert "episode 0: duration" in result.output and "latency p50 ms" in result.output
    records = read_jsonl(log)
    types = [r["type"] for r in records]
    assert types[0] == "start" and types[-1] == "summary" and "safety" in types and "episode" in types
    chunks = [r for r in records if r["type"] == "chunk"]
    assert len(chunks) >= 2
    for chunk in chunks:
        assert all(chunk["timings_ms"][s] > 0 for s in ("vision", "prefill", "flow", "total"))
    summary = records[-1]
    assert summary["power"]["available"] is False and summary["power"]["reason"]
    assert summary["loop"]["ticks"] == info["total_frames"]  # one recorded frame per control tick
    assert summary["loop"]["ticks"] >= 5  # 30 at 10 Hz for 3 s, fewer when overloaded ticks are skipped


@pytest.mark.slow
def test_commands_reach_the_emulated_servos_within_the_safety_limits(tiny) -> None:
    from molmoact2_edge.cli.run import EpisodeTarget, RunSettings, run_policy
    from molmoact2_edge.sim.robot import make_sim_so101

    _, _, bundle = tiny
    handles = []

    def open_episode(i: int) -> EpisodeTarget:
        handle = make_sim_so101("lift", seed=i, size=64, control_hz=10)
        handles.append(handle)
        return EpisodeTarget(handle.robot, handle.success, handle.instruction, handle.close)

    settings = RunSettings(
        bundle, "sim-so101", None, "onnxruntime", duration_s=3.0, hz=10.0, stall_timeout_s=10.0,
        first_move_limit=1.0,  # a random policy's first target may be anywhere in the range
    )
    results, stats = run_policy(settings, open_episode)
    assert results[0]["end"] == "duration" and stats["chunks"] >= 2
    sim = handles[0].sim
    goals: dict[int, list[int]] = {}
    for record in list(sim.emulator.write_log):
        if record.register == "Goal_Position":
            goals.setdefault(record.motor_id, []).append(record.value)
    assert sorted(goals) == [1, 2, 3, 4, 5, 6] and len(goals[1]) >= 10
    for name, cal in sim.calibration.items():
        values = goals[cal.id]
        assert cal.range_min <= min(values) and max(values) <= cal.range_max, name
        if name not in ("gripper", "wrist_roll"):
            # the robot's 10-degree default step per tick, in servo steps (+1 for rounding)
            assert np.max(np.abs(np.diff(values))) <= 10 * 4096 / 360 + 1, name


def test_a_refused_first_move_stops_the_run_or_fails_only_its_episode(tiny) -> None:
    from molmoact2_edge.cli.run import EpisodeTarget, RunSettings, run_policy
    from molmoact2_edge.errors import FirstMoveError
    from molmoact2_edge.sim.robot import make_sim_so101

    def open_episode(i: int) -> EpisodeTarget:
        handle = make_sim_so101("lift", seed=i, size=64, control_hz=10)
        return EpisodeTarget(handle.robot, handle.success, handle.instruction, handle.close)

    # a first move of at most 0.1 % of each joint's range: every first target is refused
    settings = RunSettings(tiny[2], "sim-so101", None, "onnxruntime", duration_s=1.0, episodes=2, hz=10.0, first_move_limit=0.001)
    with pytest.raises(FirstMoveError, match="not moved"):
        run_policy(settings, open_episode)  # a real robot: stop
    settings = dataclasses.replace(settings, refused_first_move="next")  # a success-rate benchmark: count and go on
    results, _ = run_policy(settings, open_episode)
    assert [(r["end"], r["success"], r["ticks"]) for r in results] == [("first_move_refused", False, 0)] * 2


@pytest.mark.slow
def test_bench_compares_backends_with_speedup_and_plots(tiny, tmp_path) -> None:
    _, _, bundle = tiny
    args = ["bench", str(bundle), "--backend", "onnxruntime", "--backend", "torch", "--iterations", "2"]
    args += ["--loop-seconds", "1", "--threads", "1", "--json", "--plots", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert set(report["backends"]) == {"onnxruntime", "torch"}
    assert report["backends"]["torch"]["speedup_vs_torch"] == 1.0
    assert report["backends"]["onnxruntime"]["speedup_vs_torch"] > 0
    assert report["backends"]["torch"]["speedup_vs_torch_paired"] == 1.0  # per-round ratios of torch to itself
    assert all(r["idle_cpu_ms"] is not None and r["idle_cpu_ms"] >= 0 for r in report["backends"].values())
    for stage in ("vision", "prefill", "flow", "total"):
        assert report["backends"]["onnxruntime"]["stages_ms"][stage]["count"] == 2
    assert report["loop"]["loop"]["ticks"] > 0 and report["power"]["available"] is False
    assert (tmp_path / "latency_per_stage.png").stat().st_size > 0 and (
        tmp_path / "loop_jitter.png"
    ).is_file()


@pytest.mark.slow
def test_demo_runs_a_checkpoint_on_the_simulated_so101(tiny, tmp_path) -> None:
    root, ckpt, _ = tiny
    args = ["demo", "--checkpoint", str(ckpt), "--cache", str(root), "--episodes", "1", "--duration", "2"]
    args += ["--first-move-limit", "1"]  # the tiny checkpoint's policy is random
    args += ["--task", "lift"]  # on touch its first move may touch the cube and end the episode before a chunk
    result = CliRunner().invoke(cli, [*args, "--size", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "success: 0/1 episodes" in result.output or "success: 1/1 episodes" in result.output
    assert "latency p50 ms" in result.output and "power: unavailable" in result.output
    assert "control rate 10 Hz (the bundle's robot contract)" in result.output  # not a flag's default
    assert (tmp_path / "plots" / "latency_per_stage.png").is_file()
    assert any(r["type"] == "chunk" for r in read_jsonl(tmp_path / "telemetry.jsonl"))


def test_run_refuses_a_task_longer_than_the_bucket_before_the_robot_moves(tiny, tmp_path) -> None:
    """The bucket is tight (export picks the smallest that fits): a longer task is refused before any tick."""
    _, _, bundle = tiny
    log = tmp_path / "run.jsonl"
    task = "pick up the cube " * 40
    args = ["run", str(bundle), "--robot", "sim-so101", "--duration", "1", "--task", task, "--telemetry", str(log)]
    result = CliRunner().invoke(cli, [*args, "--backend", "onnxruntime", "--sim-size", "64"])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and "--bucket" in result.output, result.output
    assert not log.exists() or not [r for r in read_jsonl(log) if r["type"] == "chunk"]  # nothing ran


def test_demo_runs_so101_touch_when_it_is_there(tmp_path) -> None:
    from molmoact2_edge.cli.demo import DEFAULT_CHECKPOINT, bundled_checkpoint

    for name in ("a-first", DEFAULT_CHECKPOINT):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert bundled_checkpoint(tmp_path) == tmp_path / DEFAULT_CHECKPOINT
    (tmp_path / DEFAULT_CHECKPOINT / "config.json").unlink()
    assert bundled_checkpoint(tmp_path) == tmp_path / "a-first"  # otherwise the first checkpoint there


def test_bundle_cache_keeps_differently_calibrated_int8_bundles_apart(tmp_path) -> None:
    from molmoact2_edge.cli.demo import _variant
    from molmoact2_edge.export.pipeline import ExportOptions

    assert _variant(None) == _variant(ExportOptions(precision="fp32")) == ""  # the demo's own names stay
    sim, demos = (ExportOptions(precision="int8", calib=tmp_path / name) for name in ("sim.npz", "touch400"))
    assert _variant(sim) != _variant(demos) and _variant(sim).startswith("-")
    assert _variant(ExportOptions(cameras=("front",))) != _variant(ExportOptions(cameras=("front", "wrist")))
