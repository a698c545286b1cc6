"""Fault injection shared by the emulators: what ``molmo-edge emulate ... --faults`` and the soak
tests inject into the replies of emulated servos and drives.

A ``FaultInjector`` holds the active faults and decides, reply by reply, what happens to it; the
emulator applies the decision in its own protocol (a corrupt Feetech checksum, a Dynamixel CRC, a
CAN frame). Kinds:

================  =============================================================================
kind              effect on a reply
================  =============================================================================
``drop_reply``    lost
``corrupt_checksum``  last byte flipped (serial). CAN: the controller drops a frame that fails
                  the CAN CRC, so on CAN this is a drop
``delay``         sent ``delay_s`` late (a late reply: past the driver's deadline by default)
``truncate``      only its first half is sent (CAN: a frame with fewer than 8 data bytes)
``wrong_id``      carries an id nobody asked for (serial: an id not on the chain; CAN: the
                  frame of one motor arrives on another motor's master id)
``silence``       the servo is gone: no reply, for ``duration_s`` or until cleared
``unplug``        the port goes away (handled by the emulator itself)
================  =============================================================================

``parse_faults`` reads the CLI spelling, e.g. ``drop=0.01,corrupt=0.005,late=0.002,late_ms=30,
truncate=0.002,wrong_id=0.001,silence=5@10+2,unplug=60,seed=7``: probabilities per reply, motor 5
silent from 10 s after the start for 2 s, the port unplugged 60 s after the start.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from molmoact2_edge.errors import ConfigError

FAULT_KINDS = ("drop_reply", "corrupt_checksum", "delay", "truncate", "wrong_id", "silence", "unplug")

# CLI spelling -> kind (per-reply probabilities)
PROBABILITY_KEYS = {
    "drop": "drop_reply",
    "corrupt": "corrupt_checksum",
    "late": "delay",
    "truncate": "truncate",
    "wrong_id": "wrong_id",
}
DEFAULT_LATE_S = 0.02  # longer than the drivers' 10 ms reply margin: a late reply misses its deadline


@dataclass
class Fault:
    kind: str
    motor_id: int | None  # None = every servo
    count: int | None  # replies left to affect; None = until cleared
    probability: float | None  # chance per reply; None = always
    delay_s: float
    until: float | None  # time.monotonic() after which the fault is gone; None = no end

    def matches(self, motor_id: int, now: float) -> bool:
        return (self.motor_id is None or self.motor_id == motor_id) and (
            self.until is None or now < self.until
        )


@dataclass(frozen=True)
class ReplyFaults:
    """What to do to one reply that is still sent."""

    delay_s: float = 0.0
    corrupt: bool = False
    truncate: bool = False
    wrong_id: bool = False


class FaultInjector:
    """The active faults of one emulator; seeded, so a soak is reproducible. Not thread-safe on its
    own: the emulator calls it under its lock."""

    def __init__(self, seed: int = 0):
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)
        self.counts: Counter[str] = Counter()  # replies each kind hit so far

    def add(
        self,
        kind: str,
        motor_id: int | None = None,
        count: int | None = None,
        probability: float | None = None,
        delay_s: float | None = None,
        duration_s: float | None = None,
    ) -> None:
        if kind not in FAULT_KINDS or kind == "unplug":
            known = ", ".join(k for k in FAULT_KINDS if k != "unplug")
            raise ConfigError(f"unknown reply fault {kind!r}; known: {known} (and unplug)")
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise ConfigError(f"fault probability must be in 0..1, got {probability}")
        until = time.monotonic() + duration_s if duration_s is not None else None
        self._faults.append(Fault(kind, motor_id, count, probability, delay_s or 0.0, until))

    def clear(self) -> None:
        self._faults.clear()

    def decide(self, motor_id: int) -> ReplyFaults | None:
        """The faults hitting the next reply of ``motor_id``; ``None`` = the reply is lost."""
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.until is None or now < f.until]
        delay, corrupt, truncate, wrong_id = 0.0, False, False, False
        for fault in list(self._faults):
            if not fault.matches(motor_id, now):
                continue
            if fault.probability is not None and self._rng.random() >= fault.probability:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
            self.counts[fault.kind] += 1
            if fault.kind in ("drop_reply", "silence"):
                return None
            delay += fault.delay_s if fault.kind == "delay" else 0.0
            corrupt |= fault.kind == "corrupt_checksum"
            truncate |= fault.kind == "truncate"
            wrong_id |= fault.kind == "wrong_id"
        return ReplyFaults(delay, corrupt, truncate, wrong_id)


# --- the CLI spelling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Silence:
    motor_id: int
    start_s: float  # after the plan is applied
    duration_s: float


@dataclass(frozen=True)
class FaultPlan:
    """A parsed ``--faults`` spec."""

    probabilities: dict[str, float] = field(default_factory=dict)  # kind -> per-reply probability
    late_s: float = DEFAULT_LATE_S
    silences: tuple[Silence, ...] = ()
    unplug_after_s: float | None = None
    seed: int = 0


FAULTS_HELP = (
    "comma-separated: drop=P, corrupt=P, late=P (late_ms=MS, default 20), truncate=P, wrong_id=P "
    "(P = probability per reply), silence=ID@T+D (motor ID silent from T s for D s), unplug=T "
    "(the port goes away after T s), seed=N"
)


def parse_faults(spec: str) -> FaultPlan:
    """``"drop=0.01,corrupt=0.005,silence=5@10+2,unplug=60"`` -> ``FaultPlan``; ``ConfigError`` if malformed."""
    probabilities: dict[str, float] = {}
    late_s, silences, unplug, seed = DEFAULT_LATE_S, [], None, 0
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key in PROBABILITY_KEYS:
                p = float(value)
                if not 0.0 <= p <= 1.0:
                    raise ValueError("a probability is between 0 and 1")
                probabilities[PROBABILITY_KEYS[key]] = p
            elif key == "late_ms":
                late_s = float(value) / 1000
            elif key == "silence":
                motor, _, window = value.partition("@")
                start, _, duration = window.partition("+")
                silences.append(Silence(int(motor), float(start), float(duration)))
            elif key == "unplug":
                unplug = float(value)
            elif key == "seed":
                seed = int(value)
            else:
                raise ValueError(f"unknown key {key!r}")
        except ValueError as err:
            raise ConfigError(f"--faults: cannot read {item!r} ({err}); {FAULTS_HELP}") from None
    return FaultPlan(probabilities, late_s, tuple(silences), unplug, seed)


class FaultSchedule:
    """Applies a ``FaultPlan`` to a running emulator: the per-reply faults at once, the timed silences
    and the unplug on timers. ``cancel()`` stops what has not fired yet."""

    def __init__(
        self,
        plan: FaultPlan,
        inject: Callable[
            ..., None
        ],  # inject(kind, motor_id=..., probability=..., delay_s=..., duration_s=...)
        unplug: Callable[[], None],
    ):
        for kind, probability in plan.probabilities.items():
            inject(kind, probability=probability, delay_s=plan.late_s if kind == "delay" else None)
        self._timers = [
            threading.Timer(
                s.start_s, inject, ("silence",), {"motor_id": s.motor_id, "duration_s": s.duration_s}
            )
            for s in plan.silences
        ]
        if plan.unplug_after_s is not None:
            self._timers.append(threading.Timer(plan.unplug_after_s, unplug))
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()
