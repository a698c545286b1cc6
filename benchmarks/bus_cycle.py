"""Servo-bus control cycle against the pty emulators: one SYNC_READ of Present_Position plus one
SYNC_WRITE of Goal_Position for 6 servos, the per-tick bus work of an SO-101 / Koch arm.

Two modes per bus:

- ``host``: emulator with no wire-time emulation, Return_Delay_Time = 0. The cycle time is pure
  host overhead: our driver (Feetech) or dynamixel_sdk (Dynamixel), the pty, and the emulator
  thread parsing and answering.
- ``wire 1M``: the emulator sleeps each packet's UART time at 1 Mbps (8N1) before answering, so the
  cycle is wire time + host overhead; compared with the theoretical wire time of the same bytes
  (reference ``servo-buses.md`` §4: Feetech 620 + 260 us, Dynamixel 1100 + 440 us).

The emulator runs in a child process (a servo is separate hardware); it busy-waits the last
0.3 ms of each wire-time sleep, on the same shared host. Not included: USB latency of a real
adapter (>= 1 ms per direction on CDC-ACM, FTDI at its 16 ms latency timer), real servo
turnaround.

    python benchmarks/bus_cycle.py --cycles 500
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.hardware.buses.base import Bus, wire_time_s  # noqa: E402
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus  # noqa: E402
from molmoact2_edge.hardware.buses.feetech import FeetechBus  # noqa: E402
from molmoact2_edge.hardware.emulators.dynamixel import DynamixelEmulator  # noqa: E402
from molmoact2_edge.hardware.emulators.feetech import FeetechEmulator  # noqa: E402
from molmoact2_edge.hardware.emulators.serial_chain import SerialServoChain  # noqa: E402

IDS = [1, 2, 3, 4, 5, 6]
BAUD = 1_000_000


def wire_bytes(protocol: str, n: int) -> tuple[int, int]:
    """(sync read bytes incl. replies, sync write bytes) for n servos, from the packet formats."""
    if protocol == "feetech":  # instr 8 + n, replies n x (6 + 2); write 8 + n x (1 + 2)
        return 8 + n + n * (6 + 2), 8 + n * 3
    return 14 + n + n * (11 + 4), 14 + n * 5  # Dynamixel protocol 2.0, 4-byte positions


def run_cycles(bus: Bus, cycles: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-cycle (read, write) durations in seconds."""
    reads, writes = [], []
    goals = dict.fromkeys(IDS, 2048)
    for i in range(warmup + cycles):
        t0 = time.perf_counter()
        bus.sync_read("Present_Position", IDS)
        t1 = time.perf_counter()
        bus.sync_write("Goal_Position", goals)
        t2 = time.perf_counter()
        if i >= warmup:
            reads.append(t1 - t0)
            writes.append(t2 - t1)
    return reads, writes


def serve(emulator_cls: type[SerialServoChain], wire: bool, conn: Connection) -> None:
    """Child process: run one emulator until the parent says stop. A separate process, like a
    real servo: in-process, dynamixel_sdk's busy-polling read loop would hold the GIL for up to
    the 5 ms switch interval while the emulator thread waits to answer."""
    with emulator_cls(IDS, baudrate=BAUD, wire_time=wire, follow_goal=False) as emu:
        for motor_id in IDS:
            emu.set_register(motor_id, "Return_Delay_Time", 0)  # as LeRobot configures both families
        conn.send(emu.port)
        conn.recv()


def measure(
    protocol: str, emulator_cls: type[SerialServoChain], bus_cls: type[Bus], wire: bool, cycles: int
) -> list[object]:
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(emulator_cls, wire, child), daemon=True)
    server.start()
    try:
        port = parent.recv()
        # a generous margin: on a shared host a stalled emulator must not abort the run
        with bus_cls(port, baudrate=BAUD, timeout_margin_s=0.2) as bus:  # type: ignore[call-arg]
            reads, writes = run_cycles(bus, cycles, warmup=max(cycles // 10, 10))
    finally:
        parent.send("stop")
        server.join(timeout=5)
    cycle = sorted(r + w for r, w in zip(reads, writes, strict=True))
    read_bytes, write_bytes = wire_bytes(protocol, len(IDS))
    theory = wire_time_s(read_bytes + write_bytes, BAUD)
    p50, p99 = cycle[len(cycle) // 2], cycle[int(len(cycle) * 0.99) - 1]
    return [
        protocol,
        "wire 1M" if wire else "host",
        f"{statistics.median(reads) * 1e6:.0f}",
        f"{statistics.median(writes) * 1e6:.0f}",
        f"{p50 * 1e6:.0f}",
        f"{p99 * 1e6:.0f}",
        f"{theory * 1e6:.0f}",
        f"{p50 / theory:.2f}",
        f"{1 / p50:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the host is shared: say how busy it was

    rows = [
        measure(protocol, emu_cls, bus_cls, wire, args.cycles)
        for protocol, emu_cls, bus_cls in (
            ("feetech", FeetechEmulator, FeetechBus),
            ("dynamixel", DynamixelEmulator, DynamixelBus),
        )
        for wire in (False, True)
    ]
    headers = [
        "bus",
        "mode",
        "sync read p50 (us)",
        "sync write p50 (us)",
        "cycle p50 (us)",
        "cycle p99 (us)",
        "wire time (us)",
        "cycle / wire",
        "max rate (Hz)",
    ]
    table = markdown_table(headers, rows)
    print(table)
    if args.no_write:
        return
    body = (
        f"6 servos, one SYNC_READ Present_Position + one SYNC_WRITE Goal_Position per cycle, "
        f"{args.cycles} cycles after warm-up, against the pty emulators. `host` = no wire-time emulation "
        "(driver + pty + emulator overhead only); `wire 1M` = the emulator sleeps each packet's UART "
        "time at 1 Mbps. `wire time` is the theoretical time of the cycle's bytes at 1 Mbps (reference "
        "§4: Feetech 62 + 26 bytes, Dynamixel 110 + 44 bytes); `cycle / wire` > 1 is host overhead on "
        "top of the wire. Return_Delay_Time = 0; no USB adapter latency (a real CDC-ACM/FTDI adapter adds "
        ">= 1 ms per direction). Feetech uses our driver, Dynamixel uses dynamixel_sdk (which busy-polls "
        "the port with a zero read timeout). Host load average at start: "
        f"{load:.1f} on {os.cpu_count()} cores, so p99 mostly shows other processes.\n\n" + table
    )
    write_section("bus_cycle", "Servo bus cycle (emulated, 6 servos)", body)


if __name__ == "__main__":
    main()
