"""Runtime benchmark: act() on onnxruntime per precision vs eager PyTorch, the depth cache on sim episodes, loop jitter.

\b
    python benchmarks/runtime.py                         # the bundled checkpoint
    python benchmarks/runtime.py --checkpoint CKPT --iterations 30 --precisions fp32 int8

What each number includes:

- ``act`` latency: ``PolicySession.act`` end to end (preprocessing, prompt, every graph,
  un-normalization) on onnxruntime CPU, and the reference ``model.policy.Policy.act`` (eager
  PyTorch, fp32) on the same checkpoint and observation; interleaved per iteration after two
  warm-up calls each; ratios are PyTorch p50 / backend p50 from this one run.
- depth cache (Think checkpoints only): over sim episodes (the scripted expert moving the arm,
  frames from the sim's camera), the fraction of depth cells replayed instead of re-predicted,
  and the depth stage's p50 with the cache vs with every cell re-predicted.
- loop: period error p99 of the 30 Hz control loop (DryRunGate, no robot) with onnxruntime
  inference running in its thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.runtimes.benchmark import loop_jitter, synthetic_observation  # noqa: E402
from molmoact2_edge.runtimes.session import PolicySession  # noqa: E402
from molmoact2_edge.runtimes.telemetry import percentiles  # noqa: E402


def act_latency(checkpoint: Path, bundles: dict[str, Path], iterations: int) -> dict[str, dict[str, float]]:
    """name -> total-latency percentiles (ms), interleaving the ORT sessions and the eager reference."""
    import torch

    from molmoact2_edge.model.policy import Policy

    threads = torch.get_num_threads()
    sessions = {
        f"onnxruntime {p}": PolicySession(b, "onnxruntime", intra_op_threads=threads)
        for p, b in bundles.items()
    }
    first = next(iter(sessions.values()))
    reference = Policy.from_checkpoint(
        checkpoint, camera_order=first.camera_order, bucket=int(first.bundle.prompt["bucket"])
    )
    obs = synthetic_observation(first)
    calls: dict[str, Any] = {name: s.act for name, s in sessions.items()}
    calls["pytorch eager"] = reference.act
    totals: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for i in range(2 + iterations):
            for name, act in calls.items():
                t0 = time.perf_counter()
                act(obs, seed=i)
                if i >= 2:
                    totals[name].append(time.perf_counter() - t0)
    for session in sessions.values():
        session.close()
    return {name: percentiles(v, 1e3) for name, v in totals.items()}


def depth_cache_savings(bundle: Path, episodes: int, steps: int) -> dict[str, float] | None:
    """Fraction of depth cells replayed over sim frames, and depth-stage p50 with / without the cache."""
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    with PolicySession(bundle, "onnxruntime") as session:
        if not session.depth:
            return None
        cached, full, replayed, cells = [], [], 0, 0
        fresh = PolicySession(bundle, "onnxruntime")
        fresh.depth_cache.threshold = 2.0  # cosine similarity never reaches 2: every cell re-predicted
        for episode in range(episodes):
            with SimEnv("lift", seed=episode, render=RenderConfig(width=128, height=128)) as env:
                obs = env.reset(seed=episode)
                session.reset()
                fresh.reset()
                for step in range(steps):
                    chunk = session.act(obs, seed=step)
                    reference = fresh.act(obs, seed=step)
                    if step > 0:  # the first frame of an episode has nothing to replay
                        replayed += session.depth_cache.num_cells - int(chunk.info["depth_cells_repredicted"])
                        cells += session.depth_cache.num_cells
                        cached.append(chunk.timings["depth"])
                        full.append(reference.timings["depth"])
                    obs, _, _ = env.step(env.expert_action())
        fresh.close()
    return {
        "replayed_fraction": replayed / max(1, cells),
        "depth_p50_ms_cached": float(np.median(cached) * 1e3),
        "depth_p50_ms_full": float(np.median(full) * 1e3),
    }


def sim_calibration(path: Path, count: int = 8) -> Path:
    """int8 calibration data: observations of the simulated SO-101 under the scripted expert, as .npz."""
    from molmoact2_edge.export.calibration import save_observations
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    observations = []
    with SimEnv("lift", seed=100, render=RenderConfig(width=128, height=128)) as env:
        obs = env.reset(seed=100)
        for _ in range(count):
            observations.append(obs)
            for _ in range(3):  # spread the frames over the motion
                obs, _, _ = env.step(env.expert_action())
    save_observations(path, observations)
    return path


def export_all(checkpoint: Path, precisions: list[str], cameras: tuple[str, ...] | None) -> dict[str, Path]:
    """One cached bundle per precision; the quantized ones reuse the fp32 graphs (same checkpoint and shapes)."""
    from molmoact2_edge.cli.demo import CACHE, cached_bundle
    from molmoact2_edge.export.pipeline import ExportOptions

    fp32 = cached_bundle(checkpoint, "fp32", CACHE, ExportOptions(cameras=cameras))
    bundles = {"fp32": fp32}
    for precision in [p for p in precisions if p != "fp32"]:
        calib = sim_calibration(CACHE / "sim_calibration.npz") if precision == "int8" else None
        options = ExportOptions(precision=precision, cameras=cameras, fp32_bundle=fp32, calib=calib)
        bundles[precision] = cached_bundle(checkpoint, precision, CACHE, options)
    return {p: bundles[p] for p in precisions}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loop-seconds", type=float, default=5.0)
    parser.add_argument(
        "--cameras", nargs="+", help="camera order (default: the checkpoint's norm-stats cameras)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime alike")
    args = parser.parse_args()

    import torch

    from molmoact2_edge.cli.demo import CACHE, bundled_checkpoint

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or bundled_checkpoint()
    CACHE.mkdir(parents=True, exist_ok=True)
    bundles = export_all(checkpoint, args.precisions, tuple(args.cameras) if args.cameras else None)
    latency = act_latency(checkpoint, bundles, args.iterations)
    ref = latency["pytorch eager"]["p50"]
    rows = [
        [name, f"{s['p50']:.1f}", f"{s['p99']:.1f}", f"{ref / s['p50']:.2f}x"] for name, s in latency.items()
    ]
    body = markdown_table(["act()", "p50 ms", "p99 ms", "speedup vs PyTorch eager"], rows)
    body += f"\n\nCheckpoint `{checkpoint.name}`, {args.iterations} interleaved iterations, {args.threads} CPU thread(s) each."

    savings = depth_cache_savings(bundles[args.precisions[0]], args.episodes, args.steps)
    think_note = ""
    if savings is None:  # not a Think checkpoint: measure the cache on a tiny random Think one
        from tests._runtime_bundle import make_checkpoint

        think = CACHE / "think-ckpt"
        if not (think / "config.json").is_file():
            make_checkpoint(think, think=True)
        think_bundle = export_all(
            think, ["fp32"], tuple(args.cameras) if args.cameras else ("front", "wrist")
        )["fp32"]
        savings = depth_cache_savings(think_bundle, args.episodes, args.steps)
        think_note = (
            " (a tiny random MolmoAct2-Think checkpoint: which cells are replayed depends on the pixels only)"
        )
    if savings is not None:
        body += f"\n\nDepth cache on {args.episodes} sim episode(s) x {args.steps} frames{think_note}:\n\n"
        body += markdown_table(
            ["depth cells replayed", "depth p50 ms (cache)", "depth p50 ms (no cache)"],
            [
                [
                    f"{savings['replayed_fraction']:.0%}",
                    f"{savings['depth_p50_ms_cached']:.1f}",
                    f"{savings['depth_p50_ms_full']:.1f}",
                ]
            ],
        )

    loop = loop_jitter(bundles[args.precisions[0]], "onnxruntime", args.loop_seconds, 30.0)
    err = loop["loop"]["period_error_ms"]
    body += (
        f"\n\nControl loop at 30 Hz with onnxruntime {args.precisions[0]} inference running: period error "
        f"p50 {err['p50']:.2f} ms, p99 {err['p99']:.2f} ms, max {err['max']:.2f} ms, "
        f"overruns {loop['loop']['overruns']}/{loop['loop']['ticks']}, held ticks {loop['loop']['held']}."
    )
    print(body)
    title = f"Runtime ({checkpoint.name}): act() per backend and precision, depth cache, loop jitter"
    write_section(f"runtime-{checkpoint.name}", title, body)  # one section per checkpoint measured


if __name__ == "__main__":
    main()
