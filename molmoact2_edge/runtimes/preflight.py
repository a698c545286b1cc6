"""Before the bus opens: the run's settings from the bundle's robot contract, and every check that needs no motion.

``resolve_run`` takes the control rate, the joint frame and the executed steps from the
contract; a flag that disagrees is refused unless the user overrides the contract
explicitly (the override is returned so that the caller prints it and telemetry records it).

``preflight`` checks, before any byte goes to a bus and before torque: the contract against
the robot kind and its joints, the calibration (present, one entry per joint, motor ids
matching), each camera (opens, delivers a frame, under the names the policy expects), the
record folder (new, writable, no crashed recording's spool in it), the task, and the port or
CAN channel (exists, accessible). All failures are collected and raised together as one
``PreflightError``, so a user fixes everything in one go.

Torch-free; the robot and cameras are passed in constructed but not connected.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molmoact2_edge.contract import SO_FRAME_KINDS, RobotContract
from molmoact2_edge.errors import ContractError, MolmoEdgeError, PreflightError
from molmoact2_edge.runtimes.recording import SPOOL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunChoices:
    """What a run uses, decided from the contract and the flags."""

    hz: float
    joint_frame: str
    executed_steps: int
    cameras: tuple[str, ...]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"contract": .., "used": ..}


def resolve_run(
    contract: RobotContract,
    robot_kind: str,
    *,
    hz: float | None = None,
    joint_frame: str | None = None,
    override: bool = False,
) -> RunChoices:
    """The run's rate and joint frame: the contract's, or a flag's when it agrees or ``override`` is set.

    raises ContractError naming the flag, the contract's value and the two ways out.
    """
    frame_applies = robot_kind in SO_FRAME_KINDS
    if joint_frame is not None and not frame_applies:
        raise ContractError(f"--joint-frame applies to SO-100/101 arms only, not --robot {robot_kind}")
    wanted = {"hz": (hz, contract.control_hz), "joint_frame": (joint_frame, contract.joint_frame)}
    chosen: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for name, (flag, recorded) in wanted.items():
        if flag is None or flag == recorded:
            chosen[name] = recorded
            continue
        if not override:
            what = "the rate its actions were recorded at" if name == "hz" else "the joint frame its data is in"
            raise ContractError(
                f"--{name.replace('_', '-')} {flag} disagrees with the bundle's robot contract ({recorded}, {what}); "
                f"drop the flag to use {recorded}, or pass --override-contract to run with {flag} anyway"
            )
        chosen[name] = flag
        overrides[name] = {"contract": recorded, "used": flag}
    frame = chosen["joint_frame"] if frame_applies else "native"
    return RunChoices(float(chosen["hz"]), frame, contract.executed_steps, contract.camera_names, overrides)


def preflight(
    contract: RobotContract,
    robot_kind: str,
    robot: Any,
    *,
    task: str | None,
    record: Path | None = None,
    port: str | None = None,
    can: tuple[str, ...] = (),
) -> list[str]:
    """Every check that needs no motion and no bus traffic; returns what passed, raises PreflightError listing
    every failure. ``robot``: constructed, not connected (its bus is not opened here)."""
    failures: list[str] = []
    passed: list[str] = []
    for name, check in (
        ("contract", lambda: _check_contract(contract, robot_kind, robot)),
        ("calibration", lambda: _check_calibration(robot) if robot is not None else "calibration: simulated"),
        ("cameras", lambda: _check_cameras(contract, robot.cameras) if robot is not None else "cameras: simulated"),
        ("record", lambda: check_record_folder(record) if record is not None else "record: off"),
        ("task", lambda: _check_task(task)),
        ("port", lambda: _check_port(port, can)),
    ):
        try:
            passed.append(check())
        except MolmoEdgeError as err:
            failures.append(f"{name}: {err}")
    if failures:
        raise PreflightError(
            "pre-flight failed, nothing was sent to the robot:\n  - " + "\n  - ".join(failures)
        )
    for line in passed:
        log.info("pre-flight ok: %s", line)
    return passed


def _check_contract(contract: RobotContract, robot_kind: str, robot: Any) -> str:
    if robot_kind not in contract.robot_kinds:
        raise ContractError(
            f"the bundle's policy drives {list(contract.robot_kinds)} (tag {contract.embodiment_tag}), not {robot_kind}"
        )
    if robot is None:
        return f"contract: {robot_kind}"
    joints = tuple(robot.joint_names)
    if joints != contract.joint_names:
        raise ContractError(f"the robot's joints {list(joints)} differ from the policy's {list(contract.joint_names)}")
    return f"contract: {robot_kind} with joints {list(joints)}"


def _check_calibration(robot: Any) -> str:
    if not hasattr(robot, "motors"):  # CAN arms (YAM) carry their zero in the drives, no file
        return "calibration: none needed"
    calibration: Mapping[str, Any] | None = robot.calibration
    if calibration is None:
        raise PreflightError(
            f"no calibration for {robot.name} id {robot.robot_id!r} (looked at {robot.calibration_path()}); "
            f"run `molmo-edge calibrate --robot {robot.name} --port PORT --robot-id {robot.robot_id}`"
        )
    missing = [j for j in robot.joint_names if j not in calibration]
    wrong_ids = [j for j in robot.joint_names if j in calibration and calibration[j].id != robot.motors[j].id]
    if missing or wrong_ids:
        raise PreflightError(
            f"calibration of {robot.name} id {robot.robot_id!r} does not match the arm: missing joints {missing}, "
            f"motor ids differ for {wrong_ids}; calibrate again"
        )
    return f"calibration: {len(calibration)} joints"


def _check_cameras(contract: RobotContract, cameras: Mapping[str, Any]) -> str:
    """Every camera the policy needs is there under its name, opens and delivers a frame (then is closed again)."""
    expected = contract.camera_names
    missing = [c for c in expected if c not in cameras]
    if missing:
        raise PreflightError(
            f"the policy needs cameras {list(expected)} (in this order); missing {missing}, given {sorted(cameras)}; "
            f"pass --camera NAME=DEVICE for each"
        )
    shapes = []
    for name in expected:
        camera = cameras[name]
        try:
            camera.connect()
            frame = camera.read_latest()
            shapes.append(f"{name} {frame.rgb.shape[1]}x{frame.rgb.shape[0]}")
        except MolmoEdgeError as err:
            raise PreflightError(f"camera '{name}' did not deliver a frame: {err}") from err
        finally:
            camera.disconnect()
    extra = sorted(set(cameras) - set(expected))
    return f"cameras: {', '.join(shapes)}" + (f" (not used by the policy: {extra})" if extra else "")


def check_record_folder(record: Path) -> str:
    """A recording goes into a new (or empty) folder that can be written; a crashed recording is never overwritten."""
    if (record / SPOOL).is_dir():
        raise PreflightError(
            f"--record {record} holds the spool of an interrupted recording; turn it into a dataset with "
            f"`molmo-edge recover {record}` (or choose another --record folder)"
        )
    if record.exists() and (not record.is_dir() or any(record.iterdir())):
        raise PreflightError(f"--record {record} already exists and is not empty; choose a new folder")
    parent = record if record.exists() else _existing_parent(record)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".molmo-edge-write-test-"):
            pass
    except OSError as err:
        raise PreflightError(f"--record {record}: cannot write in {parent} ({err.strerror})") from err
    return f"record: {record} (new, writable)"


def check_output_file(path: Path, option: str) -> str:
    """``path`` can be written (created with its parent folders, or replaced); checked before touching hardware."""
    if path.is_dir():
        raise PreflightError(f"{option} {path} is a directory; give a file path")
    parent = _existing_parent(path)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".molmo-edge-write-test-"):
            pass
    except OSError as err:
        raise PreflightError(
            f"{option} {path}: cannot write in {parent} ({err.strerror}); nothing was sent to the servos"
        ) from err
    if path.exists() and not os.access(path, os.W_OK):
        raise PreflightError(f"{option} {path} exists and is read-only; nothing was sent to the servos")
    return f"{option}: {path} (writable)"


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_task(task: str | None) -> str:
    if not task or not task.strip():
        raise PreflightError('no task: pass --task "<instruction>"')
    return f"task: {task!r}"


def _check_port(port: str | None, can: tuple[str, ...]) -> str:
    if port is not None:
        if not os.path.exists(port):
            raise PreflightError(f"--port {port} does not exist (is the bus adapter plugged in? `molmo-edge doctor` lists ports)")
        if not os.access(port, os.R_OK | os.W_OK):
            raise PreflightError(
                f"--port {port} is not readable and writable by this user; add yourself to the dialout group "
                "(sudo usermod -aG dialout $USER, then log in again)"
            )
        return f"port: {port}"
    for channel in can:
        if not Path("/sys/class/net", channel).exists():
            raise PreflightError(
                f"--can {channel}: no such network interface; bring it up first "
                f"(sudo ip link set {channel} up type can bitrate 1000000)"
            )
    return f"can: {list(can)}" if can else "port: simulated"
