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

Two more tables:

- **driver overhead over a raw pyserial floor** (Feetech): the same cycle written by hand with
  packets precomputed once (``write`` the SYNC_READ, read until the 6 replies' bytes arrived,
  ``write`` the SYNC_WRITE), against the same emulator, floor and driver cycles interleaved one
  by one so that load on the shared host hits both alike; medians, and the median of the paired
  differences with its quartiles.
- **emulator cost**: the emulator's own work per cycle (parse + execute the SYNC_READ and the
  SYNC_WRITE, build the replies), timed in-process without the pty.

``--baseline FILE`` adds the figures saved by an earlier ``--save FILE`` run as a "before" column.
To measure a commit before a change, run this script from an export of that commit's tree
(``git archive REV molmoact2_edge benchmarks | tar -x -C DIR``, copy this file into
``DIR/benchmarks``, run it there with ``--no-write --save``): it imports the package next to it.

    python benchmarks/bus_cycle.py --cycles 2000 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import serial  # noqa: E402

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.hardware.buses.base import Bus, wire_time_s  # noqa: E402
from molmoact2_edge.hardware.buses.dynamixel import DynamixelBus  # noqa: E402
from molmoact2_edge.hardware.buses.dynamixel_tables import Instruction as DxlInstruction  # noqa: E402
from molmoact2_edge.hardware.buses.dynamixel_tables import instruction_packet as dxl_packet  # noqa: E402
from molmoact2_edge.hardware.buses.feetech import (  # noqa: E402
    BROADCAST_ID,
    FeetechBus,
    Instruction,
    instruction_packet,
)
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


# --- driver vs raw pyserial floor (Feetech) ------------------------------------------------------

FEETECH_SYNC_READ = instruction_packet(BROADCAST_ID, Instruction.SYNC_READ, bytes([56, 2, *IDS]))
FEETECH_SYNC_WRITE = instruction_packet(
    BROADCAST_ID, Instruction.SYNC_WRITE, bytes([42, 2]) + b"".join(bytes([i, 0x00, 0x08]) for i in IDS)
)
FEETECH_REPLY_BYTES = len(IDS) * (6 + 2)


def floor_cycle(port: serial.Serial) -> float:
    """The least a host can do per cycle through pyserial: precomputed packets, one read loop for
    the replies' bytes, no decoding beyond counting them."""
    fd = port.fileno()
    t0 = time.perf_counter()
    port.reset_input_buffer()
    port.write(FEETECH_SYNC_READ)
    got = 0
    while got < FEETECH_REPLY_BYTES:
        if not select.select([fd], [], [], 2.0)[0]:
            raise TimeoutError(f"the emulator stopped answering ({got} of {FEETECH_REPLY_BYTES} bytes)")
        got += len(os.read(fd, FEETECH_REPLY_BYTES - got))
    port.reset_input_buffer()
    port.write(FEETECH_SYNC_WRITE)
    return time.perf_counter() - t0


def driver_cycle(bus: Bus, goals: dict[int, int]) -> float:
    t0 = time.perf_counter()
    bus.sync_read("Present_Position", IDS)
    bus.sync_write("Goal_Position", goals)
    return time.perf_counter() - t0


def measure_floor(cycles: int, rounds: int) -> dict[str, float]:
    """Floor and driver cycles interleaved one by one (the order swapped every cycle) on one
    emulator, so load on the shared host hits both alike: medians, and the median and quartiles of
    the paired differences (driver - floor) per round, medians across rounds (us)."""
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(FeetechEmulator, False, child), daemon=True)
    server.start()
    goals = dict.fromkeys(IDS, 2048)
    floors: list[float] = []
    drivers: list[float] = []
    diffs: list[list[float]] = []
    try:
        port_path = parent.recv()
        with (
            serial.Serial(port_path, BAUD, timeout=0) as raw,
            FeetechBus(port_path, baudrate=BAUD, timeout_margin_s=0.2) as bus,
        ):
            for _ in range(max(cycles // 10, 10)):  # warm-up
                floor_cycle(raw), driver_cycle(bus, goals)
            for _ in range(rounds):
                pairs = []
                for k in range(cycles):
                    if k % 2:
                        f, d = floor_cycle(raw), driver_cycle(bus, goals)
                    else:
                        d, f = driver_cycle(bus, goals), floor_cycle(raw)
                    pairs.append((f, d))
                floors.append(statistics.median(f for f, _ in pairs))
                drivers.append(statistics.median(d for _, d in pairs))
                diffs.append(statistics.quantiles([d - f for f, d in pairs], n=4))
    finally:
        parent.send("stop")
        server.join(timeout=5)
    floor, driver = statistics.median(floors), statistics.median(drivers)
    return {
        "floor_us": floor * 1e6,
        "driver_us": driver * 1e6,
        "overhead_us": statistics.median(q[1] for q in diffs) * 1e6,
        "overhead_q1_us": statistics.median(q[0] for q in diffs) * 1e6,
        "overhead_q3_us": statistics.median(q[2] for q in diffs) * 1e6,
        "ratio": driver / floor,
    }


# --- the emulator's own cost ----------------------------------------------------------------------


def emulator_packets(protocol: str) -> tuple[bytes, bytes]:
    """(SYNC_READ Present_Position, SYNC_WRITE Goal_Position) for the 6 servos, as on the wire."""
    if protocol == "feetech":
        return FEETECH_SYNC_READ, FEETECH_SYNC_WRITE
    read = dxl_packet(BROADCAST_ID, DxlInstruction.SYNC_READ, bytes([132, 0, 4, 0, *IDS]))
    write = dxl_packet(
        BROADCAST_ID,
        DxlInstruction.SYNC_WRITE,
        bytes([116, 0, 4, 0]) + b"".join(bytes([i]) + (2048).to_bytes(4, "little") for i in IDS),
    )
    return read, write


def measure_emulator(protocol: str, emulator_cls: type[SerialServoChain], cycles: int) -> dict[str, float]:
    """Median time the emulator spends answering one cycle's two packets (no pty, no thread)."""
    read, write = emulator_packets(protocol)
    emu = emulator_cls(IDS, baudrate=BAUD, follow_goal=False)
    assert len(emu._handle(read)) == len(IDS)  # the packets are the ones a driver sends
    times = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        emu._handle(read)
        emu._handle(write)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_us": times[len(times) // 2] * 1e6, "p90_us": times[int(len(times) * 0.9)] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9, help="alternated floor/driver rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--save", type=Path, help="also save the figures as JSON (a later --baseline)")
    parser.add_argument("--baseline", type=Path, help="JSON of an earlier --save run, shown as 'before'")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the host is shared: say how busy it was
    before = json.loads(args.baseline.read_text()) if args.baseline else None

    rows = [
        measure(protocol, emu_cls, bus_cls, wire, args.cycles)
        for protocol, emu_cls, bus_cls in (
            ("feetech", FeetechEmulator, FeetechBus),
            ("dynamixel", DynamixelEmulator, DynamixelBus),
        )
        for wire in (False, True)
    ]
    emulator = {
        protocol: measure_emulator(protocol, cls, args.cycles * 4)
        for protocol, cls in (("feetech", FeetechEmulator), ("dynamixel", DynamixelEmulator))
    }
    floor = measure_floor(args.cycles, args.rounds)
    figures = {"cycle": rows, "emulator": emulator, "floor": floor, "load": load}
    if args.save:
        args.save.write_text(json.dumps(figures, indent=1))

    cycle_table = markdown_table(
        [
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
        + (["before: cycle p50 (us)"] if before else []),
        [row + ([before["cycle"][k][4]] if before else []) for k, row in enumerate(rows)],
    )

    def was(section: str, key: str, name: str | None = None) -> list[object]:
        if not before:
            return []
        value = before[section][name][key] if name else before[section][key]
        return [f"{value:.1f}"]

    emulator_table = markdown_table(
        ["emulator", "cycle p50 (us)", "cycle p90 (us)"] + (["before: p50 (us)"] if before else []),
        [
            [name, f"{e['p50_us']:.1f}", f"{e['p90_us']:.1f}", *was("emulator", "p50_us", name)]
            for name, e in emulator.items()
        ],
    )
    floor_table = markdown_table(
        ["", "now"] + (["before"] if before else []),
        [
            ["raw pyserial floor, cycle p50 (us)", f"{floor['floor_us']:.1f}", *was("floor", "floor_us")],
            ["FeetechBus, cycle p50 (us)", f"{floor['driver_us']:.1f}", *was("floor", "driver_us")],
            [
                "driver overhead over the floor (us)",
                f"{floor['overhead_us']:.1f} (quartiles {floor['overhead_q1_us']:.1f} .. {floor['overhead_q3_us']:.1f})",
                *was("floor", "overhead_us"),
            ],
            [
                "driver / floor",
                f"{floor['ratio']:.2f}",
                *([f"{before['floor']['ratio']:.2f}"] if before else []),
            ],
        ],
    )
    print(cycle_table, emulator_table, floor_table, sep="\n\n")
    if args.no_write:
        return
    baseline_note = (
        f" `before` columns: the same benchmark on the code before the change (`{args.baseline}`, "
        f"host load average {before['load']:.1f} then)."
        if before
        else ""
    )
    body = (
        f"6 servos, one SYNC_READ Present_Position + one SYNC_WRITE Goal_Position per cycle, "
        f"{args.cycles} cycles after warm-up, against the pty emulators. `host` = no wire-time emulation "
        "(driver + pty + emulator overhead only); `wire 1M` = the emulator sleeps each packet's UART "
        "time at 1 Mbps. `wire time` is the theoretical time of the cycle's bytes at 1 Mbps (reference "
        "§4: Feetech 62 + 26 bytes, Dynamixel 110 + 44 bytes); `cycle / wire` > 1 is host overhead on "
        "top of the wire. Return_Delay_Time = 0; no USB adapter latency (a real CDC-ACM/FTDI adapter adds "
        ">= 1 ms per direction). Feetech uses our driver, Dynamixel uses dynamixel_sdk. Host load average "
        f"at start: {load:.1f} on {os.cpu_count()} cores (a shared machine: p99 mostly shows other "
        f"processes; compare medians).{baseline_note}\n\n"
        + cycle_table
        + "\n\n**Emulator cost**: the emulator's own work per cycle (answer the SYNC_READ, apply the "
        f"SYNC_WRITE), in-process without the pty, median of {args.cycles * 4} cycles.\n\n"
        + emulator_table
        + "\n\n**Driver overhead over a raw pyserial floor** (Feetech, host mode): the floor writes "
        "precomputed packets with pyserial and only counts the reply bytes; floor and driver cycles are "
        f"interleaved one by one against one emulator ({args.rounds} rounds of {args.cycles} pairs); "
        "medians of the round medians; the overhead is the median of the paired differences "
        "(driver - floor), quartiles in brackets.\n\n" + floor_table
    )
    write_section("bus_cycle", "Servo bus cycle (emulated, 6 servos)", body)


if __name__ == "__main__":
    main()
