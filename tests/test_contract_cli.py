"""The robot contract end to end through the CLI, as a user would meet it.

One LeRobot-written v3.0 dataset (pyarrow ``large_string`` columns, as LeRobot 0.4+ under
pandas 3 writes them; no joint frame in meta/info.json) recorded in the SO100_101 legacy
frame at 30 fps is trained on (`train --joint-frame so100_101_legacy`), exported with
`--calib` on the same dataset, inspected, then driven on an emulated SO-101:

- the contract travels train -> checkpoint -> export -> inspect;
- a flag that disagrees with it is refused, and a failed pre-flight sends not one byte;
- the legacy-frame bundle forced into the LeRobot frame with --override-contract stops at the
  first-move guard without moving the arm, while the bundle's own frame runs.

The trained checkpoint and its bundle are cached under ``.cache/molmo-edge/contract-<sources>``
(training plus export take minutes on the shared machine).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.data.reader import LeRobotDataset
from molmoact2_edge.hardware.calibration import save_calibration
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
from molmoact2_edge.runtimes.telemetry import read_jsonl
from tests import _lerobot_fixtures as fx
from tests._hardware_helpers import CALIBRATION
from tests._runtime_bundle import REPO, source_hash, tiny_bundle

pytestmark = pytest.mark.slow

# The emulated arm rests at 2048 steps; with CALIBRATION (range 1000-3000, offset 0) that reads
# 4.22 deg on the five arm joints and 52.4 on the gripper in the LeRobot frame. The same pose in
# the SO100_101 legacy frame (policy = sign * robot + offset; signs (1,-1,1,1,1,1), offsets 90 on
# shoulder_lift and elbow_flex): the dataset holds it, so the trained policy's targets sit there.
REST_DEG = 4.21875 + 0.0  # (2048 - 2000) * 360 / 4096
LEGACY_POSE = np.array([REST_DEG, 90 - REST_DEG, 90 + REST_DEG, REST_DEG, REST_DEG, 52.4], np.float32)


def _cli(args: list[str], **kw):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """dataset, checkpoint, bundle and the CLI outputs of train/export (cached across sessions)."""
    root = REPO / ".cache" / "molmo-edge" / f"contract-{source_hash()}"
    data, ckpt, bundle = root / "lerobot-large-string", root / "ckpt", root / "bundle"
    if not (data / "meta/info.json").is_file():
        fx.write_v30(data, large_strings=True, pose=LEGACY_POSE)
    if not (ckpt / "robot_contract.json").is_file():
        args = ["train", "--preset", "tiny", "--data", data, "--out", ckpt, "--steps", "2", "--batch-size", "4"]
        args += ["--action-horizon", "8", "--save-every", "1000", "--joint-frame", "so100_101_legacy", "--threads", "1"]
        result = _cli(args)
        assert result.exit_code == 0, result.output
    if not (bundle / "manifest.json").is_file():
        staging = root / "bundle.partial"
        result = _cli(["export", ckpt, "-o", staging, "--calib", data])
        assert result.exit_code == 0, result.output
        (root / "export.log").write_text(result.output)
        staging.rename(bundle)
    return {"data": data, "ckpt": ckpt, "bundle": bundle, "export_log": root / "export.log"}


def test_contract_round_trip_train_checkpoint_export_inspect(trained: dict[str, Path]) -> None:
    written = json.loads((trained["ckpt"] / "robot_contract.json").read_text())
    assert written["control_hz"] == 30.0 and written["joints"]["frame"] == "so100_101_legacy"  # info.json fps; the flag
    assert written["joints"]["names"][1] == "shoulder_lift" and written["provenance"] == "recorded"
    assert "ASSUMED" not in trained["export_log"].read_text()
    result = _cli(["inspect", trained["bundle"], "--json"])
    assert result.exit_code == 0, result.output
    contract = json.loads(result.output)["robot_contract"]
    assert {k: contract[k] for k in ("control_hz", "executed_steps", "provenance")} == {
        "control_hz": 30.0, "executed_steps": 8, "provenance": "recorded",
    }  # fmt: skip
    assert contract["joints"] == written["joints"] and contract["robot_kinds"] == ["so101", "sim-so101"]
    assert contract["cameras"] == [{"name": "front", "role": "scene", "image_size": [64, 64]}]
    text = _cli(["inspect", trained["bundle"]]).output
    assert "robot contract (recorded)" in text and "30 Hz" in text and "so100_101_legacy" in text


def test_lerobot_written_dataset_without_a_frame_is_asked_for_one(trained: dict[str, Path], tmp_path: Path) -> None:
    args = ["train", "--preset", "tiny", "--data", trained["data"], "--out", tmp_path / "c", "--steps", "1", "--action-horizon", "8"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1 and "--joint-frame" in result.output


@pytest.fixture
def calibration_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_LEROBOT_CALIBRATION with the emulated arm's calibration saved where `run` looks for it."""
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "calibration"))
    save_calibration(CALIBRATION, tmp_path / "calibration/robots/so_follower/follower.json")
    return tmp_path / "calibration"


@pytest.fixture
def front_video(tmp_path: Path) -> Path:
    path = tmp_path / "front.mp4"
    fx._encode(path, [fx.frame_image(0, k) for k in range(10)], "libx264")
    return path


def _bytes_on(master: int, wait_s: float = 0.3) -> bytes:
    got = b""
    while select.select([master], [], [], wait_s)[0]:
        chunk = os.read(master, 4096)
        if not chunk:
            break
        got += chunk
    return got


def test_disagreeing_flag_and_failed_preflight_send_not_one_byte(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master, slave = os.openpty()  # a raw pty: every byte a driver wrote would be readable here
    port = os.ttyname(slave)
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "no-calibration"))
    base = ["run", trained["bundle"], "--robot", "so101", "--port", port]
    flag = CliRunner().invoke(cli, [str(a) for a in [*base, "--hz", "10", "--task", "Grab the cube"]])
    assert flag.exit_code == 1, flag.output
    assert "--hz 10.0 disagrees with the bundle's robot contract (30.0" in flag.output and "--override-contract" in flag.output
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "old.parquet").write_text("an earlier recording")
    bad = [*base, "--camera", f"wrist={tmp_path / 'missing.mp4'}", "--record", tmp_path / "rec"]
    result = CliRunner().invoke(cli, [str(a) for a in bad])
    assert result.exit_code == 4, result.output
    for expected in ("pre-flight failed", "no calibration", "missing ['front']", "--record", "not empty", "no task"):
        assert expected in result.output, result.output
    assert _bytes_on(master) == b""  # not a single byte reached the bus
    assert (tmp_path / "rec" / "old.parquet").read_text() == "an earlier recording"
    os.close(master)
    os.close(slave)


def _goals(emulator: FeetechEmulator) -> dict[int, list[int]]:
    goals: dict[int, list[int]] = {}
    for record in list(emulator.write_log):
        if record.register == "Goal_Position":
            goals.setdefault(record.motor_id, []).append(record.value)
    return goals


def test_legacy_bundle_forced_into_the_lerobot_frame_stops_before_moving(
    trained: dict[str, Path], calibration_home: Path, front_video: Path, tmp_path: Path
) -> None:
    with FeetechEmulator(range(1, 7), seed=0) as emulator:
        emulator.set_present_positions(dict.fromkeys(range(1, 7), 2048))
        args = ["run", trained["bundle"], "--robot", "so101", "--port", emulator.port, "--camera", f"front={front_video}"]
        args += ["--task", "Grab the cube", "--duration", "20", "--stall-timeout", "20", "--backend", "onnxruntime"]
        forced = [*args, "--joint-frame", "lerobot", "--override-contract", "--telemetry", tmp_path / "forced.jsonl"]
        result = CliRunner().invoke(cli, [str(a) for a in forced])
        assert result.exit_code == 4, result.output
        assert "OVERRIDE: joint_frame lerobot instead of the policy's so100_101_legacy" in result.output
        assert "['shoulder_lift', 'elbow_flex']" in result.output and "joint frame" in result.output
        time.sleep(0.2)
        goals = _goals(emulator)
        assert all(set(v) == {2048} for v in goals.values()), goals  # only the rest pose was ever commanded
        start = read_jsonl(tmp_path / "forced.jsonl")[0]
        assert start["contract"]["overrides"]["joint_frame"] == {"contract": "so100_101_legacy", "used": "lerobot"}

        own = [*args[:-2], "--duration", "3", "--telemetry", tmp_path / "own.jsonl"]  # the bundle's frame and rate
        result = CliRunner().invoke(cli, [str(a) for a in own])
        assert result.exit_code == 0, result.output
        start = read_jsonl(tmp_path / "own.jsonl")[0]
        assert start["contract"] == {"hz": 30.0, "joint_frame": "so100_101_legacy", "overrides": {}}
        for motor, values in _goals(emulator).items():  # targets near the rest pose: the frames agree
            assert max(abs(v - 2048) for v in values) < 40, (motor, values)


def test_spool_of_a_killed_recording_is_recovered_never_deleted(tmp_path: Path) -> None:
    _, _, bundle = tiny_bundle()
    record = tmp_path / "rec"
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "molmoact2_edge.cli.main", "run", str(bundle), "--robot", "sim-so101"]
    args += ["--sim-size", "64", "--backend", "onnxruntime", "--stall-timeout", "30", "--duration", "120"]
    args += ["--first-move-limit", "1", "--sim-task", "lift"]  # random policy: its first move may touch the cube
    proc = subprocess.Popen([*args, "--record", str(record)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    spool = record / ".spool"
    deadline = time.monotonic() + 240
    try:
        while len(list(spool.glob("episode_*/part_*.npz"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the recording never spooled three parts"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # a real kill -9: no handler, no cleanup
        proc.wait()
    parts = sorted(spool.glob("episode_*/part_*.npz"))
    again = CliRunner().invoke(cli, ["run", str(bundle), "--robot", "sim-so101", "--record", str(record)])
    assert again.exit_code == 4 and "molmo-edge recover" in again.output, again.output
    assert sorted(spool.glob("episode_*/part_*.npz")) == parts  # nothing deleted
    spooled = 0
    for part in parts:
        with np.load(part) as arrays:
            spooled += len(arrays["task"])
    result = CliRunner().invoke(cli, ["recover", str(record)])
    assert result.exit_code == 0, result.output
    dataset = LeRobotDataset(record)
    assert len(dataset) == spooled >= 3 and dataset.fps == 10.0  # every spooled frame, at the bundle's rate
    assert dataset.info["joint_frame"] == "lerobot" and not spool.exists()
    sample = dataset.sample(0, 1)
    assert sample.images and sample.actions.shape[-1] == 6
