"""Shared test setup for the hardware tests: an emulated SO-101 with a known calibration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from molmoact2_edge.hardware.buses.feetech import FeetechBus
from molmoact2_edge.hardware.calibration import MotorCalibration
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
from molmoact2_edge.hardware.robots.so101 import SO101, SO101_JOINTS

# offsets 0 keep emulator steps = calibrated steps; ranges as a LeRobot calibration would record
CALIBRATION = {
    name: MotorCalibration(id=i + 1, drive_mode=0, homing_offset=0, range_min=1000, range_max=3000)
    for i, name in enumerate(SO101_JOINTS)
}


@contextmanager
def emulated_so101(
    start_steps: int = 2048, bus_kwargs: dict | None = None, **robot_kwargs
) -> Iterator[tuple[SO101, FeetechEmulator]]:
    """An SO-101 on an emulated chain; ``bus_kwargs`` go to its ``FeetechBus`` (timeouts, retries)."""
    emulator = FeetechEmulator(range(1, 7), seed=0)
    port = emulator.start()
    emulator.set_present_positions(dict.fromkeys(range(1, 7), start_steps))
    # 50 ms deadline margin by default: the emulator is a Python thread on a shared CI box
    bus = FeetechBus(port, **({"timeout_margin_s": 0.05} if bus_kwargs is None else bus_kwargs))
    robot = SO101(port, CALIBRATION, bus=bus, **robot_kwargs)
    try:
        yield robot, emulator
    finally:
        if robot.bus.is_connected:
            robot.bus.disconnect()
        emulator.stop()


def goal_writes(emulator: FeetechEmulator, at_least: int = 0, timeout_s: float = 1.0) -> list[int]:
    """Goal_Position values in the emulator's write log; SYNC_WRITE has no reply, so wait until
    the emulator thread has applied ``at_least`` of them."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        goals = [r.value for r in list(emulator.write_log) if r.register == "Goal_Position"]
        if len(goals) >= at_least or time.monotonic() > deadline:
            return goals
        time.sleep(0.001)


class FakeClock:
    """A ``time.monotonic`` stand-in the test advances by hand (thousands of ticks without sleeping)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
