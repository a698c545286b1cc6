"""The Robot interface: a motor bus plus cameras, in the units the policy was trained on.

A robot reads its joint state and takes absolute joint targets as ``(s,)`` float32
vectors in *normalized units* (degrees for arm joints, 0-100 for a gripper on the
serial arms; radians and 0-1 on YAM, as i2rt and the released YAM data use), in
``joint_names`` order, which is the order of the released checkpoints' state and
action vectors. It knows nothing of models; the safety layer
(``hardware/safety.py``) sits between the policy and ``send_action``.

Torque changes happen through ``set_torque`` or the ``torque_disabled()`` context
manager, which re-enables torque even when the body raises.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from molmoact2_edge.errors import CameraError, HardwareError, PortError
from molmoact2_edge.hardware.cameras import Camera
from molmoact2_edge.types import Observation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JointLimits:
    """What the safety layer needs from a robot, in its normalized units.

    lower, upper: (s,) absolute joint envelope (from calibration or the arm's model).
    max_step: (s,) default largest change of the commanded target per control tick at ``control_hz``.
    """

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    max_step: np.ndarray
    control_hz: float = 30.0

    def __post_init__(self) -> None:
        s = len(self.names)
        for field_name in ("lower", "upper", "max_step"):
            value = getattr(self, field_name)
            if np.shape(value) != (s,):
                raise HardwareError(
                    f"JointLimits.{field_name}: expected shape ({s},) for joints {self.names}, got {np.shape(value)}"
                )
        bad = [n for n, lo, hi in zip(self.names, self.lower, self.upper, strict=True) if not lo < hi]
        if bad:
            raise HardwareError(
                f"JointLimits: lower must be below upper for {bad} (lower={self.lower}, upper={self.upper})"
            )
        if np.any(self.max_step <= 0):
            raise HardwareError(f"JointLimits.max_step must be positive, got {self.max_step}")


class Robot(ABC):
    """An arm (or two) on one or more buses, plus cameras.

    Subclasses set ``name`` and ``joint_names`` and implement the ``_bus`` methods; the
    base class owns camera handling, observation assembly and the context manager.
    """

    name: str = "robot"
    joint_names: tuple[str, ...] = ()
    # True when every send_action gets a reply from each motor (CAN MIT frames), so a dead bus
    # shows on the send itself; serial SYNC_WRITEs are unanswered and need a read to notice
    writes_acknowledged: bool = False

    def __init__(
        self, cameras: dict[str, Camera] | None = None, *, disable_torque_on_disconnect: bool = True
    ):
        self.cameras: dict[str, Camera] = dict(cameras or {})
        for key, cam in self.cameras.items():
            if key != cam.name:
                raise CameraError(f"camera dict key '{key}' differs from the camera's name '{cam.name}'")
        # LeRobot's default (follower goes limp on exit); the safety layer sets it from its on_exit policy.
        self.disable_torque_on_disconnect = disable_torque_on_disconnect
        self._connected = False

    # --- what each robot implements ---------------------------------------------------------

    @abstractmethod
    def _connect_bus(self) -> None:
        """Open the bus(es), check every motor answers, apply the servo setup (gains, limits, modes)."""

    @abstractmethod
    def _disconnect_bus(self, disable_torque: bool) -> None:
        """Optionally disable torque, then close the bus(es). Must not raise on a dead bus."""

    @abstractmethod
    def read_state(self) -> np.ndarray:
        """(s,) float32 measured joint positions in normalized units, ``joint_names`` order."""

    @abstractmethod
    def _write_targets(self, target: np.ndarray) -> np.ndarray:
        """Write (s,) absolute targets to the motors; return what was written (after unit rounding/clamping)."""

    @abstractmethod
    def set_torque(self, enabled: bool) -> None:
        """Enable or disable torque on every motor."""

    @abstractmethod
    def check_faults(self) -> None:
        """Raise ``ServoError`` (naming the motor and its flags) if any motor reports a fault."""

    @abstractmethod
    def limits(self) -> JointLimits:
        """The joint envelope and default per-tick step, for the safety layer."""

    # --- shared behaviour -------------------------------------------------------------------

    @property
    def state_dim(self) -> int:
        return len(self.joint_names)

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the bus, apply the servo setup, then connect every camera."""
        if self._connected:
            raise PortError(f"{self.name} is already connected")
        self._connect_bus()
        try:
            for cam in self.cameras.values():
                cam.connect()
        except BaseException:
            for cam in self.cameras.values():
                cam.disconnect()
            self._disconnect_bus(disable_torque=self.disable_torque_on_disconnect)
            raise
        self._connected = True
        logger.info("%s connected (%d joints, cameras %s)", self.name, self.state_dim, sorted(self.cameras))

    def disconnect(self) -> None:
        """Disconnect cameras, then the bus (disabling torque if ``disable_torque_on_disconnect``). Safe twice."""
        if not self._connected:
            return
        self._connected = False
        for cam in self.cameras.values():
            cam.disconnect()
        self._disconnect_bus(disable_torque=self.disable_torque_on_disconnect)
        logger.info(
            "%s disconnected (torque %s)",
            self.name,
            "off" if self.disable_torque_on_disconnect else "left on",
        )

    def __enter__(self) -> Robot:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    def send_action(self, target: np.ndarray) -> np.ndarray:
        """Command (s,) absolute joint targets; returns the (s,) float32 targets actually sent."""
        target = np.asarray(target, dtype=np.float32)
        if target.shape != (self.state_dim,):
            raise HardwareError(
                f"{self.name}: action must have shape ({self.state_dim},) for joints {self.joint_names}, got {target.shape}"
            )
        if not np.all(np.isfinite(target)):
            raise HardwareError(f"{self.name}: refusing non-finite action {target.tolist()}")
        return np.asarray(self._write_targets(target), dtype=np.float32)

    def get_observation(self, task: str, max_camera_age_ms: float | None = None) -> Observation:
        """Read the joint state and every camera's latest frame into an ``Observation``.

        The timestamp is taken just before the state read; camera frames carry their own
        age (at most one frame period plus device latency, or ``max_camera_age_ms``).
        """
        timestamp = time.monotonic()
        state = self.read_state()
        images: dict[str, np.ndarray] = {}
        depth: dict[str, np.ndarray] = {}
        for key, cam in self.cameras.items():
            frame = cam.read_latest(max_age_ms=max_camera_age_ms)
            images[key] = frame.rgb
            if frame.depth is not None:
                depth[key] = frame.depth
        return Observation(images=images, state=state, task=task, timestamp=timestamp, depth=depth or None)

    @contextlib.contextmanager
    def torque_disabled(self) -> Iterator[None]:
        """Disable torque for the body (EEPROM writes, calibration), re-enable it afterwards."""
        self.set_torque(False)
        try:
            yield
        finally:
            self.set_torque(True)
