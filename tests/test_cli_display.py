"""``run --save-rrd`` on the simulated SO-101: a rerun recording that rerun-sdk reads back with every entity."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("mujoco")
rerun_chunk = pytest.importorskip("rerun.chunk")

from click.testing import CliRunner  # noqa: E402

from molmoact2_edge.cli.main import cli  # noqa: E402
from molmoact2_edge.runtimes.telemetry_schema import load_telemetry  # noqa: E402
from tests._runtime_bundle import tiny_bundle  # noqa: E402


@pytest.mark.slow
def test_run_save_rrd_records_cameras_joints_chunks_and_latency(tmp_path) -> None:
    _, _, bundle = tiny_bundle()
    rrd, log = tmp_path / "run.rrd", tmp_path / "run.jsonl"
    args = ["run", str(bundle), "--robot", "sim-so101", "--duration", "4", "--hz", "3", "--sim-size", "64"]
    # 3 Hz (against the contract's rate, hence the override): a chunk of the tiny bundle spans 2 s, so actions
    # are still due after a slow act() on a busy machine; the random policy's first target is far, hence the limit
    args += ["--override-contract", "--first-move-limit", "1"]
    args += ["--sim-task", "lift"]  # on touch the random policy's first move may touch the cube and end the episode
    args += ["--backend", "onnxruntime", "--stall-timeout", "10", "--telemetry", str(log), "--save-rrd", str(rrd)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"rerun recording: {rrd}" in result.output

    entities = {chunk.entity_path for chunk in rerun_chunk.RrdReader(rrd).stream().to_chunks()}
    telemetry = load_telemetry(log)
    joints = telemetry.joint_names
    expected = {"/camera/front", "/camera/wrist", "/chunk/trajectory", "/chunk/index", "/latency/total"}
    expected |= {"/latency/vision", "/latency/prefill", "/latency/flow", "/loop/period_error_ms"}
    expected |= {f"/joints/{name}/{field}" for name in joints for field in ("state", "target", "sent")}
    assert expected <= entities, sorted(expected - entities)
    # the telemetry of the same run has a record per tick with what was sent
    assert len(telemetry.ticks["sent"]) >= 5 and telemetry.ticks["sent"].shape[1] == len(joints) == 6


def test_rerun_is_not_imported_unless_asked() -> None:
    code = (
        "import sys; from molmoact2_edge.cli import run, demo, eval, report; "
        "import molmoact2_edge.runtimes.control, molmoact2_edge.runtimes.telemetry; "
        "assert 'rerun' not in sys.modules, 'rerun imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_display_marks_repredicted_depth_cells_on_the_camera(tmp_path) -> None:
    import numpy as np

    from molmoact2_edge.depth_cache import DepthCache
    from molmoact2_edge.types import Observation
    from molmoact2_edge.viz.rerun_display import RerunDisplay

    cache = DepthCache(grid=10)
    image = np.zeros((64, 64, 3), np.uint8)
    cells, _, changed = cache.plan("front", image)
    cache.update("front", cells, np.arange(100), changed)
    moved = image.copy()
    moved[:6, :6] = 255  # only the top-left cell changes
    cells, _, changed = cache.plan("front", moved)
    cache.update("front", cells, np.arange(100), changed)
    info = cache.last_info()
    assert info["depth_repredicted"] == [0] and info["depth_camera"] == "front" and info["depth_grid"] == 10

    rrd = tmp_path / "depth.rrd"
    display = RerunDisplay.open(None, rrd)
    display({"type": "start", "t": 0.0, "control_hz": 10})
    display.observation(Observation({"front": moved}, np.zeros(6, np.float32), "t", timestamp=0.1))
    display({"type": "chunk", "index": 0, "t": 0.2, "timings_ms": {"depth": 4.0}, "info": info})
    display.close()
    chunks = rerun_chunk.RrdReader(rrd).stream().to_chunks()
    boxes = [c for c in chunks if c.entity_path == "/camera/front/depth_repredicted"]
    assert boxes and {"/depth/grid", "/latency/depth"} <= {c.entity_path for c in chunks}
    batch = boxes[0].to_record_batch()
    # one box on cell 0 of a 10 x 10 grid over the 64 px image: centre (3.2, 3.2), half size 3.2
    np.testing.assert_allclose(batch.column("Boxes2D:centers").to_pylist(), [[[3.2, 3.2]]], atol=1e-5)
    np.testing.assert_allclose(batch.column("Boxes2D:half_sizes").to_pylist(), [[[3.2, 3.2]]], atol=1e-5)
