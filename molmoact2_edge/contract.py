"""The robot contract: what a policy expects of the robot it drives, written once and carried along.

A policy's actions only mean something on the robot, joint frame, rate and cameras it was
trained with. ``RobotContract`` holds those facts; it travels

- in a checkpoint as ``robot_contract.json`` (training writes it from the dataset:
  ``meta/info.json`` knows the fps and the robot type, the features the joint names);
- in a bundle manifest as ``robot_contract`` (export copies the checkpoint's, or, for a
  release without one, fills in the release conventions of its known tag from
  ``RELEASE_CONVENTIONS`` and records that it assumed them; where neither says, export
  asks for the flag instead of guessing);
- to the device: ``run`` takes the rate, the joint frame, the camera names and the executed
  steps from it, and pre-flight checks it against the robot before the bus opens;
- over the wire: ``to_dict`` / ``from_dict`` are plain JSON, so a remote policy server can
  send its contract and the client checks it the same way.

Torch-free (the standard library only): it runs on a Jetson.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from molmoact2_edge.errors import ContractError

CONTRACT_FILE = "robot_contract.json"  # beside a checkpoint's weights
FORMAT = "molmoact2_robot_contract.v1"

SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
SO101_UNITS = ("deg", "deg", "deg", "deg", "deg", "0-100")
# LeRobot robot_type (meta/info.json) -> the robot kinds of this package that may drive its policies
ROBOT_TYPE_KINDS: dict[str, tuple[str, ...]] = {
    "so101_follower": ("so101", "sim-so101"),
    "so100_follower": ("so101", "sim-so101"),
    "so_follower": ("so101", "sim-so101"),
    "koch_follower": ("koch",),
    "yam": ("yam",),
    "bimanual_yam": ("bimanual-yam",),
}
# joint frames a robot can present its joints in (hardware/robots/so101.py JOINT_FRAMES);
# "native" = the robot's own units, no frame choice exists (YAM, Koch)
JOINT_FRAMES = ("lerobot", "so100_101_legacy", "native")
SO_FRAME_KINDS = ("so101", "sim-so101")  # kinds whose frame is chosen at run time
ROBOT_KINDS = ("so101", "koch", "yam", "bimanual-yam", "sim-so101")


@dataclass(frozen=True)
class CameraSpec:
    """One camera the policy sees: the observation's name for it, its role, and the model's input size."""

    name: str
    role: str  # e.g. "scene" (a fixed view) or "wrist" (moves with the gripper)
    image_size: tuple[int, int] | None = None  # (h, w) the bundle resizes to; None before export


@dataclass(frozen=True)
class RobotContract:
    """What a policy needs of its robot. Every field has a meaning a robot can be checked against.

    provenance: "recorded" (training wrote it from the dataset), "release-conventions" (export
    assumed the conventions of a known tag; ``assumed`` names the source of each value) or
    "flags" (the exporter's flags supplied it).
    """

    embodiment_tag: str
    robot_kinds: tuple[str, ...]
    joint_names: tuple[str, ...]
    units: tuple[str, ...]
    joint_frame: str
    control_hz: float
    executed_steps: int
    cameras: tuple[CameraSpec, ...]
    state: str  # state semantics, e.g. "absolute joint pose"
    action: str  # action semantics, e.g. "absolute joint pose" or "delta end-effector pose"
    provenance: str = "recorded"
    assumed: dict[str, str] = field(default_factory=dict)  # field -> public source, for assumed values

    def __post_init__(self) -> None:
        problems = []
        if self.joint_frame not in JOINT_FRAMES:
            problems.append(f"joint_frame {self.joint_frame!r} is not one of {JOINT_FRAMES}")
        if not self.control_hz > 0:
            problems.append(f"control_hz must be positive, got {self.control_hz}")
        if self.executed_steps < 1:
            problems.append(f"executed_steps must be >= 1, got {self.executed_steps}")
        if len(self.units) != len(self.joint_names):
            problems.append(f"{len(self.units)} units for {len(self.joint_names)} joints")
        if not self.robot_kinds:
            problems.append("robot_kinds is empty")
        if problems:
            raise ContractError("robot contract: " + "; ".join(problems))

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    def with_cameras(self, names: tuple[str, ...], image_size: tuple[int, int]) -> RobotContract:
        """The contract for a bundle whose cameras are ``names`` (in order) at ``image_size``."""
        roles = {c.name: c.role for c in self.cameras}
        return replace(self, cameras=tuple(CameraSpec(n, roles.get(n, camera_role(n)), image_size) for n in names))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "embodiment_tag": self.embodiment_tag,
            "robot_kinds": list(self.robot_kinds),
            "joints": {"names": list(self.joint_names), "units": list(self.units), "frame": self.joint_frame},
            "control_hz": self.control_hz,
            "executed_steps": self.executed_steps,
            "cameras": [
                {"name": c.name, "role": c.role, "image_size": list(c.image_size) if c.image_size else None}
                for c in self.cameras
            ],
            "state": self.state,
            "action": self.action,
            "provenance": self.provenance,
            "assumed": dict(self.assumed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "robot contract") -> RobotContract:
        """Parse (and check) a contract; ``where`` names its origin in errors (a file, a server)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ContractError(f"{where}: not a robot contract (format {got!r}, expected {FORMAT!r})")
        try:
            joints = data["joints"]
            cameras = tuple(
                CameraSpec(str(c["name"]), str(c["role"]), tuple(c["image_size"]) if c.get("image_size") else None)  # type: ignore[arg-type]
                for c in data["cameras"]
            )
            return cls(
                embodiment_tag=str(data["embodiment_tag"]),
                robot_kinds=tuple(data["robot_kinds"]),
                joint_names=tuple(joints["names"]),
                units=tuple(joints["units"]),
                joint_frame=str(joints["frame"]),
                control_hz=float(data["control_hz"]),
                executed_steps=int(data["executed_steps"]),
                cameras=cameras,
                state=str(data["state"]),
                action=str(data["action"]),
                provenance=str(data.get("provenance", "recorded")),
                assumed=dict(data.get("assumed", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ContractError(f"{where}: malformed robot contract ({type(err).__name__}: {err})") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RobotContract:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ContractError(f"{path}: cannot read the robot contract ({err})") from err
        return cls.from_dict(data, str(path))


def camera_role(name: str) -> str:
    """A camera's role from its name: "wrist" cameras move with the gripper, anything else sees the scene."""
    return "wrist" if "wrist" in name.lower() else "scene"


def kinds_for_robot_type(robot_type: str | None) -> tuple[str, ...]:
    """The robot kinds that may drive a policy trained on LeRobot ``robot_type`` data."""
    kinds = ROBOT_TYPE_KINDS.get(robot_type or "")
    if kinds is None:
        raise ContractError(
            f"robot_type {robot_type!r} of the dataset is not one this package drives "
            f"(known: {sorted(ROBOT_TYPE_KINDS)}); set meta/info.json robot_type"
        )
    return kinds


# --- release conventions ---------------------------------------------------------------------
# A released checkpoint carries no contract. For the tags below the conventions of the release are
# public; each value names its source. Export uses them only for a checkpoint without a contract,
# prints that it assumed them, and records ``provenance: release-conventions`` with the sources.

LEROBOT_SO101_RATE = (
    "LeRobot records SO-100/101 datasets at 30 fps (lerobot-record --dataset.fps default 30); "
    "LeRobot issue 4223 runs MolmoAct2-SO100_101 at 30 fps"
)
RELEASE_CONVENTIONS: dict[str, dict[str, Any]] = {
    "so100_so101_molmoact2": {
        "robot_kinds": SO_FRAME_KINDS,
        "joint_names": SO101_JOINTS,
        "units": SO101_UNITS,
        "joint_frame": "so100_101_legacy",
        "control_hz": 30.0,
        "state": "absolute joint pose",
        "action": "absolute joint pose",
        "sources": {
            "joint_frame": "allenai/MolmoAct2-SO100_101 model card: norm stats in the pre-0.5 LeRobot SO-100/101 "
            "frame (shoulder_lift sign flipped; shoulder_lift, elbow_flex offset by 90 deg); "
            "../shared/reference/molmoact2-checkpoint.md section 5.3",
            "control_hz": LEROBOT_SO101_RATE,
            "joint_names": "LeRobot SOFollower motor order (lerobot/robots/so_follower)",
            "action": "MolmoAct2 data mixture tag so100_so101_molmoact2: control_mode 'absolute joint pose'",
        },
    },
}


def release_contract(
    tag: str, executed_steps: int, cameras: tuple[str, ...], *, state: str | None = None, action: str | None = None
) -> RobotContract | None:
    """The contract a release of ``tag`` follows by convention, or None for an unknown tag."""
    conv = RELEASE_CONVENTIONS.get(tag)
    if conv is None:
        return None
    return RobotContract(
        embodiment_tag=tag,
        robot_kinds=tuple(conv["robot_kinds"]),
        joint_names=tuple(conv["joint_names"]),
        units=tuple(conv["units"]),
        joint_frame=conv["joint_frame"],
        control_hz=float(conv["control_hz"]),
        executed_steps=executed_steps,
        cameras=tuple(CameraSpec(n, camera_role(n)) for n in cameras),
        state=conv["state"],
        action=action or conv["action"],
        provenance="release-conventions",
        assumed=dict(conv["sources"]),
    )


def joint_units(kinds: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    """Units of each joint as the robot kinds report them (hardware/robots: degrees or radians, grippers 0-100)."""
    angle = "rad" if any(k in ("yam", "bimanual-yam") for k in kinds) else "deg"
    gripper = "0-1" if angle == "rad" else "0-100"
    return tuple(gripper if "gripper" in n else angle for n in names)


def dataset_contract(
    info: Mapping[str, Any],
    *,
    tag: str,
    executed_steps: int,
    cameras: tuple[str, ...],
    action: str,
    joint_frame: str | None = None,
    where: str = "dataset",
) -> RobotContract:
    """The contract of a policy trained on a LeRobot dataset with ``meta/info.json`` ``info``.

    The rate is the dataset's fps, the joints its action names, the robot kinds follow its
    robot_type. The joint frame is the dataset's: ``info['joint_frame']`` (written by this
    package's recorders) or ``joint_frame`` (the trainer's flag); an SO-100/101 dataset that
    says neither is refused, because both frames exist in the wild.
    """
    kinds = kinds_for_robot_type(info.get("robot_type"))
    recorded = info.get("joint_frame")
    if joint_frame and recorded and joint_frame != recorded:
        raise ContractError(f"{where}: meta/info.json says joint_frame {recorded!r}, the flag {joint_frame!r}")
    frame = joint_frame or recorded
    if frame is None:
        if any(k in SO_FRAME_KINDS for k in kinds):
            raise ContractError(
                f"{where}: meta/info.json does not say which SO-100/101 joint frame the data is in; pass "
                "--joint-frame lerobot (recorded with LeRobot >= 0.5 calibration) or --joint-frame so100_101_legacy"
            )
        frame = "native"
    names = info.get("features", {}).get("action", {}).get("names")
    if isinstance(names, Mapping):  # LeRobot also writes {"motors": [...]}
        names = next(iter(names.values()), None)
    if not names:
        raise ContractError(f"{where}: the action feature has no joint names (features.action.names)")
    joints = tuple(str(n).removesuffix(".pos") for n in names)
    return RobotContract(
        embodiment_tag=tag,
        robot_kinds=kinds,
        joint_names=joints,
        units=joint_units(kinds, joints),
        joint_frame=frame,
        control_hz=float(info["fps"]),
        executed_steps=executed_steps,
        cameras=tuple(CameraSpec(n, camera_role(n)) for n in cameras),
        state="absolute joint pose",
        action=action,
        provenance="recorded",
    )


@dataclass(frozen=True)
class ContractFlags:
    """What an exporter may state about a checkpoint that records no contract (``export`` flags)."""

    control_hz: float | None = None
    joint_frame: str | None = None
    robot: str | None = None  # a robot kind: so101, koch, yam, bimanual-yam

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def export_contract(
    recorded: RobotContract | None,
    flags: ContractFlags,
    *,
    tag: str,
    executed_steps: int,
    cameras: tuple[str, ...],
    image_size: tuple[int, int],
    action: str,
    joint_names: tuple[str, ...],
    where: str,
) -> RobotContract:
    """The contract a bundle gets: the checkpoint's own, else the release conventions of its tag
    (flags may correct an assumed value), else the flags; never a guess.

    raises ContractError when a flag contradicts the checkpoint's recorded contract, or when
    neither a contract nor a known tag says and a flag is missing.
    """
    given = flags.given()
    if recorded is not None:
        mine = {"control_hz": recorded.control_hz, "joint_frame": recorded.joint_frame}
        clash = [f"--{k.replace('_', '-')} {v} (it records {mine[k]})" for k, v in given.items() if k in mine and v != mine[k]]
        clash += [f"--robot {flags.robot} (it allows {list(recorded.robot_kinds)})"] if flags.robot and flags.robot not in recorded.robot_kinds else []
        if clash:
            raise ContractError(f"{where} records its robot contract; these flags contradict it: {', '.join(clash)}")
        contract = replace(recorded, executed_steps=executed_steps)
    elif (release := release_contract(tag, executed_steps, cameras, action=action)) is not None:
        assumed = {k: v for k, v in release.assumed.items() if k not in given}
        stated = {k: v for k, v in given.items() if k != "robot"}
        contract = replace(release, assumed=assumed, **stated)
        if flags.robot and flags.robot not in contract.robot_kinds:
            raise ContractError(f"--robot {flags.robot}: tag {tag!r} is for robots {list(contract.robot_kinds)}")
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("control_hz", "joint_frame", "robot") if k not in given]
        if missing:
            raise ContractError(
                f"{where} has no {CONTRACT_FILE} and tag {tag!r} has no known release conventions "
                f"(known: {sorted(RELEASE_CONVENTIONS)}); say what the policy was trained with: pass {' '.join(missing)} "
                "(the rate its actions were recorded at, its joint frame, the robot kind)"
            )
        assert flags.robot is not None and flags.joint_frame is not None and flags.control_hz is not None
        kinds = (flags.robot, "sim-so101") if flags.robot == "so101" else (flags.robot,)
        contract = RobotContract(
            embodiment_tag=tag,
            robot_kinds=kinds,
            joint_names=joint_names,
            units=joint_units(kinds, joint_names),
            joint_frame=flags.joint_frame,
            control_hz=float(flags.control_hz),
            executed_steps=executed_steps,
            cameras=tuple(CameraSpec(n, camera_role(n)) for n in cameras),
            state="absolute joint pose",
            action=action,
            provenance="flags",
        )
    return contract.with_cameras(cameras, image_size)
