"""The robot contract: its JSON round trip, what training and export decide, how run resolves flags, pre-flight
checks and the first-move guard (fast; the end-to-end paths through the CLI are in test_contract_cli.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from molmoact2_edge.contract import (
    SO101_JOINTS,
    ContractFlags,
    RobotContract,
    dataset_contract,
    export_contract,
    release_contract,
)
from molmoact2_edge.errors import BundleError, ContractError, FirstMoveError, PreflightError
from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.first_move import FirstMoveGuard
from molmoact2_edge.runtimes.preflight import check_record_folder, preflight, resolve_run
from tests._hardware_helpers import emulated_so101, goal_writes
from tests._runtime_bundle import contract_of

CAMERAS = ("front", "wrist")


def test_contract_round_trips_through_json_and_refuses_malformed() -> None:
    contract = contract_of("so101", CAMERAS, 6).with_cameras(CAMERAS, (112, 112))
    again = RobotContract.from_dict(json.loads(json.dumps(contract.to_dict())))
    assert again == contract and again.cameras[1].role == "wrist" and again.cameras[0].image_size == (112, 112)
    bad = contract.to_dict()
    del bad["control_hz"]
    with pytest.raises(ContractError, match="malformed"):
        RobotContract.from_dict(bad, "server ws://x")
    bad = {**contract.to_dict(), "joints": {**contract.to_dict()["joints"], "frame": "upside_down"}}
    with pytest.raises(ContractError, match="joint_frame 'upside_down'"):
        RobotContract.from_dict(bad)


def test_dataset_contract_takes_fps_joints_and_frame_from_info_json() -> None:
    info = {
        "robot_type": "so101_follower",
        "fps": 15,
        "joint_frame": "lerobot",
        "features": {"action": {"names": [f"{j}.pos" for j in SO101_JOINTS]}},
    }
    c = dataset_contract(info, tag="t", executed_steps=5, cameras=CAMERAS, action="absolute joint pose")
    assert (c.control_hz, c.joint_frame, c.joint_names, c.robot_kinds) == (15.0, "lerobot", SO101_JOINTS, ("so101", "sim-so101"))
    assert c.units[-1] == "0-100" and c.provenance == "recorded"
    del info["joint_frame"]  # a LeRobot-written SO-101 dataset does not say its frame: asked, never guessed
    with pytest.raises(ContractError, match="--joint-frame"):
        dataset_contract(info, tag="t", executed_steps=5, cameras=CAMERAS, action="a")
    c = dataset_contract(info, tag="t", executed_steps=5, cameras=CAMERAS, action="a", joint_frame="so100_101_legacy")
    assert c.joint_frame == "so100_101_legacy"


def test_export_uses_release_conventions_for_a_known_tag_and_asks_otherwise() -> None:
    kw = dict(executed_steps=30, cameras=CAMERAS, image_size=(378, 378), action="absolute joint pose", joint_names=SO101_JOINTS, where="ckpt")
    release = export_contract(None, ContractFlags(), tag="so100_so101_molmoact2", **kw)  # type: ignore[arg-type]
    assert release.provenance == "release-conventions" and release.joint_frame == "so100_101_legacy"
    assert release.control_hz == 30.0 and "4223" in release.assumed["control_hz"]
    corrected = export_contract(None, ContractFlags(control_hz=10.0), tag="so100_so101_molmoact2", **kw)  # type: ignore[arg-type]
    assert corrected.control_hz == 10.0 and "control_hz" not in corrected.assumed
    with pytest.raises(ContractError, match="--control-hz --joint-frame --robot"):
        export_contract(None, ContractFlags(), tag="my_tag", **kw)  # type: ignore[arg-type]
    flagged = export_contract(None, ContractFlags(20.0, "lerobot", "so101"), tag="my_tag", **kw)  # type: ignore[arg-type]
    assert flagged.provenance == "flags" and flagged.robot_kinds == ("so101", "sim-so101")
    recorded = contract_of("so101", CAMERAS, 6)
    with pytest.raises(ContractError, match="contradict"):
        export_contract(recorded, ContractFlags(control_hz=30.0), tag="so101", **kw)  # type: ignore[arg-type]
    assert release_contract("unknown", 1, CAMERAS) is None


def test_run_takes_the_contract_and_refuses_a_disagreeing_flag_unless_overridden() -> None:
    contract = contract_of("so101", CAMERAS, 6, frame="so100_101_legacy", hz=10.0)
    choices = resolve_run(contract, "so101")
    assert (choices.hz, choices.joint_frame, choices.executed_steps, choices.cameras) == (10.0, "so100_101_legacy", 6, CAMERAS)
    assert resolve_run(contract, "so101", hz=10.0).overrides == {}  # agreeing flags are fine
    with pytest.raises(ContractError, match="--hz 30.0 disagrees .*--override-contract"):
        resolve_run(contract, "so101", hz=30.0)
    with pytest.raises(ContractError, match="--joint-frame lerobot disagrees"):
        resolve_run(contract, "so101", joint_frame="lerobot")
    forced = resolve_run(contract, "so101", hz=30.0, joint_frame="lerobot", override=True)
    assert forced.hz == 30.0 and forced.overrides == {
        "hz": {"contract": 10.0, "used": 30.0},
        "joint_frame": {"contract": "so100_101_legacy", "used": "lerobot"},
    }


def test_a_schema_1_bundle_is_refused_with_re_export_it(tmp_path: Path) -> None:
    (tmp_path / B.MANIFEST).write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(BundleError, match="re-export it"):
        B.Bundle.open(tmp_path)


def test_record_folder_must_be_new_writable_and_never_a_crashed_spool(tmp_path: Path) -> None:
    assert "new, writable" in check_record_folder(tmp_path / "new" / "rec")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(PreflightError, match="not empty"):
        check_record_folder(tmp_path / "full")
    (tmp_path / "crashed" / ".spool").mkdir(parents=True)
    with pytest.raises(PreflightError, match="molmo-edge recover"):
        check_record_folder(tmp_path / "crashed")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PreflightError, match="cannot write"):
            check_record_folder(locked / "rec")


def test_preflight_lists_every_failure_before_the_bus_opens(tmp_path: Path) -> None:
    contract = contract_of("so101", CAMERAS, 6)
    with emulated_so101() as (robot, emulator):
        robot.calibration = None
        with pytest.raises(PreflightError) as err:
            preflight(contract, "koch", robot, task="", port=str(tmp_path / "ttyNOPE"))
        text = str(err.value)
        for expected in ("drives ['so101', 'sim-so101']", "no calibration", "missing ['front', 'wrist']", "no task", "does not exist"):
            assert expected in text, text
        assert not robot.bus.is_connected and goal_writes(emulator) == []


def _started_layer(robot):  # type: ignore[no-untyped-def]
    robot.connect()
    layer = SafetyLayer(robot, SafetyConfig(watchdog_thread=False, handle_signals=False))
    layer.start()
    return layer


def test_first_move_far_target_stops_before_moving_and_names_the_joints() -> None:
    with emulated_so101() as (robot, emulator):
        layer = _started_layer(robot)
        start = layer.last_commanded.copy()
        guard = FirstMoveGuard(layer, 30.0, sleep=lambda s: None)
        target = start.copy()
        target[1] += 90.0  # the legacy-frame mistake on shoulder_lift and elbow_flex
        target[2] += 90.0
        with pytest.raises(FirstMoveError, match=r"\['shoulder_lift', 'elbow_flex'\].*not moved"):
            guard.approach(target)
        layer.close()
        goal_writes(emulator, at_least=6)
        per_motor: dict[int, set[int]] = {}
        for r in list(emulator.write_log):
            if r.register == "Goal_Position":
                per_motor.setdefault(r.motor_id, set()).add(r.value)
        assert len(per_motor) == 6 and all(len(v) == 1 for v in per_motor.values())  # only the start pose
        assert np.allclose(layer.last_commanded, start)
        robot.disconnect()


def test_first_move_near_target_is_approached_at_bounded_speed() -> None:
    with emulated_so101() as (robot, emulator):
        layer = _started_layer(robot)
        start = layer.last_commanded.copy()
        guard = FirstMoveGuard(layer, 30.0, sleep=lambda s: None)
        target = start.copy()
        target[0] += 20.0
        guard.approach(target)
        per_tick = float(guard.speed[0]) / 30.0
        assert guard.approach_ticks >= 20.0 / per_tick - 1  # a quarter of the rated speed: many small steps
        assert np.allclose(layer.last_commanded, target, atol=360 / 4096)  # one servo step
        layer.close()
        robot.disconnect()


def test_calibrate_with_an_unwritable_output_leaves_the_servos_untouched(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from molmoact2_edge.cli.main import cli
    from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the calibration folder should be")  # unwritable even for root
    with FeetechEmulator(range(1, 7), seed=0) as emulator:
        before = {i: emulator.get_register(i, "Homing_Offset") for i in range(1, 7)}
        args = ["calibrate", "so101", "--port", emulator.port, "--output", str(blocker / "follower.json")]
        result = CliRunner().invoke(cli, [*args, "--duration", "0.5"], input="\n")
        assert result.exit_code == 4, result.output
        assert "cannot write" in result.output and "nothing was sent to the servos" in result.output
        assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
        assert list(emulator.write_log) == []  # no register (EEPROM or RAM) was written
        assert {i: emulator.get_register(i, "Homing_Offset") for i in range(1, 7)} == before
