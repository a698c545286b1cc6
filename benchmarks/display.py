"""What ``--display`` / ``--save-rrd`` cost the control loop: period error with and without rerun logging.

\b
    python benchmarks/display.py --bundle BUNDLE                  # 3 rounds x 10 s per mode
    python benchmarks/display.py --bundle BUNDLE --rounds 5 --seconds 20 --hz 30

Each measurement is one process: the bundle on onnxruntime inferring in its thread, the 30 Hz
control loop on a ``DryRunGate`` (synthetic cameras at twice the bundle's image size), per-tick
telemetry on, and the rerun display in one of three modes: ``off``; ``rrd`` (``--save-rrd``: every
record and camera image logged to a file); ``serve`` (``--display serve``: the same logged to the
gRPC server a remote viewer would connect to, with no viewer attached). Modes alternate round by
round so machine load drifts hit all of them; the table gives the median over rounds of each
round's p50 / p99 / max period error and overruns. The native-viewer mode (``viewer``) logs
through the same path as ``serve`` plus a local gRPC client, and needs a screen, so it is not run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402

MODES = ("off", "rrd", "serve")


def measure(bundle: Path, mode: str, seconds: float, hz: float) -> dict[str, float]:
    """One loop run in this process; period-error statistics in ms."""
    from molmoact2_edge.runtimes.benchmark import synthetic_observation
    from molmoact2_edge.runtimes.control import DryRunGate, LoopConfig, run_episode
    from molmoact2_edge.runtimes.session import PolicySession
    from molmoact2_edge.runtimes.telemetry import Telemetry
    from molmoact2_edge.types import Observation

    with PolicySession(bundle, "onnxruntime") as session, tempfile.TemporaryDirectory() as tmp:
        obs = synthetic_observation(session)

        def observe(task: str) -> Observation:
            return Observation(images=obs.images, state=obs.state, task=task, timestamp=time.monotonic())

        display = None
        if mode != "off":
            from molmoact2_edge.viz.rerun_display import RerunDisplay

            display = RerunDisplay.open("serve" if mode == "serve" else None, Path(tmp) / "run.rrd" if mode == "rrd" else None)
        telemetry = Telemetry(Path(tmp) / "t.jsonl", control_hz=hz, observers=[display] if display else [])
        telemetry.begin_episode(0, joint_names=[f"j{i}" for i in range(session.state_dim)])
        gate = DryRunGate(observe, session.state_dim)
        # the loop's timing is measured, not the policy: a slow machine holding between chunks must not end the run
        config = LoopConfig(task=obs.task, hz=hz, duration_s=seconds, stall_timeout_s=1e9, first_chunk_timeout_s=1e9)
        run_episode(session.act, display.watch(gate) if display else gate, config, telemetry)
        telemetry.close()
        if display is not None:
            display.close()
    errors = np.asarray(telemetry.loop.errors_s[int(hz):]) * 1e3  # the first second includes warm-up
    return {
        "p50": float(np.percentile(errors, 50)),
        "p99": float(np.percentile(errors, 99)),
        "max": float(errors.max()),
        "overruns": int(np.sum(errors >= 1e3 / hz)),
        "ticks": int(errors.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hz", type=float, default=30.0)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.bundle, args.worker, args.seconds, args.hz)))
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            command = [sys.executable, __file__, "--bundle", str(args.bundle), "--seconds", str(args.seconds)]
            out = subprocess.run([*command, "--hz", str(args.hz), "--worker", mode], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{mode} round {round_}: {out.stderr[-2000:]}")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_} {mode}: {runs[mode][-1]}", flush=True)
    rows = []
    for mode in MODES:
        med = {k: float(np.median([r[k] for r in runs[mode]])) for k in ("p50", "p99", "max", "overruns", "ticks")}
        spread = [r["p99"] for r in runs[mode]]
        rows.append(
            [mode, f"{med['p50']:.2f}", f"{med['p99']:.2f} ({min(spread):.2f}-{max(spread):.2f})",
             f"{med['max']:.1f}", f"{med['overruns']:.0f}", f"{med['ticks']:.0f}"]
        )  # fmt: skip
    table = markdown_table(["rerun", "p50 ms", "p99 ms (range over rounds)", "max ms", "overruns", "ticks"], rows)
    print(table)
    body = (
        f"Control loop at {args.hz:g} Hz on a DryRunGate with `{args.bundle.name}` inferring on onnxruntime, "
        f"per-tick telemetry on; medians over {args.rounds} alternated rounds of {args.seconds:g} s (one process "
        "each, first second dropped). `rrd` = `--save-rrd`, `serve` = `--display serve` with no viewer attached.\n\n"
        + table
    )
    write_section("display", "Rerun display: cost on the control loop's period error", body)


if __name__ == "__main__":
    main()
