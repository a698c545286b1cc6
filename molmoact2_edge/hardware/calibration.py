"""LeRobot-compatible motor calibration: the JSON file, the normalization modes and the procedure.

A calibration file is what ``lerobot-calibrate`` writes and what an SO-101 owner already
has: one entry per motor name, all integers, in this key order (draccus dump of
``dict[str, MotorCalibration]``, 4-space indent, no trailing newline)::

    {
        "shoulder_pan": {
            "id": 1,
            "drive_mode": 0,
            "homing_offset": 458,
            "range_min": 684,
            "range_max": 3294
        },
        ...
    }

Normalization (LeRobot ``MotorsBus._normalize`` / ``_unnormalize``, ``res`` = resolution - 1):

- ``DEGREES``: ``(raw - (min + max) / 2) * 360 / res``, no clamping (the servo's EEPROM
  position limits clamp goals);
- ``RANGE_M100_100``: ``(clamp(raw) - min) / (max - min) * 200 - 100``, negated with drive_mode;
- ``RANGE_0_100``: ``(clamp(raw) - min) / (max - min) * 100``, ``100 - x`` with drive_mode (grippers).

Going back to steps rounds to the nearest step; LeRobot truncates with ``int()``, which can
land one step low after a float round trip (we want a hold command to equal the reading).

The procedure (``SOFollower.calibrate``) lives here as functions without terminal I/O:
``half_turn_homing_offsets`` from the middle pose, ``record_ranges`` while the user sweeps
each joint. ``molmo-edge calibrate`` adds the prompts.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from molmoact2_edge.errors import CalibrationError


class NormMode(str, enum.Enum):
    DEGREES = "degrees"
    RANGE_M100_100 = "range_m100_100"
    RANGE_0_100 = "range_0_100"


@dataclass(frozen=True)
class MotorCalibration:
    """One motor's entry of a LeRobot calibration file (field order = JSON key order)."""

    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int


# --- the file ----------------------------------------------------------------------------------


def lerobot_calibration_dir() -> Path:
    """``$HF_LEROBOT_CALIBRATION``, else ``$HF_LEROBOT_HOME/calibration``, else ``$HF_HOME/lerobot/calibration``."""
    if os.environ.get("HF_LEROBOT_CALIBRATION"):
        return Path(os.environ["HF_LEROBOT_CALIBRATION"]).expanduser()
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser() / "calibration"
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    return hf_home / "lerobot" / "calibration"


def default_calibration_path(robot_type: str, robot_id: str, legacy_types: tuple[str, ...] = ()) -> Path:
    """Where LeRobot keeps ``robots/<robot_type>/<id>.json``; an existing file under an older type
    name (``so101_follower`` before the ``so_follower`` rename) is returned when the new one is absent."""
    base = lerobot_calibration_dir() / "robots"
    path = base / robot_type / f"{robot_id}.json"
    if not path.exists():
        for legacy in legacy_types:
            old = base / legacy / f"{robot_id}.json"
            if old.exists():
                return old
    return path


def load_calibration(
    path: str | Path, motor_names: tuple[str, ...] | None = None
) -> dict[str, MotorCalibration]:
    """Read a LeRobot calibration JSON; with ``motor_names``, every motor must be present."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(
            f"no calibration file at {path}; run `molmo-edge calibrate` (or lerobot-calibrate) first"
        ) from None
    except json.JSONDecodeError as err:
        raise CalibrationError(f"calibration file {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CalibrationError(
            f"calibration file {path}: expected an object of motor entries, got {type(raw).__name__}"
        )
    fields = tuple(MotorCalibration.__dataclass_fields__)
    calibration: dict[str, MotorCalibration] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != set(fields):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise CalibrationError(
                f"calibration file {path}: motor '{name}' must have keys {list(fields)}, got {got}"
            )
        bad = [k for k in fields if not isinstance(entry[k], int) or isinstance(entry[k], bool)]
        if bad:
            raise CalibrationError(f"calibration file {path}: motor '{name}' fields {bad} must be integers")
        cal = MotorCalibration(**{k: entry[k] for k in fields})
        if cal.range_min >= cal.range_max:
            raise CalibrationError(
                f"calibration file {path}: motor '{name}' has range_min {cal.range_min} >= range_max {cal.range_max}; recalibrate"
            )
        calibration[name] = cal
    if motor_names is not None:
        missing = [n for n in motor_names if n not in calibration]
        if missing:
            raise CalibrationError(
                f"calibration file {path} lacks motors {missing} (has {sorted(calibration)})"
            )
    return calibration


def calibration_json(calibration: Mapping[str, MotorCalibration]) -> str:
    """The exact text LeRobot writes (draccus -> json.dump(indent=4), no trailing newline)."""
    return json.dumps({name: asdict(cal) for name, cal in calibration.items()}, indent=4)


def save_calibration(calibration: Mapping[str, MotorCalibration], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration_json(calibration))
    return path


# --- normalization -----------------------------------------------------------------------------


def normalize(
    raw: float,
    cal: MotorCalibration,
    mode: NormMode,
    resolution: int = 4096,
    *,
    apply_drive_mode: bool = True,
) -> float:
    """Servo steps -> normalized units (LeRobot ``_normalize``)."""
    lo, hi = cal.range_min, cal.range_max
    drive = apply_drive_mode and bool(cal.drive_mode)
    if mode is NormMode.DEGREES:
        return (raw - (lo + hi) / 2) * 360.0 / (resolution - 1)
    bounded = min(hi, max(lo, raw))
    if mode is NormMode.RANGE_M100_100:
        norm = (bounded - lo) / (hi - lo) * 200.0 - 100.0
        return -norm if drive else norm
    norm = (bounded - lo) / (hi - lo) * 100.0
    return 100.0 - norm if drive else norm


def unnormalize(
    value: float,
    cal: MotorCalibration,
    mode: NormMode,
    resolution: int = 4096,
    *,
    apply_drive_mode: bool = True,
) -> int:
    """Normalized units -> servo steps (LeRobot ``_unnormalize``, rounded instead of truncated)."""
    lo, hi = cal.range_min, cal.range_max
    drive = apply_drive_mode and bool(cal.drive_mode)
    if mode is NormMode.DEGREES:
        return round(value * (resolution - 1) / 360.0 + (lo + hi) / 2)
    if mode is NormMode.RANGE_M100_100:
        bounded = min(100.0, max(-100.0, -value if drive else value))
        return round((bounded + 100.0) / 200.0 * (hi - lo) + lo)
    bounded = min(100.0, max(0.0, 100.0 - value if drive else value))
    return round(bounded / 100.0 * (hi - lo) + lo)


def normalized_range(cal: MotorCalibration, mode: NormMode, resolution: int = 4096) -> tuple[float, float]:
    """The calibrated range in normalized units (lower < upper)."""
    a = normalize(cal.range_min, cal, mode, resolution)
    b = normalize(cal.range_max, cal, mode, resolution)
    return (min(a, b), max(a, b))


@dataclass(frozen=True)
class JointFrame:
    """An affine per-joint change of frame: ``policy = sign * robot + offset`` (degrees).

    The released MolmoAct2-SO100_101 norm stats were computed in LeRobot's pre-0.5 SO-101
    joint frame; with a LeRobot >= 0.5 calibration use ``SO100_101_LEGACY_FRAME`` (LeRobot
    ``molmoact2.mdx``: ``joint_signs=[1,-1,1,1,1,1]``, ``joint_offsets=[0,90,90,0,0,0]``).
    """

    signs: tuple[float, ...]
    offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.signs) != len(self.offsets) or any(s not in (1, -1) for s in self.signs):
            raise CalibrationError(
                f"JointFrame: signs must be +-1 and match offsets, got {self.signs} / {self.offsets}"
            )

    def to_policy(self, robot_values: np.ndarray) -> np.ndarray:
        return (
            np.asarray(self.signs, np.float32) * robot_values + np.asarray(self.offsets, np.float32)
        ).astype(np.float32)

    def to_robot(self, policy_values: np.ndarray) -> np.ndarray:
        return (
            (policy_values - np.asarray(self.offsets, np.float32)) * np.asarray(self.signs, np.float32)
        ).astype(np.float32)


SO100_101_LEGACY_FRAME = JointFrame(signs=(1, -1, 1, 1, 1, 1), offsets=(0, 90, 90, 0, 0, 0))


# --- the procedure -----------------------------------------------------------------------------


def half_turn_homing_offsets(
    positions: Mapping[str, int],
    resolution: int = 4096,
    homing_sign: int = -1,
    max_magnitude: int | None = 2047,
) -> dict[str, int]:
    """Offsets that make the current (middle) pose read half a turn (2047).

    ``positions`` are raw readings taken with every offset reset to 0 (0..resolution-1 on
    Feetech; Dynamixel extended-position mode can read beyond one turn).
    Feetech reports ``Present = Actual - Offset`` (``homing_sign=-1``: offset = pos - 2047);
    Dynamixel ``Present = Actual + Offset`` (offset = 2047 - pos). A Feetech offset is an
    11-bit sign-magnitude value (``max_magnitude`` 2047): the one reading that would need
    2048 (a joint parked exactly at 4095) gets 2047 and reads one step off, instead of
    crashing with "Magnitude 2048 exceeds 2047" (LeRobot #3193).
    """
    half = (resolution - 1) // 2
    offsets: dict[str, int] = {}
    for name, pos in positions.items():
        if max_magnitude is not None and not 0 <= pos < resolution:
            raise CalibrationError(
                f"motor '{name}' reads {pos}, outside 0..{resolution - 1}; is multi-turn (Phase bit 4) mode on?"
            )
        offset = (pos - half) if homing_sign < 0 else (half - pos)
        if max_magnitude is not None:
            offset = max(-max_magnitude, min(max_magnitude, offset))
        offsets[name] = offset
    return offsets


def record_ranges(
    read_positions: Callable[[], Mapping[str, int]],
    should_stop: Callable[[], bool],
    *,
    period_s: float = 0.02,
    on_update: Callable[[dict[str, int], dict[str, int], Mapping[str, int]], None] | None = None,
    max_duration_s: float = 600.0,
) -> tuple[dict[str, int], dict[str, int]]:
    """Stream positions (~50 Hz) while the user sweeps every joint; return (mins, maxes).

    ``should_stop`` is polled every period (the CLI sets it when Enter is pressed);
    ``on_update(mins, maxes, current)`` lets it draw a table.
    """
    first = dict(read_positions())
    mins, maxes = dict(first), dict(first)
    deadline = time.monotonic() + max_duration_s
    while not should_stop():
        if time.monotonic() > deadline:
            raise CalibrationError(f"range recording did not finish within {max_duration_s:.0f} s")
        current = read_positions()
        for name, pos in current.items():
            mins[name] = min(mins[name], pos)
            maxes[name] = max(maxes[name], pos)
        if on_update is not None:
            on_update(mins, maxes, current)
        time.sleep(period_s)
    same = [n for n in mins if mins[n] == maxes[n]]
    if same:
        raise CalibrationError(
            f"joints {same} did not move during range recording; sweep each joint end to end"
        )
    return mins, maxes
