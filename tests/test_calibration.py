"""LeRobot calibration files, normalization modes, the SO100_101 joint frame and the procedure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from molmoact2_edge.errors import CalibrationError
from molmoact2_edge.hardware.calibration import (
    SO100_101_LEGACY_FRAME,
    MotorCalibration,
    NormMode,
    calibration_json,
    default_calibration_path,
    half_turn_homing_offsets,
    load_calibration,
    normalize,
    save_calibration,
    unnormalize,
)

GOLDEN = Path(__file__).parent / "fixtures" / "lerobot_so101_follower_calibration.json"
JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


def test_golden_file_loads_and_saves_byte_identical(tmp_path) -> None:
    cal = load_calibration(GOLDEN, JOINTS)
    assert cal["shoulder_pan"] == MotorCalibration(
        id=1, drive_mode=0, homing_offset=458, range_min=684, range_max=3294
    )
    assert list(cal) == list(JOINTS)
    out = save_calibration(cal, tmp_path / "robots" / "so_follower" / "follower.json")
    assert out.read_bytes() == GOLDEN.read_bytes()
    assert calibration_json(cal) == GOLDEN.read_text()
    # same keys and int types as LeRobot's draccus dump
    entry = json.loads(out.read_text())["gripper"]
    assert list(entry) == ["id", "drive_mode", "homing_offset", "range_min", "range_max"]
    assert all(type(v) is int for v in entry.values())


def test_calibration_location_follows_lerobot(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("HF_LEROBOT_CALIBRATION", raising=False)
    monkeypatch.delenv("HF_LEROBOT_HOME", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    path = default_calibration_path("so_follower", "arm1", ("so101_follower",))
    assert path == tmp_path / "lerobot" / "calibration" / "robots" / "so_follower" / "arm1.json"
    legacy = tmp_path / "lerobot" / "calibration" / "robots" / "so101_follower" / "arm1.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("{}")
    assert default_calibration_path("so_follower", "arm1", ("so101_follower",)) == legacy
    monkeypatch.setenv("HF_LEROBOT_CALIBRATION", str(tmp_path / "cal"))
    assert (
        default_calibration_path("so_follower", "x") == tmp_path / "cal" / "robots" / "so_follower" / "x.json"
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not valid JSON"),
        ('{"shoulder_pan": {"id": 1}}', "must have keys"),
        (
            '{"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": 0.5, "range_min": 1, "range_max": 2}}',
            "must be integers",
        ),
        (
            '{"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": 0, "range_min": 9, "range_max": 2}}',
            "range_min 9 >= range_max 2",
        ),
    ],
    ids=["bad-json", "missing-keys", "float", "empty-range"],
)
def test_bad_files_name_the_problem(tmp_path, content: str, match: str) -> None:
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_calibration(path)


def test_missing_file_and_missing_motor() -> None:
    with pytest.raises(CalibrationError, match="molmo-edge calibrate"):
        load_calibration("/nonexistent/cal.json")
    with pytest.raises(CalibrationError, match="lacks motors"):
        load_calibration(GOLDEN, (*JOINTS, "extra"))


def test_normalization_values_match_lerobot_formulas() -> None:
    cal = MotorCalibration(1, 0, 0, 684, 3294)
    mid = (684 + 3294) / 2
    assert normalize(3000, cal, NormMode.DEGREES) == pytest.approx((3000 - mid) * 360 / 4095)
    assert normalize(5000, cal, NormMode.DEGREES) == pytest.approx(
        (5000 - mid) * 360 / 4095
    )  # DEGREES does not clamp
    assert normalize(684, cal, NormMode.RANGE_M100_100) == -100.0
    assert normalize(0, cal, NormMode.RANGE_0_100) == 0.0  # RANGE modes clamp
    flipped = MotorCalibration(1, 1, 0, 684, 3294)
    assert normalize(684, flipped, NormMode.RANGE_M100_100) == 100.0
    assert normalize(684, flipped, NormMode.RANGE_0_100) == 100.0
    assert unnormalize(150.0, cal, NormMode.RANGE_0_100) == 3294


calibrations = st.builds(
    lambda lo, width, drive: MotorCalibration(1, drive, 0, lo, lo + width),
    st.integers(0, 3000),
    st.integers(10, 1095),
    st.integers(0, 1),
)


@given(cal=calibrations, mode=st.sampled_from(list(NormMode)), data=st.data())
def test_steps_round_trip_exactly(cal: MotorCalibration, mode: NormMode, data) -> None:
    raw = data.draw(st.integers(cal.range_min, cal.range_max))
    assert unnormalize(normalize(raw, cal, mode), cal, mode) == raw


@given(cal=calibrations, mode=st.sampled_from(list(NormMode)), frac=st.floats(0, 1))
def test_values_round_trip_within_one_step(cal: MotorCalibration, mode: NormMode, frac: float) -> None:
    lo, hi = sorted((normalize(cal.range_min, cal, mode), normalize(cal.range_max, cal, mode)))
    value = lo + frac * (hi - lo)
    step = {NormMode.DEGREES: 360 / 4095, NormMode.RANGE_M100_100: 200, NormMode.RANGE_0_100: 100}[mode]
    step = step if mode is NormMode.DEGREES else step / (cal.range_max - cal.range_min)
    assert abs(normalize(unnormalize(value, cal, mode), cal, mode) - value) <= step / 2 + 1e-9


@given(st.lists(st.floats(-180, 180), min_size=6, max_size=6))
def test_legacy_joint_frame_round_trip(values: list[float]) -> None:
    robot = np.array(values, np.float32)
    policy = SO100_101_LEGACY_FRAME.to_policy(robot)
    # pre-0.5 LeRobot frame: shoulder_lift flipped and offset by 90, elbow offset by 90
    assert policy[1] == pytest.approx(-robot[1] + 90, abs=1e-4)
    assert policy[2] == pytest.approx(robot[2] + 90, abs=1e-4)
    np.testing.assert_allclose(SO100_101_LEGACY_FRAME.to_robot(policy), robot, atol=1e-4)


def test_half_turn_homing_offsets() -> None:
    offsets = half_turn_homing_offsets({"a": 2047, "b": 3000, "c": 0, "d": 4095})
    assert offsets == {"a": 0, "b": 953, "c": -2047, "d": 2047}  # d clamps to the 11-bit magnitude
    assert half_turn_homing_offsets({"a": 3000}, homing_sign=1, max_magnitude=None) == {"a": -953}
    with pytest.raises(CalibrationError, match="outside 0..4095"):
        half_turn_homing_offsets({"a": 5000})
