"""Long soak of each robot's driver through the safety layer against its emulator under faults.

For SO-101 (Feetech), Koch (Dynamixel) and YAM (Damiao CAN): ``--cycles`` control ticks at a fake
30 Hz clock of a misbehaving policy (jumps past the limits, NaNs, stalls) while the emulator drops,
corrupts, delays, truncates and re-addresses replies per ``--faults``, silences motor 2 for
``--silence-ms`` half-way, and finally unplugs the port (``molmoact2_edge/hardware/soak.py``).
Reported: faults injected, sessions and safe stops (a safe stop ends a session, the soak
reconnects), wire commands checked and how many went past the per-tick step or the joint limits,
untyped exceptions, and the time from the unplug to the safe stop with the loop ticking at a real
30 Hz and the drivers' default deadlines.

    python benchmarks/soak.py --cycles 10000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.hardware.emulators.faults import parse_faults  # noqa: E402
from molmoact2_edge.hardware.soak import ROBOTS, soak  # noqa: E402

DEFAULT_FAULTS = "drop=0.003,corrupt=0.003,late=0.002,late_ms=80,truncate=0.002,wrong_id=0.002,seed=0"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--faults", default=DEFAULT_FAULTS, help="a molmo-edge emulate --faults spec")
    parser.add_argument("--silence-ms", type=float, default=300.0)
    parser.add_argument("--robots", default=",".join(ROBOTS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    plan = parse_faults(args.faults)
    load = os.getloadavg()[0]

    rows = []
    for robot in args.robots.split(","):
        report = soak(robot, args.cycles, plan, silence_s=args.silence_ms / 1000)
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(report.faults.items()))
        rows.append(
            [
                robot,
                report.cycles,
                f"{report.faults_total} ({kinds})",
                report.sessions,
                len(report.safe_stops),
                report.connect_failures,
                report.commands_checked,
                report.beyond_step,
                report.beyond_limits,
                len(report.untyped),
                "none" if report.unplug_to_stop_s is None else f"{report.unplug_to_stop_s * 1e3:.1f}",
                f"{report.wall_s:.0f}",
            ]
        )
        for line in report.untyped:
            print(f"untyped on {robot}: {line}", file=sys.stderr)
    table = markdown_table(
        [
            "robot",
            "cycles",
            "faulted replies (by kind)",
            "sessions",
            "safe stops before unplug",
            "failed reconnects",
            "wire commands checked",
            "beyond step",
            "beyond limits",
            "untyped errors",
            "unplug -> safe stop (ms)",
            "wall (s)",
        ],
        rows,
    )
    print(table)
    if args.no_write:
        return
    body = (
        f"Each robot's driver, through `SafetyLayer`, against its emulator: {args.cycles} ticks of a "
        "misbehaving policy at a fake 30 Hz clock (no sleeping), faults `"
        + args.faults
        + f"` per reply, motor 2 silent for {args.silence_ms:.0f} ms half-way, then the port unplugged "
        "(serial: the pty closes; CAN: the chain stops answering). Every position command that reached "
        "the emulator is decoded into the robot's units and checked against the joint limits and the "
        "per-tick step (the step check restarts at each session: a session starts by commanding the "
        "measured pose). A safe stop (typed error -> `SafetyError`) ends a session and the soak "
        "reconnects. `unplug -> safe stop`: the loop ticks at a real 30 Hz after the unplug, with the "
        "drivers' default 10 ms reply margin (during the soak: 50 ms, so that the loaded host's "
        "scheduling does not add faults of its own). `corrupt` on CAN is a drop (the controller's CRC "
        f"check). Host load average at start: {load:.1f} on {os.cpu_count()} cores.\n\n" + table
    )
    write_section("soak", "Driver soak under injected faults (emulated SO-101, Koch, YAM)", body)


if __name__ == "__main__":
    main()
