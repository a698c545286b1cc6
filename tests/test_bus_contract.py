"""The Bus contract, written once and run against every serial bus: on its emulator here, and on a
real chain when one is attached (python-can back-to-back style).

Hardware runs are opt-in and only touch RAM registers with torque off, writing back what they read:

    MOLMO_EDGE_FEETECH_PORT=/dev/ttyACM0 MOLMO_EDGE_FEETECH_IDS=1,2,3,4,5,6 \\
        pytest tests/test_bus_contract.py -m hardware
    MOLMO_EDGE_DYNAMIXEL_PORT=/dev/ttyUSB0 MOLMO_EDGE_DYNAMIXEL_IDS=1,2,3,4,5,6 ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from molmoact2_edge.errors import BusTimeoutError
from molmoact2_edge.hardware.buses.base import Bus
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.buses.feetech import FeetechBus
from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
from molmoact2_edge.hardware.emulators.serial_chain import SerialServoChain

ABSENT_ID = 250  # no chain we test has it


@dataclass(frozen=True)
class Target:
    name: str
    bus_cls: type[Bus]
    emulator_cls: type[SerialServoChain]
    env: str  # prefix of the opt-in environment variables for a real chain
    hardware: bool


TARGETS = [
    Target(f"{name}-{kind}", bus_cls, emu_cls, env, kind == "hardware")
    for name, bus_cls, emu_cls, env in (
        ("feetech", FeetechBus, FeetechEmulator, "MOLMO_EDGE_FEETECH"),
        ("dynamixel", DynamixelBus, DynamixelEmulator, "MOLMO_EDGE_DYNAMIXEL"),
    )
    for kind in ("emulated", "hardware")
]


@pytest.fixture(
    params=[pytest.param(t, id=t.name, marks=[pytest.mark.hardware] if t.hardware else []) for t in TARGETS]
)
def chain(request: pytest.FixtureRequest) -> Iterator[tuple[Bus, list[int]]]:
    target: Target = request.param
    with ExitStack() as stack:
        if target.hardware:
            port, ids = os.environ.get(f"{target.env}_PORT"), os.environ.get(f"{target.env}_IDS")
            if not port or not ids:
                pytest.skip(f"set {target.env}_PORT and {target.env}_IDS to run against a real chain")
            motor_ids = [int(i) for i in ids.split(",")]
        else:
            motor_ids = [1, 2, 3, 4, 5, 6]
            port = stack.enter_context(target.emulator_cls(motor_ids)).port
        bus = stack.enter_context(target.bus_cls(port, timeout_margin_s=0.2))  # type: ignore[call-arg]
        yield bus, motor_ids


def test_every_motor_answers_ping_with_a_known_model(chain: tuple[Bus, list[int]]) -> None:
    bus, ids = chain
    for motor_id in ids:
        assert bus.ping(motor_id) in bus.model_numbers


def test_sync_read_agrees_with_single_reads(chain: tuple[Bus, list[int]]) -> None:
    bus, ids = chain
    assert bus.sync_read("ID", ids) == {i: bus.read("ID", i) for i in ids} == {i: i for i in ids}
    positions = bus.sync_read("Present_Position", ids)
    assert sorted(positions) == sorted(ids)
    assert all(isinstance(v, int) for v in positions.values())


def test_goal_write_round_trip_with_torque_off(chain: tuple[Bus, list[int]]) -> None:
    bus, ids = chain
    assert bus.sync_read("Torque_Enable", ids) == dict.fromkeys(ids, 0), "contract runs need torque off"
    original = bus.sync_read("Goal_Position", ids)
    present = bus.sync_read("Present_Position", ids)
    try:
        bus.sync_write("Goal_Position", present)  # with torque off nothing moves
        assert bus.sync_read("Goal_Position", ids) == present
        bus.write("Goal_Position", ids[0], present[ids[0]] + 1)
        assert bus.read("Goal_Position", ids[0]) == present[ids[0]] + 1
    finally:
        bus.sync_write("Goal_Position", original)


def test_absent_motor_times_out_within_bounded_retries(chain: tuple[Bus, list[int]]) -> None:
    bus, _ = chain
    bus.retries = 1
    with pytest.raises(BusTimeoutError, match=f"motor {ABSENT_ID} failed after 2 attempts"):
        bus.ping(ABSENT_ID)
