"""Register encodings and control tables (hardware/buses/registers.py + vendor tables)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from molmoact2_edge.errors import RegisterError
from molmoact2_edge.hardware.buses.dynamixel_tables import X_SERIES_CONTROL_TABLE
from molmoact2_edge.hardware.buses.feetech_tables import STS3215_CONTROL_TABLE
from molmoact2_edge.hardware.buses.registers import (
    TWOS_COMPLEMENT,
    ControlTable,
    Register,
    SignMagnitude,
)


@pytest.mark.parametrize(
    ("bit", "value", "raw"),
    [
        (15, 2048, 0x0800),
        (15, -2048, 0x8800),  # sign bit 15 + magnitude
        (11, -100, 0x0864),  # Homing_Offset: 1 << 11 | 100
        (11, 2047, 0x07FF),
        (11, -2047, 0x0FFF),
        (10, -1, 0x0401),  # Present_Load
        (15, 0, 0),
    ],
    ids=["pos", "neg-pos", "offset-neg", "offset-max", "offset-min", "load-neg", "zero"],
)
def test_sign_magnitude_golden(bit: int, value: int, raw: int) -> None:
    # values worked by hand from LeRobot encoding_utils: encoded = (1 << bit) | |v| for v < 0
    enc = SignMagnitude(bit)
    assert enc.encode(value, 2) == raw
    assert enc.decode(raw, 2) == value


@given(bit=st.sampled_from([10, 11, 15]), data=st.data())
def test_sign_magnitude_round_trip(bit: int, data: st.DataObject) -> None:
    limit = (1 << bit) - 1
    value = data.draw(st.integers(-limit, limit))
    reg = Register("X", 0, 2, SignMagnitude(bit))
    assert reg.from_bytes(reg.to_bytes(value)) == value
    assert reg.encode(value) < (1 << (bit + 1))  # nothing above the sign bit is ever set


@given(size=st.sampled_from([1, 2, 4]), data=st.data())
def test_twos_complement_round_trip(size: int, data: st.DataObject) -> None:
    half = 1 << (8 * size - 1)
    value = data.draw(st.integers(-half, half - 1))
    reg = Register("X", 0, size, TWOS_COMPLEMENT)
    assert reg.from_bytes(reg.to_bytes(value)) == value
    assert reg.to_bytes(value) == value.to_bytes(size, "little", signed=True)


def test_out_of_range_value_names_register_and_range() -> None:
    reg = STS3215_CONTROL_TABLE["Homing_Offset"]
    # the classic calibration crash (LeRobot #1296): an offset past 11 bits
    with pytest.raises(
        RegisterError, match=r"2114 does not fit register Homing_Offset \(address 31.*-2047..2047"
    ):
        reg.encode(2114)
    with pytest.raises(RegisterError, match="0..255"):
        STS3215_CONTROL_TABLE["Torque_Enable"].encode(-1)


def test_unknown_register_suggests_close_names() -> None:
    with pytest.raises(RegisterError, match="did you mean Present_Position"):
        STS3215_CONTROL_TABLE["Present_Postion"]
    with pytest.raises(RegisterError, match="not in the x_series control table"):
        X_SERIES_CONTROL_TABLE.resolve(STS3215_CONTROL_TABLE["Goal_Position"])


def test_duplicate_register_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate register A"):
        ControlTable("m", [Register("A", 0, 1), Register("A", 1, 1)])


@pytest.mark.parametrize(
    ("name", "address", "size"),
    [
        ("Model_Number", 3, 2),
        ("ID", 5, 1),
        ("Homing_Offset", 31, 2),
        ("Torque_Enable", 40, 1),
        ("Goal_Position", 42, 2),
        ("Lock", 55, 1),
        ("Present_Position", 56, 2),
        ("Present_Temperature", 63, 1),
        ("Present_Current", 69, 2),
        ("Maximum_Acceleration", 85, 1),
    ],
)
def test_sts3215_addresses_match_reference(name: str, address: int, size: int) -> None:
    reg = STS3215_CONTROL_TABLE[name]
    assert (reg.address, reg.size) == (address, size)


@pytest.mark.parametrize(
    ("name", "address", "size"),
    [
        ("Model_Number", 0, 2),
        ("ID", 7, 1),
        ("Return_Delay_Time", 9, 1),
        ("Homing_Offset", 20, 4),
        ("Torque_Enable", 64, 1),
        ("Hardware_Error_Status", 70, 1),
        ("Bus_Watchdog", 98, 1),
        ("Goal_Position", 116, 4),
        ("Present_Position", 132, 4),
        ("Present_Temperature", 146, 1),
    ],
)
def test_x_series_addresses_match_reference(name: str, address: int, size: int) -> None:
    reg = X_SERIES_CONTROL_TABLE[name]
    assert (reg.address, reg.size) == (address, size)


def test_default_memory_places_encoded_defaults() -> None:
    memory = STS3215_CONTROL_TABLE.default_memory()
    assert memory[3:5] == (777).to_bytes(2, "little")  # STS3215 model number
    assert memory[56:58] == (2048).to_bytes(2, "little")
    assert len(memory) == STS3215_CONTROL_TABLE.memory_size() == 87
    dxl = X_SERIES_CONTROL_TABLE.default_memory()
    assert dxl[9] == 250  # factory Return_Delay_Time = 500 us
