"""Feetech FT-SCS protocol: golden packets, FeetechBus against the pty emulator, faults -> typed errors."""

from __future__ import annotations

import os
import threading
import time
import tty
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact2_edge.errors import (
    BusError,
    BusTimeoutError,
    ChecksumError,
    PortError,
    RegisterError,
    ServoError,
)
from molmoact2_edge.hardware.buses.feetech import (
    BROADCAST_ID,
    FeetechBus,
    Instruction,
    checksum,
    decode_error_flags,
    decode_frame,
    find_frame,
    instruction_packet,
    status_packet,
    transaction_timeout_s,
)
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator
from tests._bus_helpers import wait_until

IDS = [1, 2, 3, 4, 5, 6]
FAST = 0.08  # timeout margin for fault tests: short, yet above the scheduling stalls of a loaded host


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- golden packets -----------------------------------------------------------------------------
# Ping/read/write are the examples of the Feetech STS manual (ping id 1; read 2 bytes at 0x38;
# move id 1 to 2048 at speed 1000). The reference quotes the format but no example bytes, so every
# checksum below was also worked by hand: CHK = ~(ID + LEN + INSTR + sum(params)) & 0xFF.


@pytest.mark.parametrize(
    ("packet", "golden"),
    [
        (instruction_packet(1, Instruction.PING), "ff ff 01 02 01 fb"),  # ~(1+2+1) = ~0x04
        (instruction_packet(1, Instruction.READ, h("38 02")), "ff ff 01 04 02 38 02 be"),  # ~0x41
        (
            instruction_packet(1, Instruction.WRITE, h("2a 00 08 00 00 e8 03")),
            "ff ff 01 09 03 2a 00 08 00 00 e8 03 d5",  # sum 0x12a -> ~0x2a
        ),
        (
            # SYNC_READ Present_Position (56, 2 B) from ids 1..6: 8 + N = 14 bytes (reference §4)
            instruction_packet(BROADCAST_ID, Instruction.SYNC_READ, h("38 02 01 02 03 04 05 06")),
            "ff ff fe 0a 82 38 02 01 02 03 04 05 06 26",  # sum 0x1d9 -> ~0xd9
        ),
        (
            # SYNC_WRITE Goal_Position (42, 2 B): id 1 -> 2048, id 2 -> 1024
            instruction_packet(BROADCAST_ID, Instruction.SYNC_WRITE, h("2a 02 01 00 08 02 00 04")),
            "ff ff fe 0a 83 2a 02 01 00 08 02 00 04 39",  # sum 0x1c6 -> ~0xc6
        ),
        (status_packet(1, 0), "ff ff 01 02 00 fc"),  # ping reply
        (status_packet(1, 0, h("00 08")), "ff ff 01 04 00 00 08 f2"),  # Present_Position 2048
        (status_packet(3, 0x20), "ff ff 03 02 20 da"),  # overload flag: ~(3+2+0x20)
    ],
    ids=["ping", "read", "write", "sync-read", "sync-write", "status", "status-data", "status-err"],
)
def test_golden_packets(packet: bytes, golden: str) -> None:
    assert packet == h(golden)
    assert decode_frame(packet).params == packet[5:-1]


def test_checksum_excludes_header() -> None:
    assert checksum(h("01 02 01")) == 0xFB


def test_frame_search_skips_noise_and_waits_for_more() -> None:
    stream = h("00 ff 13") + instruction_packet(1, Instruction.PING)
    start, end = find_frame(stream)  # type: ignore[misc]
    assert stream[start:end] == h("ff ff 01 02 01 fb")
    assert find_frame(stream[:-1]) is None
    # FF FF FF 01: the first FF is noise, the header is the next two
    assert find_frame(h("ff ff ff 01 02 01 fb")) == (1, 7)


def test_bad_checksum_is_a_checksum_error() -> None:
    with pytest.raises(ChecksumError, match="checksum 0xfa != 0xfb"):
        decode_frame(h("ff ff 01 02 01 fa"))


def test_error_byte_flags() -> None:
    assert decode_error_flags(0x01) == ("voltage",)
    assert decode_error_flags(0x24) == ("overheat", "overload")
    assert decode_error_flags(0x0A) == ("angle_sensor", "overcurrent")


def test_timeout_matches_reference_wire_budget() -> None:
    # reference §4: 6-servo SYNC_READ of Present_Position = 14 + 6 x 8 = 62 bytes = 620 us at 1 Mbps
    assert transaction_timeout_s(14, 48, 6, 1_000_000, 0.0, 0.0) == pytest.approx(620e-6)
    assert transaction_timeout_s(14, 48, 6, 1_000_000, 100e-6, 0.01) == pytest.approx(620e-6 + 600e-6 + 0.01)
    assert transaction_timeout_s(14, 48, 6, 115_200, 0.0, 0.0) == pytest.approx(62 * 10 / 115_200)
    values = bytes(x for i in IDS for x in (i, 0, 8))
    assert len(instruction_packet(BROADCAST_ID, Instruction.SYNC_WRITE, h("2a 02") + values)) == 26  # 260 us


# --- the bus on the wire (raw pty, hand-built replies) ------------------------------------------


@pytest.fixture
def raw_pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += os.read(fd, n - len(data))
    return data


def test_bus_sends_golden_bytes_and_parses_golden_replies(raw_pty: tuple[int, str]) -> None:
    master, port = raw_pty
    with FeetechBus(port, timeout_margin_s=0.5) as bus:
        bus.sync_write("Goal_Position", {1: 2048, 2: 1024})
        assert _read_exact(master, 14) == h("ff ff fe 0a 83 2a 02 01 00 08 02 00 04 39")

        def servo() -> None:
            assert _read_exact(master, 14) == h("ff ff fe 0a 82 38 02 01 02 03 04 05 06 26")
            # replies out of order and with a byte of line noise first: both must be tolerated
            os.write(
                master,
                b"\x00" + b"".join(status_packet(i, 0, (1000 + i).to_bytes(2, "little")) for i in IDS[::-1]),
            )

        thread = threading.Thread(target=servo)
        thread.start()
        assert bus.sync_read("Present_Position", IDS) == {i: 1000 + i for i in IDS}
        thread.join()


# --- the bus against the emulator ---------------------------------------------------------------


@pytest.fixture
def emu() -> Iterator[FeetechEmulator]:
    with FeetechEmulator(IDS) as emulator:
        yield emulator


@pytest.fixture
def bus(emu: FeetechEmulator) -> Iterator[FeetechBus]:
    with FeetechBus(emu.port, timeout_margin_s=0.2) as b:
        yield b


def test_ping_read_write(emu: FeetechEmulator, bus: FeetechBus) -> None:
    assert bus.ping(3) == 777
    assert bus.read("Max_Temperature_Limit", 3) == 70
    bus.write("Max_Torque_Limit", 6, 500)
    assert emu.get_register(6, "Max_Torque_Limit") == 500
    assert bus.read("Max_Torque_Limit", 6) == 500
    assert [(r.motor_id, r.register, r.value) for r in emu.write_log] == [(6, "Max_Torque_Limit", 500)]


def test_sync_read_write_and_motion(emu: FeetechEmulator, bus: FeetechBus) -> None:
    assert bus.sync_read("Present_Position", IDS) == dict.fromkeys(IDS, 2048)
    bus.sync_write("Torque_Enable", dict.fromkeys(IDS, 1))  # no reply: wait for the emulator
    wait_until(lambda: all(emu.torque_enabled(i) for i in IDS))
    assert emu.goal_positions() == dict.fromkeys(IDS, 2048)  # torque on holds the pose: no jump
    goals = {i: 2048 + 10 * i for i in IDS}
    bus.sync_write("Goal_Position", goals)
    wait_until(lambda: emu.goal_positions() == goals)
    wait_until(lambda: bus.sync_read("Present_Position", IDS) == goals)


def test_sign_magnitude_on_the_wire(emu: FeetechEmulator, bus: FeetechBus) -> None:
    bus.write("Homing_Offset", 2, -100)
    raw = emu.get_register(2, "Homing_Offset")
    assert raw == -100
    reg = bus.control_table["Homing_Offset"]
    assert bytes(emu._servos[2].memory[reg.address : reg.address + 2]) == h("64 08")  # 1 << 11 | 100
    # Present = Actual - Homing_Offset
    assert bus.read("Present_Position", 2) == 2148


def test_follow_goal_off_lets_a_simulator_drive_positions() -> None:
    with FeetechEmulator(IDS, follow_goal=False) as emu, FeetechBus(emu.port, timeout_margin_s=0.2) as bus:
        bus.sync_write("Torque_Enable", dict.fromkeys(IDS, 1))
        bus.sync_write("Goal_Position", dict.fromkeys(IDS, 3000))
        time.sleep(0.05)
        assert bus.sync_read("Present_Position", IDS) == dict.fromkeys(IDS, 2048)
        emu.set_present_positions({1: 100, 6: 4000})
        assert bus.sync_read("Present_Position", [1, 6]) == {1: 100, 6: 4000}


def test_reg_write_waits_for_action(emu: FeetechEmulator, bus: FeetechBus) -> None:
    bus.reg_write("Acceleration", 1, 254)
    assert emu.get_register(1, "Acceleration") == 0
    bus.action()  # no reply: wait for the emulator thread to apply it
    wait_until(lambda: emu.get_register(1, "Acceleration") == 254)


def test_response_status_level_zero(emu: FeetechEmulator) -> None:
    emu.set_register(1, "Response_Status_Level", 0)
    with FeetechBus(emu.port, timeout_margin_s=FAST, retries=0) as bus:
        with pytest.raises(BusTimeoutError):
            bus.write("Acceleration", 1, 10)  # waits for a reply that never comes
        bus.ack_writes = False
        bus.write("Acceleration", 1, 20)
        assert bus.read("Acceleration", 1) == 20  # reads are still answered


def test_verify_models_names_the_wrong_servo(bus: FeetechBus) -> None:
    bus.verify_models(dict.fromkeys(IDS, 777))
    with pytest.raises(
        BusError, match=r"motor 2 is a sts3215 \(model 777\), expected scs0009 \(model 1284\)"
    ):
        bus.verify_models({1: 777, 2: 1284})


def test_scan_finds_ids_at_their_baud_rate_and_restores_baud(emu: FeetechEmulator, bus: FeetechBus) -> None:
    found = bus.scan([1, 2, 9], [1_000_000, 500_000])
    assert found == {1_000_000: {1: 777, 2: 777}}  # nothing answers at a rate no servo runs at
    emu.set_register(2, "Baud_Rate", 1)  # servo 2 now listens at 500 kbps only
    found = bus.scan([1, 2, 9], [1_000_000, 500_000])
    assert found == {1_000_000: {1: 777}, 500_000: {2: 777}}
    assert bus.baudrate == 1_000_000 and bus.retries == 2


def test_user_errors_are_typed(emu: FeetechEmulator, bus: FeetechBus) -> None:
    with pytest.raises(RegisterError, match="read-only"):
        bus.write("Present_Position", 1, 0)
    with pytest.raises(RegisterError, match="did you mean Goal_Position"):
        bus.read("Goal_Positon", 1)
    bus.disconnect()
    with pytest.raises(PortError, match="not connected; call connect"):
        bus.read("ID", 1)
    with pytest.raises(PortError, match="/dev/does-not-exist"):
        FeetechBus("/dev/does-not-exist").connect()


# --- faults -> typed errors, bounded retries ----------------------------------------------------


def test_dropped_reply_is_retried(emu: FeetechEmulator) -> None:
    with FeetechBus(emu.port, timeout_margin_s=FAST, retries=1) as bus:
        emu.inject_fault("drop_reply", motor_id=4, count=1)
        assert bus.sync_read("Present_Position", IDS) == dict.fromkeys(IDS, 2048)
        emu.inject_fault("drop_reply", motor_id=4, count=1)
        bus.retries = 0
        with pytest.raises(
            BusTimeoutError,
            match=r"motors \[1, 2, 3, 4, 5, 6\] failed after 1 attempt: no status packet from motor 4",
        ):
            bus.sync_read("Present_Position", IDS)


def test_silent_servo_exhausts_retries_and_is_named(emu: FeetechEmulator) -> None:
    emu.inject_fault("silence", motor_id=5)
    with FeetechBus(emu.port, timeout_margin_s=FAST, retries=2) as bus:
        with pytest.raises(
            BusTimeoutError,
            match=r"Present_Position \(address 56, 2 B\) on /dev/.*failed after 3 attempts: no status packet from motor 5",
        ) as info:
            bus.sync_read("Present_Position", IDS)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value.__cause__, BusTimeoutError)  # raise ... from err
        emu.clear_faults()
        assert bus.sync_read("Present_Position", IDS) == dict.fromkeys(IDS, 2048)


def test_corrupt_checksum(emu: FeetechEmulator) -> None:
    emu.inject_fault("corrupt_checksum", motor_id=2)
    bus = FeetechBus(emu.port, timeout_margin_s=FAST, retries=1)
    with bus, pytest.raises(ChecksumError, match="failed after 2 attempts: checksum"):
        bus.read("Present_Position", 2)


def test_delay_past_timeout_and_truncation(emu: FeetechEmulator) -> None:
    with FeetechBus(emu.port, timeout_margin_s=FAST, retries=0) as bus:
        emu.inject_fault("delay", motor_id=1, count=1, delay_s=0.3)
        with pytest.raises(BusTimeoutError, match="motor 1"):
            bus.read("Present_Position", 1)
        time.sleep(0.35)  # let the late reply land; the next transaction must drop it
        emu.inject_fault("truncate", motor_id=1, count=1)
        with pytest.raises(BusTimeoutError, match="stray bytes received"):
            bus.read("Present_Position", 1)
        assert bus.read("Present_Position", 1) == 2048


def test_probabilistic_drop_with_retries_recovers(emu: FeetechEmulator) -> None:
    emu.inject_fault("drop_reply", probability=0.05)
    with FeetechBus(emu.port, timeout_margin_s=FAST, retries=3) as bus:
        for _ in range(20):
            assert bus.sync_read("Present_Position", IDS) == dict.fromkeys(IDS, 2048)


def test_servo_error_flag_is_not_retried(emu: FeetechEmulator, bus: FeetechBus) -> None:
    emu.set_register(3, "Status", 0x20)  # overload
    with pytest.raises(
        ServoError, match=r"failed after 1 attempt: motor 3 reported overload \(error byte 0x20\)"
    ) as info:
        bus.sync_read("Present_Position", IDS)
    assert info.value.motor_id == 3 and info.value.flags == ("overload",)
    emu.set_register(3, "Status", 0)
    assert bus.read("Present_Position", 3) == 2048


def test_overheat_derived_from_limit_registers(emu: FeetechEmulator, bus: FeetechBus) -> None:
    emu.set_register(2, "Present_Temperature", 75)  # Max_Temperature_Limit defaults to 70
    with pytest.raises(ServoError, match="motor 2 reported overheat") as info:
        bus.read("Present_Temperature", 2)
    assert info.value.flags == ("overheat",)


def test_unplug_is_a_port_error(emu: FeetechEmulator, bus: FeetechBus) -> None:
    emu.inject_fault("unplug")
    with pytest.raises(PortError, match="unplugged"):
        bus.sync_read("Present_Position", IDS)
    assert not bus.is_connected
    bus.disconnect()  # safe after the port vanished


@pytest.fixture(scope="module")
def shared_bus() -> Iterator[FeetechBus]:
    with (
        FeetechEmulator(IDS, follow_goal=False) as emulator,
        FeetechBus(emulator.port, timeout_margin_s=0.2) as b,
    ):
        yield b


@settings(max_examples=25, deadline=None)
@given(velocities=st.lists(st.integers(-32767, 32767), min_size=6, max_size=6))
def test_signed_values_round_trip_through_the_wire(shared_bus: FeetechBus, velocities: list[int]) -> None:
    # Goal_Velocity is sign-magnitude with bit 15: the servo stores what the driver encoded
    shared_bus.sync_write("Goal_Velocity", dict(zip(IDS, velocities, strict=True)))
    assert shared_bus.sync_read("Goal_Velocity", IDS) == dict(zip(IDS, velocities, strict=True))
