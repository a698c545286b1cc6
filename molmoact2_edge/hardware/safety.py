"""The safety layer between a policy and a robot: envelope, rate limit, watchdog, exit policy.

Every target the policy produces goes through ``SafetyLayer.send(target)``:

1. non-finite targets are refused (the last commanded target is held instead);
2. the target is clipped to the joint envelope (calibration or arm model limits, shrunk
   by ``margin``);
3. the change from the **last commanded** target (never the measured pose: clamping
   against the measured pose caps the PD force at kp x step and lets a loaded arm sag,
   as the YAM lab guides found) is limited to ``max_step`` per tick, scaled down as one
   vector so the arm keeps its direction;
4. the result goes to ``robot.send_action``.

Entering the layer reads the measured pose and commands exactly it (the first command
never moves the arm). A watchdog re-sends the last commanded target when no new action
arrived within ``watchdog_s`` (Damiao drives drop to damping after 400 ms without
commands; serial servos simply keep holding). On exit, on SIGINT/SIGTERM and on any
exception the configured ``on_exit`` policy runs: ``"hold"`` re-sends the last commanded
target and leaves torque on, ``"disable"`` turns torque off. Neither ever sends a new
position. A servo fault or a dead bus (a transaction that fails after its retries)
stops the layer: no further command is sent, the exit policy is attempted, and
``SafetyError`` is raised. Serial goal writes get no reply, so ``send`` and ``hold`` also
read the state whenever no read succeeded for ``heartbeat_s`` (30 ms): with the loop
ticking at 30 Hz, a dead bus is caught within one tick plus the read's retries
(33 + ~35 ms on the default Feetech driver; an unplugged adapter fails at once).

Counts of clipped, held and refused commands are exposed by ``telemetry()``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Literal

import numpy as np

from molmoact2_edge.errors import BusError, HardwareError, PortError, SafetyError
from molmoact2_edge.hardware.robots.base import JointLimits, Robot
from molmoact2_edge.types import Observation

logger = logging.getLogger(__name__)

ExitPolicy = Literal["hold", "disable"]


@dataclass(frozen=True)
class SafetyConfig:
    """Knobs of the safety layer, in the robot's normalized units (degrees / 0-100, or radians on YAM)."""

    margin: float = 0.0  # shrink the joint envelope by this much on each side
    max_step: float | tuple[float, ...] | None = None  # per tick; None = the robot's limits().max_step
    # the loop's rate: the robot's default max_step is per tick at limits().control_hz, i.e. a joint
    # speed, so a slower loop may step further per tick (None: the loop runs at the robot's rate)
    control_hz: float | None = None
    watchdog_s: float = 0.2  # hold when no action arrived for this long (< the Damiao 400 ms timeout)
    watchdog_thread: bool = True  # False: the caller runs poll_watchdog() itself (tests, single-thread loops)
    on_exit: ExitPolicy = "hold"
    fault_check_every: int = 30  # ticks between check_faults() reads (1 s at 30 Hz); 0 = never
    # a serial SYNC_WRITE has no reply, so a bus whose servos lost power only shows on a read:
    # read the state when no read succeeded for this long (bounds dead-bus detection); 0 = never
    heartbeat_s: float = 0.03  # at 30 Hz: one read per tick unless the loop observed in between
    preserve_direction: bool = True  # scale the whole step vector instead of clamping joints one by one
    handle_signals: bool = True  # turn SIGTERM into the same orderly exit as Ctrl-C (main thread only)

    def __post_init__(self) -> None:
        if self.on_exit not in ("hold", "disable"):
            raise SafetyError(f"on_exit must be 'hold' or 'disable', got {self.on_exit!r}")
        if self.control_hz is not None and self.control_hz <= 0:
            raise SafetyError(f"control_hz must be positive, got {self.control_hz}")
        if self.margin < 0 or self.watchdog_s <= 0:
            raise SafetyError(
                f"margin must be >= 0 and watchdog_s > 0 (got margin={self.margin}, watchdog_s={self.watchdog_s})"
            )


class _Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that every ``with`` block unwinds."""


class SafetyLayer:
    """Wraps a connected robot; use as a context manager around the control loop.

    ``clock`` is ``time.monotonic`` on hardware; tests pass a fake clock to run thousands of
    ticks without sleeping.
    """

    def __init__(
        self, robot: Robot, config: SafetyConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.robot = robot
        self.config = config or SafetyConfig()
        self.clock = clock
        limits = robot.limits()
        self.limits = limits
        self.lower, self.upper = self._envelope(limits, self.config.margin)
        if self.config.max_step is None:
            rate_scale = limits.control_hz / (self.config.control_hz or limits.control_hz)
            step = limits.max_step * np.float32(rate_scale)  # same joint speed at any loop rate
        else:
            step = np.broadcast_to(np.asarray(self.config.max_step, np.float32), limits.lower.shape)
        self.max_step = np.asarray(step, np.float32)
        if np.any(self.max_step <= 0):
            raise SafetyError(
                f"max_step must be positive for every joint of {robot.name}, got {self.max_step}"
            )
        self.last_commanded: np.ndarray | None = None
        # for per-tick telemetry: which rule changed the last command, the last state read and when
        self.last_rule: str | None = None
        self.measured: np.ndarray | None = None
        self.measured_t: float | None = None
        self.stopped: str | None = None  # reason, once stopped
        self._last_action_time = 0.0
        self._last_read_time = 0.0
        self._tick = 0
        self._lock = threading.RLock()  # the control loop and the watchdog thread share the robot
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self._old_handlers: dict[int, object] = {}
        self.counts = dict.fromkeys(
            ("ticks", "clipped_limits", "clipped_step", "refused_nonfinite", "watchdog_holds", "faults"), 0
        )

    @staticmethod
    def _envelope(limits: JointLimits, margin: float) -> tuple[np.ndarray, np.ndarray]:
        lower = np.asarray(limits.lower, np.float32) + margin
        upper = np.asarray(limits.upper, np.float32) - margin
        narrow = [n for n, lo, hi in zip(limits.names, lower, upper, strict=True) if lo >= hi]
        if narrow:
            raise SafetyError(
                f"margin {margin} leaves no room for joints {narrow} (limits {limits.lower} .. {limits.upper})"
            )
        return lower, upper

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> SafetyLayer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            logger.warning(
                "safety layer exiting on %s: %s; applying on_exit=%s",
                exc_type.__name__ if exc_type else "?",
                exc,
                self.config.on_exit,
            )
        self.close()

    def start(self) -> None:
        """Command the measured pose (no motion), then start the watchdog and signal handling."""
        measured = self._guarded(self.robot.read_state, "reading the start pose")
        self._measured(measured)
        start = np.asarray(measured, np.float32).copy()
        self.last_commanded = start
        self._guarded(lambda: self.robot.send_action(start), "commanding the start pose")
        self._last_action_time = self.clock()
        self._install_signal_handlers()
        if self.config.watchdog_thread:
            self._watchdog_stop.clear()
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="safety-watchdog", daemon=True)
            self._watchdog.start()
        logger.info(
            "safety layer on %s: start pose %s, step %s, on_exit=%s",
            self.robot.name,
            np.round(measured, 2).tolist(),
            self.max_step.tolist(),
            self.config.on_exit,
        )

    def close(self) -> None:
        """Stop the watchdog, apply the exit policy, restore signal handlers. Safe to call twice."""
        self._watchdog_stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=1.0)
        self._watchdog = None
        try:
            self._apply_exit_policy()
        finally:
            self._restore_signal_handlers()

    # --- the control path -------------------------------------------------------------------

    def send(self, target: np.ndarray) -> np.ndarray:
        """Make ``target`` safe, send it, and return what was sent ((s,) float32)."""
        with self._lock:
            self._require_running()
            assert self.last_commanded is not None
            target = np.asarray(target, np.float32)
            if target.shape != self.last_commanded.shape:
                raise SafetyError(
                    f"{self.robot.name}: action shape {target.shape} != state shape {self.last_commanded.shape}"
                )
            self.counts["ticks"] += 1
            if not np.all(np.isfinite(target)):
                self.counts["refused_nonfinite"] += 1
                logger.warning("refused non-finite action %s; holding", target.tolist())
                safe, self.last_rule = self.last_commanded, "nonfinite"
            else:
                safe = self.clamp(target)
            sent = self._guarded(lambda: self.robot.send_action(safe), "sending an action")
            self.last_commanded = np.asarray(sent, np.float32).copy()
            self._last_action_time = self.clock()
            self._tick += 1
            if self.config.fault_check_every and self._tick % self.config.fault_check_every == 0:
                self._guarded(self.robot.check_faults, "checking servo status")
            else:
                self._heartbeat()
            return self.last_commanded

    def clamp(self, target: np.ndarray) -> np.ndarray:
        """Envelope clip, then the per-tick step limit against the last commanded target."""
        assert self.last_commanded is not None
        clipped = np.clip(target, self.lower, self.upper)
        limited = not np.array_equal(clipped, target)
        self.last_rule = "limit" if limited else None
        if limited:
            self.counts["clipped_limits"] += 1
        delta = clipped - self.last_commanded
        over = np.abs(delta) > self.max_step
        if not over.any():
            return clipped.astype(np.float32)
        self.counts["clipped_step"] += 1
        self.last_rule = "limit+max_step" if limited else "max_step"
        if self.config.preserve_direction:
            scale = float(np.min(self.max_step[over] / np.abs(delta[over])))
            delta = delta * scale
        else:
            delta = np.clip(delta, -self.max_step, self.max_step)
        # the scaled step can still leave the envelope when the start pose was outside it
        return (self.last_commanded + delta).astype(np.float32)

    def observe(self, task: str, max_camera_age_ms: float | None = None) -> Observation:
        """``robot.get_observation`` with the same dead-bus and fault handling as ``send``."""
        with self._lock:
            self._require_running()
            observation = self._guarded(
                lambda: self.robot.get_observation(task, max_camera_age_ms), "reading an observation"
            )
            self._measured(observation.state)
            return observation

    def hold(self) -> np.ndarray:
        """Re-send the last commanded target (refreshes CAN drives' command timeout)."""
        with self._lock:
            self._require_running()
            assert self.last_commanded is not None
            held, self.last_rule = self.last_commanded, "hold"
            self._guarded(lambda: self.robot.send_action(held), "holding position")
            self._last_action_time = self.clock()
            self._heartbeat()
            return held

    def _heartbeat(self) -> None:
        """Read the state if no read succeeded for ``heartbeat_s`` (writes alone cannot see a dead bus)."""
        if self.robot.writes_acknowledged or not self.config.heartbeat_s:
            return
        if self.clock() - self._last_read_time > self.config.heartbeat_s:
            self._measured(self._guarded(self.robot.read_state, "checking that the bus is alive"))

    def _measured(self, state: object) -> None:
        """A successful read: the bus is alive, and telemetry gets the joint state."""
        self._last_read_time = self.measured_t = self.clock()
        self.measured = np.asarray(state, np.float32)

    def poll_watchdog(self) -> bool:
        """Hold if no action arrived within ``watchdog_s``; returns True when it held."""
        with self._lock:
            if self.stopped is not None or self.last_commanded is None:
                return False
            if self.clock() - self._last_action_time < self.config.watchdog_s:
                return False
            self.counts["watchdog_holds"] += 1
            logger.debug("watchdog: no action for %.0f ms, holding", self.config.watchdog_s * 1000)
            self.hold()
            return True

    def telemetry(self) -> dict[str, object]:
        """Counters and limits for the run log."""
        return {
            **self.counts,
            "stopped": self.stopped,
            "max_step": self.max_step.tolist(),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "on_exit": self.config.on_exit,
        }

    # --- failure handling -------------------------------------------------------------------

    def _require_running(self) -> None:
        if self.stopped is not None:
            raise SafetyError(f"{self.robot.name} is stopped ({self.stopped}); no further commands are sent")
        if self.last_commanded is None:
            raise SafetyError("the safety layer is not started; use it as a context manager")

    def _guarded(self, fn: Callable[[], object], what: str):  # type: ignore[no-untyped-def]
        """Run a robot call; a bus failure or servo fault stops the layer and raises SafetyError."""
        try:
            return fn()
        except (BusError, PortError) as err:
            self.counts["faults"] += 1
            self.stopped = f"{type(err).__name__} while {what}: {err}"
            logger.error("%s: safe stop: %s", self.robot.name, self.stopped)
            self._watchdog_stop.set()
            raise SafetyError(f"{self.robot.name} stopped safely after {self.stopped}") from err

    def _apply_exit_policy(self) -> None:
        """Hold or disable; failures are logged, never raised (the bus may be gone)."""
        policy = self.config.on_exit
        self.robot.disable_torque_on_disconnect = policy == "disable"
        with self._lock:
            try:
                if policy == "disable":
                    self.robot.set_torque(False)
                elif self.last_commanded is not None and self.stopped is None:
                    self.robot.send_action(self.last_commanded)
            except HardwareError as err:
                logger.error("%s: exit policy '%s' could not be applied: %s", self.robot.name, policy, err)
            if self.stopped is None:
                self.stopped = f"closed (on_exit={policy})"

    def _watchdog_loop(self) -> None:
        period = self.config.watchdog_s / 4
        while not self._watchdog_stop.wait(period):
            try:
                self.poll_watchdog()
            except SafetyError:
                return  # the control loop sees the same error on its next send()

    def _install_signal_handlers(self) -> None:
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        self._old_handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers = {}


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"signal {signum}")


@contextmanager
def safe_control(robot: Robot, config: SafetyConfig | None = None) -> Iterator[SafetyLayer]:
    """Connect the robot, run the body under a ``SafetyLayer``, then disconnect with its torque policy."""
    robot.connect()
    try:
        with SafetyLayer(robot, config) as layer:
            yield layer
    finally:
        robot.disconnect()
