"""Success rate of a checkpoint through its exported bundle, in the loop `molmo-edge demo` runs.

    python benchmarks/demo_success.py checkpoints/so101-touch --precision fp32 int8 \
        --calib data/touch400 --episodes 50

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402


def export(checkpoint: Path, precision: str, args: argparse.Namespace) -> Path:
    """The demo's cached bundle at ``precision``. Every bundle is exported before any runs: the int8 calibrator
    needs per-session onnxruntime pools, which onnxruntime refuses once a run has made the shared one."""
    from molmoact2_edge.checkpoint import checkpoint_sha256
    from molmoact2_edge.cli.demo import CACHE, cached_bundle
    from molmoact2_edge.export.pipeline import ExportOptions

    fp32 = CACHE / "bundles" / f"{checkpoint_sha256(checkpoint)[:16]}-fp32"  # cached_bundle's naming
    options = ExportOptions(
        precision=precision,
        calib=args.calib if precision == "int8" else None,
        fp32_bundle=fp32 if precision != "fp32" and (fp32 / "manifest.json").is_file() else None,
    )
    return cached_bundle(checkpoint, precision, CACHE, options)


def run(bundle: Path, precision: str, args: argparse.Namespace) -> dict[str, object]:
    from molmoact2_edge.cli.run import RunSettings, run_policy, sim_episodes

    settings = RunSettings(
        bundle, "sim-so101", None, args.backend, args.duration, args.episodes, args.hz, stall_timeout_s=10.0,
        first_move_limit=args.first_move_limit, refused_first_move="next",  # a refused first move: a failure
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
    parser.add_argument("--first-move-limit", type=float, default=0.35,
                        help="As demo's: the largest first move, as a fraction of each joint's range.")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="Do not touch docs/benchmarks.md.")
    parser.add_argument(
        "--report-only", action="store_true", help="Run nothing: table the eval_demo_*.json already there."
    )
    args = parser.parse_args()

    if not args.report_only:
        bundles = {precision: export(args.checkpoint, precision, args) for precision in args.precision}
        for precision, bundle in bundles.items():
            record = run(bundle, precision, args)
            (args.checkpoint / f"eval_demo_{precision}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(markdown_table(HEADERS, [row(args.checkpoint.name, record)]), flush=True)
    rows = [
        row(args.checkpoint.name, json.loads(p.read_text()))
        for p in sorted(args.checkpoint.glob("eval_demo_*.json"))
    ]
    if rows and not args.no_write:
        body = (
            "Closed-loop success through the exported bundle on onnxruntime, in the loop `molmo-edge demo` "
            "runs (Feetech emulator behind the real driver and the safety layer, real-time at 10 Hz, "
            "20 s per episode at most), seeded scenes disjoint from the training demos. "
            "Intervals are 95 % Wilson intervals. Measured on the shared, loaded 2-core CPU.\n\n"
            + markdown_table(HEADERS, rows)
        )
        write_section(
            f"demo-success-{args.checkpoint.name}", f"Demo-loop success: {args.checkpoint.name}", body
        )


HEADERS = ["checkpoint", "task", "precision", "seeds", "successes", "rate", "95% interval"]


def row(name: str, record: dict[str, Any]) -> list[object]:
    from molmoact2_edge.cli.demo import wilson_interval

    k, n, seed = int(record["successes"]), int(record["episodes"]), int(record["seed"])
    low, high = wilson_interval(k, n)
    return [name, record["task"], record["precision"], f"{seed}-{seed + n - 1}", f"{k}/{n}",
            f"{100 * k / n:.0f}%", f"{100 * low:.0f}-{100 * high:.0f}%"]  # fmt: skip


if __name__ == "__main__":
    main()
