"""Dynamixel protocol 2.0: e-manual golden packets, CRC/stuffing vs dynamixel_sdk, the unchanged SDK
and DynamixelBus against the pty emulator, faults -> typed errors."""

from __future__ import annotations

import os
import termios
import tty
from collections.abc import Iterator

import dynamixel_sdk as sdk
import pytest
from hypothesis import given
from hypothesis import strategies as st

from molmoact2_edge.errors import BusTimeoutError, ChecksumError, PortError, ServoError
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.buses.dynamixel_tables import (
    BROADCAST_ID,
    Instruction,
    crc16,
    decode_error_flags,
    decode_frame,
    instruction_packet,
    status_packet,
    stuff,
    unstuff,
)
from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator
from tests._bus_helpers import wait_until

IDS = [1, 2, 3, 4, 5, 6]
FAST = 0.08  # timeout margin for fault tests: short, yet above the scheduling stalls of a loaded host
STUFFED_VALUE = 0x00FDFFFF  # little-endian bytes FF FF FD 00: must be byte-stuffed on the wire


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- golden packets -----------------------------------------------------------------------------
# Examples of the ROBOTIS e-manual "Protocol 2.0" page (ping, ping status of a model 1030 fw 0x26,
# read 4 B at 132, write 512 to 116, sync read 132/4 from ids 1-2, sync write 116/4 of 150 and 170).
# The reference (§2.3) gives the format but not these bytes; the CRCs are also checked below
# against dynamixel_sdk's own table-driven updateCRC.


@pytest.mark.parametrize(
    ("packet", "golden"),
    [
        (instruction_packet(1, Instruction.PING), "ff ff fd 00 01 03 00 01 19 4e"),
        (status_packet(1, 0, h("06 04 26")), "ff ff fd 00 01 07 00 55 00 06 04 26 65 5d"),
        (
            instruction_packet(1, Instruction.READ, h("84 00 04 00")),
            "ff ff fd 00 01 07 00 02 84 00 04 00 1d 15",
        ),
        (
            instruction_packet(1, Instruction.WRITE, h("74 00 00 02 00 00")),
            "ff ff fd 00 01 09 00 03 74 00 00 02 00 00 ca 89",
        ),
        (
            instruction_packet(BROADCAST_ID, Instruction.SYNC_READ, h("84 00 04 00 01 02")),
            "ff ff fd 00 fe 09 00 82 84 00 04 00 01 02 ce fa",
        ),
        (
            instruction_packet(
                BROADCAST_ID, Instruction.SYNC_WRITE, h("74 00 04 00 01 96 00 00 00 02 aa 00 00 00")
            ),
            "ff ff fd 00 fe 11 00 83 74 00 04 00 01 96 00 00 00 02 aa 00 00 00 82 87",
        ),
    ],
    ids=["ping", "ping-status", "read", "write", "sync-read", "sync-write"],
)
def test_emanual_golden_packets(packet: bytes, golden: str) -> None:
    assert packet == h(golden)


@given(st.binary(min_size=1, max_size=64))
def test_crc_matches_sdk(data: bytes) -> None:
    assert crc16(data) == sdk.PacketHandler(2.0).updateCRC(0, list(data), len(data))


@given(st.binary(max_size=48))
def test_stuffing_round_trip(payload: bytes) -> None:
    stuffed = stuff(payload)
    headers = [i for i in range(len(stuffed) - 2) if stuffed[i : i + 3] == b"\xff\xff\xfd"]
    assert all(stuffed[i + 3 : i + 4] == b"\xfd" for i in headers)  # no bare header left
    assert unstuff(stuffed) == payload
    frame = instruction_packet(1, Instruction.WRITE, payload)
    assert decode_frame(frame).params == payload


def test_stuffing_golden() -> None:
    # derived by hand from the spec: FF FF FD inside the payload gains one FD, and LEN counts it
    ours = instruction_packet(1, Instruction.WRITE, h("74 00 ff ff fd 00"))
    assert ours[:15] == h("ff ff fd 00 01 0a 00 03 74 00 ff ff fd fd 00")
    assert decode_frame(ours).params == h("74 00 ff ff fd 00")


def test_sdk_tx_stuffing_is_lost_and_emulator_accepts_both(emu: DynamixelEmulator) -> None:
    """dynamixel_sdk 4.1.0 ``txPacket`` discards the list ``addStuffing`` returns when it grows, so a
    payload containing FF FF FD goes out unstuffed (LEN 9, not 10). Pin that finding; the emulator
    accepts the SDK's bytes and the spec's stuffed bytes alike."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        port = sdk.PortHandler(os.ttyname(slave))
        assert port.openPort()
        sdk.PacketHandler(2.0).write4ByteTxOnly(port, 1, 116, STUFFED_VALUE)
        sent = os.read(master, 64)
        port.closePort()
    finally:
        os.close(master)
        os.close(slave)
    assert sent[:14] == h("ff ff fd 00 01 09 00 03 74 00 ff ff fd 00")
    assert decode_frame(sent).params == h("74 00 ff ff fd 00")  # its CRC is still valid
    fd = os.open(emu.port, os.O_RDWR | os.O_NOCTTY)
    attrs = termios.tcgetattr(fd)
    attrs[4] = attrs[5] = termios.B1000000  # the emulated servos listen at 1 Mbps only
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    try:
        for packet, value in (
            (sent, STUFFED_VALUE),
            (instruction_packet(1, Instruction.WRITE, h("74 00 ff ff fd 01")), 0x01FDFFFF),
        ):
            os.write(fd, packet)
            wait_until(lambda v=value: emu.get_register(1, "Goal_Position") == v)
    finally:
        os.close(fd)


def test_error_flags() -> None:
    assert decode_error_flags(0x07) == ("access_error",)
    assert decode_error_flags(0x80, hardware_status=0x24) == ("hardware_alert", "overheat", "overload")


# --- the unchanged SDK against the emulator -----------------------------------------------------


@pytest.fixture
def emu() -> Iterator[DynamixelEmulator]:
    with DynamixelEmulator(IDS) as emulator:
        yield emulator


def test_dynamixel_sdk_talks_to_emulator_unchanged(
    emu: DynamixelEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SDK's reply timeout is 2 x LATENCY_TIMER (16 ms) + 2 ms; widen it so a loaded CI host
    # that starves the emulator thread cannot fail the test (its protocol code is untouched)
    monkeypatch.setattr(sdk.port_handler, "LATENCY_TIMER", 250)
    port, packets = sdk.PortHandler(emu.port), sdk.PacketHandler(2.0)
    assert port.openPort()
    try:
        model, result, error = packets.ping(port, 3)
        assert (model, result, error) == (1020, sdk.COMM_SUCCESS, 0)
        assert packets.write1ByteTxRx(port, 2, 64, 1) == (sdk.COMM_SUCCESS, 0)
        assert emu.torque_enabled(2)

        writer = sdk.GroupSyncWrite(port, packets, 116, 4)
        for i in IDS:
            assert writer.addParam(i, list((1000 + i).to_bytes(4, "little")))
        assert writer.txPacket() == sdk.COMM_SUCCESS
        wait_until(lambda: emu.goal_positions() == {i: 1000 + i for i in IDS})

        emu.set_present_positions({1: STUFFED_VALUE, 4: -5})
        reader = sdk.GroupSyncRead(port, packets, 132, 4)
        for i in IDS:
            assert reader.addParam(i)
        assert reader.txRxPacket() == sdk.COMM_SUCCESS
        got = {i: reader.getData(i, 132, 4) for i in IDS}
        assert got[1] == STUFFED_VALUE  # stuffed by the emulator, unstuffed by the SDK
        assert got[4] == (-5) & 0xFFFFFFFF
        value, result, error = packets.read4ByteTxRx(port, 1, 132)
        assert (value, result, error) == (STUFFED_VALUE, sdk.COMM_SUCCESS, 0)

        assert packets.write4ByteTxRx(port, 3, 116, STUFFED_VALUE) == (sdk.COMM_SUCCESS, 0)
        assert emu.get_register(3, "Goal_Position") == STUFFED_VALUE  # unstuffed by the emulator
        monkeypatch.setattr(sdk.port_handler, "LATENCY_TIMER", 5)
        _, result, _ = packets.ping(port, 42)
        assert result == sdk.COMM_RX_TIMEOUT  # nobody home
    finally:
        port.closePort()


# --- DynamixelBus against the emulator ----------------------------------------------------------


@pytest.fixture
def bus(emu: DynamixelEmulator) -> Iterator[DynamixelBus]:
    with DynamixelBus(emu.port, timeout_margin_s=0.2) as b:
        yield b


def test_bus_round_trip(emu: DynamixelEmulator, bus: DynamixelBus) -> None:
    assert bus.ping(1) == 1020
    bus.sync_write("Return_Delay_Time", dict.fromkeys(IDS, 0))  # EEPROM: torque is still off
    assert bus.read("Return_Delay_Time", 6) == 0
    bus.write("Homing_Offset", 2, -100)
    assert emu.get_register(2, "Homing_Offset") == -100
    assert bus.read("Present_Position", 2) == 1948  # Present = Actual + Homing_Offset
    bus.sync_write("Torque_Enable", dict.fromkeys(IDS, 1))
    goals = {i: 2000 + i for i in IDS}
    bus.sync_write("Goal_Position", goals)
    wait_until(lambda: bus.sync_read("Present_Position", IDS) == goals)
    assert ("Goal_Position", 2001) in [(r.register, r.value) for r in emu.write_log if r.motor_id == 1]


def test_eeprom_write_with_torque_on_is_an_access_error(emu: DynamixelEmulator, bus: DynamixelBus) -> None:
    bus.write("Torque_Enable", 1, 1)
    with pytest.raises(
        ServoError, match=r"Homing_Offset \(address 20, 4 B\).*motor 1 reported access_error"
    ) as info:
        bus.write("Homing_Offset", 1, 5)
    assert info.value.flags == ("access_error",)
    assert emu.get_register(1, "Homing_Offset") == 0


def test_hardware_alert_names_the_fault(emu: DynamixelEmulator, bus: DynamixelBus) -> None:
    emu.set_register(4, "Hardware_Error_Status", 0x20)
    with pytest.raises(ServoError, match="motor 4 reported hardware_alert, overload") as info:
        bus.sync_read("Present_Position", IDS)
    assert info.value.motor_id == 4


def test_faults_map_to_typed_errors(emu: DynamixelEmulator) -> None:
    with DynamixelBus(emu.port, timeout_margin_s=FAST, retries=1) as bus:
        emu.inject_fault("silence", motor_id=6)
        with pytest.raises(BusTimeoutError, match="failed after 2 attempts: no status packet from motor 6"):
            bus.sync_read("Present_Position", IDS)
        emu.clear_faults()
        emu.inject_fault("corrupt_checksum", motor_id=2, count=1)
        assert bus.read("Present_Position", 2) == 2048  # one corrupt reply, then the retry succeeds
        emu.inject_fault("corrupt_checksum", motor_id=2)
        with pytest.raises(ChecksumError, match="incorrect status packet from motor 2"):
            bus.read("Present_Position", 2)
        emu.clear_faults()
        emu.inject_fault("unplug")
        with pytest.raises(PortError, match="unplugged"):
            bus.sync_read("Present_Position", IDS)
        assert not bus.is_connected
