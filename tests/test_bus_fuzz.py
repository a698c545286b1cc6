"""Fuzz and property tests: the three protocols' decoders and each bus's read path fed by a hostile peer.

A hostile peer answers every request with bytes hypothesis chose: random noise, or a status packet
of the right or wrong length, for the right or another id, with a valid or broken checksum, cut
short or behind noise. Whatever it sends, the drivers raise only the project's typed errors, and a
value they return is the data field of a well-formed reply from the motor asked, of exactly the
register's size (checked by an independent reference scan of the bytes sent).
"""

from __future__ import annotations

import itertools
import os
import select
import struct
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager

import can
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmoact2_edge.errors import ChecksumError, HardwareError, PortError, SafetyError, ServoError
from molmoact2_edge.hardware.buses import dynamixel_tables as dxl
from molmoact2_edge.hardware.buses import feetech as ft
from molmoact2_edge.hardware.buses.damiao import (
    DAMIAO_MODELS,
    MASTER_OFFSET,
    PARAM_READ,
    DamiaoBus,
    MitCommand,
    decode_feedback,
    unpack_mit,
)
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus
from molmoact2_edge.hardware.buses.feetech import FeetechBus

# derandomized: the suite is deterministic; a run with HYPOTHESIS_PROFILE unset explores the same cases
FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
MARGIN_S = 0.02  # reply deadline margin: the peer is a Python thread on a shared host


# --- decoders --------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=64))
def test_feetech_decoder_raises_only_checksum_error(data: bytes) -> None:
    span = ft.find_frame(data)
    if span is None:
        return
    try:
        packet = ft.decode_frame(data[span[0] : span[1]])
    except ChecksumError:
        return
    frame = data[span[0] : span[1]]
    assert packet.params == frame[5:-1] and len(packet.params) == frame[3] - 2  # the data field only


@FUZZ
@given(st.binary(max_size=64))
def test_dynamixel_decoder_raises_only_checksum_error(data: bytes) -> None:
    span = dxl.find_frame(data)
    if span is None:
        return
    try:
        packet = dxl.decode_frame(data[span[0] : span[1]])
    except ChecksumError:
        return
    frame = data[span[0] : span[1]]
    assert packet.params == dxl.unstuff(frame[7:-2])[1:]


@FUZZ
@given(st.binary(max_size=16), st.sampled_from(sorted(DAMIAO_MODELS)))
def test_damiao_decoders_raise_only_typed_errors(data: bytes, model: str) -> None:
    try:
        fb = decode_feedback(data, DAMIAO_MODELS[model])
    except (ChecksumError, ServoError):
        assert len(data) != 8 or (data[0] >> 4) not in (0, 1, 8, 9, 10, 11, 12, 13, 14)
    else:
        assert len(data) == 8 and fb.motor_id == data[0] & 0xF and fb.t_mos == data[6]
    try:
        unpack_mit(data, DAMIAO_MODELS[model])
    except ChecksumError:
        assert len(data) != 8


def test_damiao_short_frame_is_a_checksum_error_not_value_error() -> None:
    with pytest.raises(ChecksumError, match="8 data bytes, got 7"):
        decode_feedback(bytes(7), DAMIAO_MODELS["dm4310"])


# --- a hostile serial peer -------------------------------------------------------------------------


class HostilePeer:
    """A pty whose far end answers each request with ``self.reply`` (set per example)."""

    def __init__(self) -> None:
        self.reply = b""
        self.replied = threading.Event()
        self._stop = threading.Event()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._master], [], [], 0.01)[0]:
                continue
            try:
                os.read(self._master, 4096)
                os.write(self._master, self.reply)
            except OSError:
                return
            self.replied.set()

    def expect(self, reply: bytes) -> None:
        self.replied.clear()
        self.reply = reply

    def settle(self) -> None:
        """Wait until the reply of this example is out, so it cannot leak into the next one."""
        self.replied.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        os.close(self._master)
        os.close(self._slave)


@contextmanager
def hostile_peer() -> Iterator[HostilePeer]:
    peer = HostilePeer()
    try:
        yield peer
    finally:
        peer.close()


def _packets(status_packet, motor_ids: list[int], size: int):  # type: ignore[no-untyped-def]
    """One reply per motor: valid or mutated status packets, noise, truncation."""
    data = st.binary(min_size=0, max_size=6).filter(lambda d: len(d) != size) | st.binary(
        min_size=size, max_size=size
    )
    ident = st.sampled_from(motor_ids) | st.integers(0, 253)
    packet = st.builds(lambda i, e, d: status_packet(i, e, d), ident, st.sampled_from([0, 0, 0, 0x20]), data)

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        raw = bytearray(draw(packet))
        how = draw(st.sampled_from(["keep", "keep", "flip", "cut", "noise"]))
        if how == "flip":
            k = draw(st.integers(0, len(raw) - 1))
            raw[k] ^= draw(st.integers(1, 255))
        elif how == "cut":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif how == "noise":
            raw = bytearray(draw(st.binary(max_size=6))) + raw
        return bytes(raw)

    # the whole answer of a healthy chain, each packet possibly mutated: most examples then reach
    # the value check rather than stopping at a timeout
    healthy = st.tuples(
        *[
            st.binary(min_size=size, max_size=size).map(lambda d, i=i: status_packet(i, 0, d))
            for i in motor_ids
        ]
    )

    @st.composite
    def damaged(draw: st.DrawFn) -> bytes:
        raw = bytearray(b"".join(draw(healthy)))
        for _ in range(draw(st.integers(0, 2))):
            k = draw(st.integers(0, len(raw) - 1))
            raw[k] ^= draw(st.integers(0, 255))
        return bytes(raw)

    reply = mutate() | st.binary(max_size=24)
    return damaged() | st.lists(reply, min_size=1, max_size=len(motor_ids) + 1).map(b"".join)


def _feetech_values(reply: bytes, motor_id: int, size: int) -> set[int]:
    """Reference scan: data of every well-formed Feetech status packet from ``motor_id`` with
    ``size`` data bytes, at any offset of the bytes sent."""
    found = set()
    for k in range(len(reply) - 5):
        if reply[k : k + 2] != b"\xff\xff":
            continue
        end = k + 4 + reply[k + 3]
        frame = reply[k:end]
        well_formed = len(frame) == end - k == 6 + size and frame[-1] == ft.checksum(frame[2:-1])
        if well_formed and frame[2] == motor_id:
            found.add(int.from_bytes(frame[5:-1], "little"))
    return found


def _dynamixel_values(reply: bytes, motor_id: int, size: int) -> set[int]:
    found = set()
    for k in range(len(reply)):
        if reply[k : k + 4] != dxl.HEADER or len(reply) < k + 7:
            continue
        end = k + 7 + int.from_bytes(reply[k + 5 : k + 7], "little")
        try:
            packet = dxl.decode_frame(reply[k:end])
        except ChecksumError:
            continue
        if packet.motor_id == motor_id and packet.instruction == 0x55 and len(packet.params) == 1 + size:
            found.add(int.from_bytes(packet.params[1:], "little"))
    return found


def _feetech_status(motor_id: int, error: int, data: bytes) -> bytes:
    return ft.status_packet(motor_id, error, data)


REGISTERS = ["Present_Position", "Torque_Enable", "Present_Voltage"]


def test_feetech_read_paths_against_a_hostile_peer() -> None:
    with hostile_peer() as peer, FeetechBus(peer.port, retries=0, timeout_margin_s=MARGIN_S) as bus:

        @FUZZ
        @given(st.data())
        def check(data: st.DataObject) -> None:
            reg = bus.control_table[data.draw(st.sampled_from(REGISTERS))]
            ids = data.draw(st.sampled_from([[1], [1, 2, 3]]))
            reply = data.draw(_packets(_feetech_status, ids, reg.size))
            peer.expect(reply)
            try:
                values = bus.sync_read(reg, ids) if len(ids) > 1 else {1: bus.read(reg, 1)}
            except HardwareError as err:
                assert not isinstance(err, PortError), err
                return
            finally:
                peer.settle()
            for motor_id, value in values.items():
                assert reg.encode(value) in _feetech_values(reply, motor_id, reg.size), (motor_id, value)
            accepted.append(len(values))

        accepted: list[int] = []
        check()
        assert accepted, "no example produced a valid reply: the property above was never exercised"


X_REGISTERS = ["Present_Position", "Torque_Enable", "Present_Current"]


def test_dynamixel_read_paths_against_a_hostile_peer() -> None:
    pytest.importorskip("dynamixel_sdk")
    with hostile_peer() as peer, DynamixelBus(peer.port, retries=0, timeout_margin_s=MARGIN_S) as bus:

        @FUZZ
        @given(st.data())
        def check(data: st.DataObject) -> None:
            reg = bus.control_table[data.draw(st.sampled_from(X_REGISTERS))]
            ids = data.draw(st.sampled_from([[1], [1, 2, 3]]))
            reply = data.draw(_packets(dxl.status_packet, ids, reg.size))
            peer.expect(reply)
            try:
                values = bus.sync_read(reg, ids) if len(ids) > 1 else {1: bus.read(reg, 1)}
            except HardwareError as err:
                assert not isinstance(err, PortError), err
                return
            finally:
                peer.settle()
            for motor_id, value in values.items():
                assert reg.encode(value) in _dynamixel_values(reply, motor_id, reg.size), (motor_id, value)
            accepted.append(len(values))

        accepted: list[int] = []
        check()
        assert accepted, "no example produced a valid reply: the property above was never exercised"


@pytest.mark.parametrize(("register", "data"), [("Present_Position", b"\x07"), ("Torque_Enable", b"")])
def test_dynamixel_short_reply_is_refused(register: str, data: bytes) -> None:
    """The SDK slices past the packet: a 1-byte reply to a 4-byte read read as 10568199-like values
    built from the CRC. The driver checks the length and retries like a bad CRC."""
    pytest.importorskip("dynamixel_sdk")
    with hostile_peer() as peer, DynamixelBus(peer.port, retries=1, timeout_margin_s=MARGIN_S) as bus:
        peer.expect(dxl.status_packet(1, 0, data))
        with pytest.raises(
            ChecksumError, match=r"after 2 attempts: status packet from motor 1 carries \d data bytes"
        ):
            bus.read(register, 1)


# --- a hostile CAN peer ----------------------------------------------------------------------------

_channels = itertools.count()
MOTORS = {1: "dm4340", 2: "dm4310"}


class HostileCanPeer:
    """Answers every frame on a virtual CAN channel with ``self.frames`` [(arbitration id, data)]."""

    def __init__(self, channel: str):
        self.frames: list[tuple[int, bytes]] = []
        self.sent: list[tuple[int, bytes]] = []
        self._bus = can.Bus(interface="virtual", channel=channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._bus.recv(timeout=0.01) is None:
                continue
            for arbitration_id, data in self.frames:
                self._bus.send(can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False))
                self.sent.append((arbitration_id, data))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._bus.shutdown()


def _can_frames() -> st.SearchStrategy[list[tuple[int, bytes]]]:
    masters = st.sampled_from([i + MASTER_OFFSET for i in MOTORS]) | st.integers(0, 0x7FF)
    feedback_like = st.builds(
        lambda i, state, rest: bytes([state << 4 | i]) + rest,
        st.sampled_from(list(MOTORS)) | st.integers(0, 15),
        st.sampled_from([0, 1]) | st.integers(0, 15),
        st.binary(min_size=7, max_size=7) | st.binary(max_size=7),
    )
    param_like = st.builds(
        lambda i, op, rid, v: bytes([i, 0, op, rid]) + v,
        st.sampled_from(list(MOTORS)),
        st.sampled_from([PARAM_READ, 0x55, 0x00]),
        st.sampled_from([8, 9, 10]),
        st.binary(min_size=0, max_size=4),
    )
    hostile = st.lists(st.tuples(masters, feedback_like | param_like | st.binary(max_size=8)), max_size=4)
    # what a healthy chain sends (feedback of each motor, the Timeout parameter), sometimes damaged
    healthy_frame = st.sampled_from(list(MOTORS)).flatmap(
        lambda i: st.tuples(
            st.just(i + MASTER_OFFSET),
            st.sampled_from([0x00, 0x10])
            .map(lambda state: bytes([state | i]))
            .flatmap(lambda head: st.binary(min_size=7, max_size=7).map(lambda rest: head + rest))
            | st.binary(min_size=4, max_size=4).map(lambda v: bytes([i, 0, PARAM_READ, 9]) + v),
        )
    )
    damaged = st.tuples(healthy_frame, st.integers(0, 7), st.sampled_from([0, 0, 1, 0x10, 0xFF])).map(
        lambda t: (t[0][0], bytes(b ^ t[2] if k == t[1] else b for k, b in enumerate(t[0][1])))
    )
    return st.lists(damaged, min_size=1, max_size=6) | hostile


def test_damiao_read_paths_against_a_hostile_peer() -> None:
    channel = f"fuzz-damiao-{next(_channels)}"
    peer = HostileCanPeer(channel)
    bus = DamiaoBus(channel, MOTORS, interface="virtual", retries=0, reply_timeout_s=0.01)
    bus.connect()
    try:

        @FUZZ
        @given(_can_frames(), st.sampled_from(["refresh", "mit", "read"]))
        def check(frames: list[tuple[int, bytes]], op: str) -> None:
            peer.frames, peer.sent = frames, []
            try:
                if op == "read":
                    value = bus.read("Timeout", 1)
                    assert any(
                        a == 1 + MASTER_OFFSET
                        and d[:4] == bytes([1, 0, PARAM_READ, 9])
                        and len(d) == 8
                        and struct.unpack("<I", d[4:])[0] == value
                        for a, d in frames
                    )
                    return
                feedback = bus.refresh() if op == "refresh" else bus.mit(dict.fromkeys(MOTORS, MitCommand()))
            except HardwareError as err:
                assert not isinstance(err, PortError), err
                return
            for motor_id, fb in feedback.items():
                sources = [
                    d
                    for a, d in frames
                    if a == motor_id + MASTER_OFFSET and len(d) == 8 and d[0] & 0xF == motor_id
                ]
                assert any(decode_feedback(d, DAMIAO_MODELS[MOTORS[motor_id]]) == fb for d in sources)
            accepted.append(len(feedback))

        accepted: list[int] = []
        check()
        assert accepted, "no example produced valid feedback: the property above was never exercised"
    finally:
        bus.disconnect()
        peer.close()


# --- an adapter that goes away ---------------------------------------------------------------------


def test_can_adapter_error_is_a_safe_stop_not_a_traceback() -> None:
    """The issue's reproduction: YAM on the Damiao emulator, the bus's recv raises
    can.CanOperationError, the safety layer's send must stop safely with a typed error."""
    from molmoact2_edge.hardware.emulators.damiao import DamiaoEmulator
    from molmoact2_edge.hardware.robots.yam import ARM_MODELS, GRIPPER_ID, YAM
    from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer

    motors = {i + 1: m for i, m in enumerate(ARM_MODELS)} | {GRIPPER_ID: "dm4310"}
    emu = DamiaoEmulator(motors, channel=f"fuzz-yam-{next(_channels)}", hard_limits={GRIPPER_ID: (-0.2, 1.8)})
    emu.start()
    emu.set_positions({2: 0.5, 3: 0.4})
    try:
        arm = YAM(
            emu.channel,
            gripper_range=(-0.2, 1.8),
            bus=DamiaoBus(emu.channel, motors, interface="virtual", reply_timeout_s=0.2),  # a loaded CI box
        )
        arm.connect()
        safety = SafetyLayer(arm, SafetyConfig(watchdog_thread=False, handle_signals=False))
        safety.start()
        safety.send(safety.last_commanded)

        def unplugged(timeout: float | None = None) -> None:
            raise can.CanOperationError("Network is down [Error Code 100]")

        arm.bus._can.recv = unplugged
        with pytest.raises(SafetyError, match="PortError") as caught:
            safety.send(np.asarray(safety.last_commanded))
        assert "CAN receive on" in str(caught.value.__cause__) and emu.channel in str(caught.value.__cause__)
        assert safety.stopped is not None and "PortError" in safety.stopped
        safety.close()  # must not raise again
        arm.disconnect()
        assert not arm.bus.is_connected
    finally:
        emu.stop()
