"""Success rate of a checkpoint through its exported bundle, in the loop `molmo-edge demo` runs.

    python benchmarks/demo_success.py checkpoints/so101-touch-small --precision fp32 int8 \
        --calib data/touch15 --episodes 50

For each precision the checkpoint is exported (or taken from the demo's bundle cache), then
``--episodes`` episodes run exactly as ``molmo-edge demo`` runs them: a fresh seeded MuJoCo
scene per episode (seeds ``--seed`` + i, default 100000+, away from the recorded demos'
seeds), its six servos a Feetech emulator reached through the real driver and the safety
layer, the bundle on onnxruntime in the real-time control loop at the sim rate. Writes
``eval_demo_<precision>.json`` beside the checkpoint (what ``demo`` prints as the measured
rate) and a table with 95 % Wilson intervals to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402


def run(checkpoint: Path, precision: str, args: argparse.Namespace) -> dict[str, object]:
    from molmoact2_edge.cli.demo import CACHE, cached_bundle
    from molmoact2_edge.cli.run import RunSettings, run_policy, sim_episodes
    from molmoact2_edge.export.pipeline import ExportOptions

    options = ExportOptions(precision=precision, calib=args.calib if precision == "int8" else None)
    bundle = cached_bundle(checkpoint, precision, CACHE, options)
    settings = RunSettings(
        bundle, "sim-so101", None, args.backend, args.duration, args.episodes, args.hz, stall_timeout_s=10.0
    )
    open_episode = sim_episodes(args.task, args.size, args.hz)
    results, _ = run_policy(settings, lambda i: open_episode(args.seed + i))
    per_episode = [
        {"seed": args.seed + r["episode"], "success": bool(r["success"]), "end": r["end"],
         "duration_s": r["duration_s"], "ticks": r["ticks"]}
        for r in results
    ]  # fmt: skip
    successes = sum(e["success"] for e in per_episode)
    return {
        "task": args.task,
        "precision": precision,
        "backend": args.backend,
        "loop": "demo (Feetech emulator, safety layer, real-time control loop)",
        "seed": args.seed,
        "episodes": len(per_episode),
        "successes": successes,
        "success_rate": successes / max(1, len(per_episode)),
        "duration_s": args.duration,
        "per_episode": per_episode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--precision", nargs="+", default=["fp32"])
    parser.add_argument("--calib", type=Path, default=None, help="Dataset for int8 calibration.")
    parser.add_argument("--task", default="touch")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds per episode at most (demo's).")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="Do not touch docs/benchmarks.md.")
    args = parser.parse_args()

    from molmoact2_edge.cli.demo import wilson_interval

    rows = []
    for precision in args.precision:
        record = run(args.checkpoint, precision, args)
        (args.checkpoint / f"eval_demo_{precision}.json").write_text(json.dumps(record, indent=2) + "\n")
        k, n = int(record["successes"]), int(record["episodes"])  # type: ignore[call-overload]
        low, high = wilson_interval(k, n)
        rows.append([args.checkpoint.name, args.task, precision, f"{args.seed}-{args.seed + n - 1}",
                     f"{k}/{n}", f"{100 * k / n:.0f}%", f"{100 * low:.0f}-{100 * high:.0f}%"])  # fmt: skip
        print(markdown_table(["checkpoint", "task", "precision", "seeds", "successes", "rate", "95% interval"],
                             rows[-1:]), flush=True)  # fmt: skip
    if not args.no_write:
        body = (
            "Closed-loop success through the exported bundle on onnxruntime, in the loop `molmo-edge demo` "
            "runs (Feetech emulator behind the real driver and the safety layer, real-time at 10 Hz, "
            f"{args.duration:.0f} s per episode at most), seeded scenes disjoint from the training demos. "
            "Intervals are 95 % Wilson intervals.\n\n"
            + markdown_table(
                ["checkpoint", "task", "precision", "seeds", "successes", "rate", "95% interval"], rows
            )
        )
        write_section(
            f"demo-success-{args.checkpoint.name}", f"Demo-loop success: {args.checkpoint.name}", body
        )


if __name__ == "__main__":
    main()
