"""Damiao MIT frames (goldens worked by hand from the protocol reference) and driver vs emulator.

The harmless part (parameters, refresh, enable with zero gains) also runs on a real chain, opt-in:

    MOLMO_EDGE_CAN_CHANNEL=can0 MOLMO_EDGE_CAN_MOTORS=1:dm4340,2:dm4340,...,7:dm4310 \\
        pytest tests/test_damiao.py -m hardware
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from molmoact2_edge.errors import BusTimeoutError, PortError, ServoError
from molmoact2_edge.hardware.buses.damiao import (
    DAMIAO_MODELS,
    DamiaoBus,
    MitCommand,
    MotorState,
    decode_feedback,
    float_to_uint,
    pack_mit,
    param_frame,
    special_command,
    unpack_mit,
)
from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator

DM4340, DM4310 = DAMIAO_MODELS["dm4340"], DAMIAO_MODELS["dm4310"]
_channels = itertools.count()


# (command, model, expected bytes) -- each value worked out by hand:
# u = trunc((x - min) / (max - min) * (2**bits - 1)); p 16 bit, v/kp/kd/t 12 bit, big-endian packing.
GOLDEN_MIT = [
    # all zero on a DM4340: p 0x7FFF, v 0x7FF, kp 0, kd 0, t 0x7FF
    (MitCommand(), DM4340, "7fff7ff0000007ff"),
    # extremes on a DM4310: p +12.5 -> 0xFFFF, v -30 -> 0, kp 500 -> 0xFFF, kd 5 -> 0xFFF, t -10 -> 0
    (MitCommand(12.5, -30.0, 500.0, 5.0, -10.0), DM4310, "ffff000fffff f000".replace(" ", "")),
    # YAM joint gains: p 1 rad -> 35388 (0x8A3C), v 0 -> 0x7FF, kp 80 -> 655 (0x28F), kd 1.5 -> 1228 (0x4CC), t 0 -> 0x7FF
    (MitCommand(1.0, 0.0, 80.0, 1.5, 0.0), DM4340, "8a3c7ff28f4cc7ff"),
    # out-of-range values clamp instead of wrapping: p 20 -> 0xFFFF, kp -1 -> 0
    (MitCommand(20.0, 0.0, -1.0, 0.0, 0.0), DM4340, "ffff7ff000000" + "7ff"),
]


@pytest.mark.parametrize(
    ("cmd", "model", "expected"), GOLDEN_MIT, ids=["zero", "extremes", "yam-gains", "clamped"]
)
def test_mit_frame_goldens(cmd: MitCommand, model, expected: str) -> None:
    assert pack_mit(cmd, model).hex() == expected


def test_feedback_golden() -> None:
    # state 1 (enabled) | id 1; p 0x8000; v 0x800; t 0x7FF; 35 and 38 degC
    fb = decode_feedback(bytes.fromhex("1180008007ff2326"), DM4340)
    assert (fb.motor_id, fb.state, fb.t_mos, fb.t_rotor) == (1, MotorState.ENABLED, 35, 38)
    assert fb.position == pytest.approx(32768 * 25 / 65535 - 12.5)
    assert fb.velocity == pytest.approx(2048 * 20 / 4095 - 10)
    assert fb.torque == pytest.approx(2047 * 56 / 4095 - 28)
    assert decode_feedback(bytes.fromhex("d180008007ff2326"), DM4340).state == MotorState.LOST_COMMUNICATION


def test_special_and_parameter_frames() -> None:
    assert special_command(0xFC).hex() == "fffffffffffffffc"
    # read RID 9 (timeout) of motor 3; write 8000 (0x1F40) little-endian
    assert param_frame(3, 0x33, 9).hex() == "0300330900000000"
    assert param_frame(3, 0x55, 9, (8000).to_bytes(4, "little")).hex() == "03005509401f0000"


@given(
    p=st.floats(-12.5, 12.5),
    v=st.floats(-10, 10),
    kp=st.floats(0, 500),
    kd=st.floats(0, 5),
    t=st.floats(-28, 28),
)
def test_mit_round_trip_within_one_quantization_step(
    p: float, v: float, kp: float, kd: float, t: float
) -> None:
    back = unpack_mit(pack_mit(MitCommand(p, v, kp, kd, t), DM4340), DM4340)
    assert abs(back.position - p) <= 25 / 65535 + 1e-9
    assert abs(back.velocity - v) <= 20 / 4095 + 1e-9
    assert abs(back.kp - kp) <= 500 / 4095 + 1e-9
    assert abs(back.kd - kd) <= 5 / 4095 + 1e-9
    assert abs(back.torque - t) <= 56 / 4095 + 1e-9
    assert 0 <= float_to_uint(p, -12.5, 12.5, 16) <= 65535


# --- driver against the emulator ------------------------------------------------------------

MOTORS = {1: "dm4340", 2: "dm4340", 7: "dm4310"}


@pytest.fixture
def chain():
    channel = f"test-dm-{next(_channels)}"
    emulator = DamiaoEmulator(MOTORS, channel=channel, command_timeout_s=0.1)
    emulator.start()
    # 200 ms: the emulator's thread shares the GIL with whatever else the suite left running;
    # a loaded CI machine once starved it past 50 ms twice in a row.
    bus = DamiaoBus(channel, MOTORS, interface="virtual", reply_timeout_s=0.2, retries=1)
    bus.connect()
    yield bus, emulator
    bus.disconnect()
    emulator.stop()


def test_enable_mit_tracks_and_reports(chain) -> None:
    bus, emu = chain
    assert {i: fb.state for i, fb in bus.enable().items()} == dict.fromkeys(MOTORS, MotorState.ENABLED)
    target = {1: 0.5, 2: -0.3, 7: 0.1}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        feedback = bus.mit({i: MitCommand(position=p, kp=80.0, kd=1.5) for i, p in target.items()})
        if all(abs(feedback[i].position - p) < 0.01 for i, p in target.items()):
            break
        time.sleep(0.005)
    assert all(abs(emu.positions()[i] - p) < 0.01 for i, p in target.items())
    assert emu.targets()[1].kp == pytest.approx(80.0, abs=0.2)


def test_parameters_read_write_and_timeout(chain) -> None:
    bus, emu = chain
    assert bus.read("Timeout", 1) == 2000  # 0.1 s / 50 us
    bus.set_command_timeout(2, 0.4)
    assert bus.read("Timeout", 2) == 8000
    assert bus.ping(7) == 7
    assert bus.read_param_float(1, "TMAX") == pytest.approx(28.0)
    assert bus.sync_read("Master_ID", [1, 2]) == {1: 0x11, 2: 0x12}


def test_command_timeout_drops_to_damping_and_is_reported(chain) -> None:
    bus, emu = chain
    bus.enable()
    bus.mit({i: MitCommand(position=0.0, kp=20.0, kd=0.5) for i in MOTORS})
    time.sleep(0.25)  # > 100 ms without a command
    assert emu.state(1) == MotorState.LOST_COMMUNICATION
    held = emu.positions()[1]
    with pytest.raises(ServoError, match="LOST_COMMUNICATION") as info:
        bus.mit({i: MitCommand(position=0.2, kp=20.0) for i in MOTORS})
    assert info.value.motor_id == 1
    # the motor did not follow the new target while in damping
    time.sleep(0.02)
    assert emu.positions()[1] == held
    bus.clear_error()
    assert all(fb.state == MotorState.ENABLED for fb in bus.enable().values())


def test_silent_motor_times_out_naming_it(chain) -> None:
    bus, emu = chain
    emu.inject_fault(2, silent=True)
    with pytest.raises(BusTimeoutError, match=r"motor\(s\) \[2\]") as info:
        bus.refresh()
    assert "2 attempts" in str(info.value)


def test_injected_fault_state_is_a_servo_error(chain) -> None:
    bus, emu = chain
    bus.enable()
    emu.inject_fault(7, MotorState.ROTOR_OVER_TEMPERATURE)
    with pytest.raises(ServoError, match="ROTOR_OVER_TEMPERATURE"):
        bus.refresh()
    # a disable still goes through and reports the fault without raising
    assert bus.disable()[7].state == MotorState.ROTOR_OVER_TEMPERATURE


def test_missing_channel_is_a_port_error() -> None:
    with pytest.raises(PortError, match="can_missing"):
        DamiaoBus("can_missing", MOTORS, interface="socketcan").connect()


# --- the part that also runs on a real chain --------------------------------------------------


@pytest.fixture(
    params=[pytest.param(False, id="emulated"), pytest.param(True, id="hardware", marks=pytest.mark.hardware)]
)
def any_chain(request: pytest.FixtureRequest) -> Iterator[tuple[DamiaoBus, list[int]]]:
    if request.param:
        channel, spec = os.environ.get("MOLMO_EDGE_CAN_CHANNEL"), os.environ.get("MOLMO_EDGE_CAN_MOTORS")
        if not channel or not spec:
            pytest.skip(
                "set MOLMO_EDGE_CAN_CHANNEL and MOLMO_EDGE_CAN_MOTORS (id:model,...) to run on a real chain"
            )
        motors = {int(i): m for i, m in (item.split(":") for item in spec.split(","))}
        bus = DamiaoBus(channel, motors, interface=os.environ.get("MOLMO_EDGE_CAN_INTERFACE", "socketcan"))
        with bus:
            yield bus, sorted(motors)
        return
    channel = f"test-dm-{next(_channels)}"
    emulator = DamiaoEmulator(MOTORS, channel=channel)
    with emulator, DamiaoBus(channel, MOTORS, interface="virtual", reply_timeout_s=0.2) as bus:
        yield bus, sorted(MOTORS)


def test_chain_answers_without_faults_and_keeps_its_watchdog(any_chain) -> None:
    bus, ids = any_chain
    feedback = bus.refresh(ids)
    assert sorted(feedback) == ids
    assert all(not fb.state.is_fault for fb in feedback.values())
    assert all(bus.read("Timeout", i) > 0 for i in ids)  # the drive's command timeout is on
    assert bus.sync_read("Master_ID", ids) == {i: i + 0x10 for i in ids}


def test_zero_gain_enable_does_not_move(any_chain) -> None:
    bus, ids = any_chain
    before = {i: fb.position for i, fb in bus.refresh(ids).items()}
    try:
        bus.enable(ids)
        for _ in range(5):
            feedback = bus.mit({i: MitCommand(position=before[i]) for i in ids})  # kp = kd = tau = 0
            time.sleep(0.01)
        assert all(fb.state == MotorState.ENABLED for fb in feedback.values())
    finally:
        bus.disable(ids)
    after = bus.refresh(ids)
    assert all(abs(after[i].position - before[i]) < 0.05 for i in ids)
