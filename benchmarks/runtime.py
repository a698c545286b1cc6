"""Runtime benchmark: act() on onnxruntime per precision vs eager PyTorch, the depth cache on sim episodes, loop jitter.

\b
    python benchmarks/runtime.py                         # the bundled checkpoint
    python benchmarks/runtime.py --checkpoint CKPT --iterations 60 --rounds 20 --threads 1 2 --precisions fp32 int8

What each number includes:

- ``act`` latency: ``PolicySession.act`` end to end (preprocessing, prompt, every graph,
  un-normalization) on onnxruntime CPU, and the reference ``model.policy.Policy.act`` (eager
  PyTorch, fp32) on the same checkpoint and observation. Each contender runs in its own
  process, loaded once; they take turns over short rounds, one at a time, the others blocked
  (``runtimes.benchmark.compare_backends``), at each thread setting. This machine's speed drifts
  by tens of percent within seconds (a shared host), so rounds are a few calls long and the
  ``paired`` ratio divides each round's medians; medians, p25-p75, the range of round medians and
  the CPU time the waiting contenders used (0: they never shared the cores) are reported; ratios are
  PyTorch p50 / contender p50 at the same thread setting from this one run.
- depth cache (Think checkpoints only): over sim episodes (the scripted expert moving the arm,
  frames from the sim's camera), the fraction of depth cells replayed instead of re-predicted,
  and the depth stage's p50 with the cache vs with every cell re-predicted.
- loop: period error p99 of the 30 Hz control loop (DryRunGate, no robot) with onnxruntime
  inference running in its thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.runtimes.benchmark import Contender, compare_backends, loop_jitter  # noqa: E402
from molmoact2_edge.runtimes.session import PolicySession  # noqa: E402


def act_latency(
    checkpoint: Path, bundles: dict[str, Path], threads: int, iterations: int, rounds: int
) -> dict[str, Any]:
    """act() per contender at ``threads``, each in its own process, alternated over rounds (``compare_backends``).

    Contenders: eager PyTorch on the checkpoint; onnxruntime per bundle precision with the backend's
    defaults (one shared pool, spinning off, CPU rewrites); and for fp32 the old setting (a pool per
    session, spinning on, no rewrites) so the change is measured, not asserted.
    """
    first = next(iter(bundles.values()))
    ort = {"intra_op_threads": threads}
    contenders = [
        Contender("pytorch eager", "eager", checkpoint=str(checkpoint)),
        # the onnxruntime backend flushes denormals on CPU: the same switch for PyTorch, to show what it is worth there
        Contender(
            "pytorch eager, denormals flushed", "eager", {"flush_denormals": True}, checkpoint=str(checkpoint)
        ),
    ]
    for precision, bundle in bundles.items():
        contenders.append(Contender(f"onnxruntime {precision}", "onnxruntime", ort, bundle=str(bundle)))
    # act() here commits no RTC prefix, so the flow runs as its zero-prefix variant; once a run commits one
    # (RTC on, every chunk after the first) the general flow graph runs: timed too, for the best precision
    best = "int8" if "int8" in bundles else next(iter(bundles))
    contenders.append(
        Contender(
            f"onnxruntime {best}, general flow graph (what runs once an RTC prefix is committed)",
            "onnxruntime",
            {**ort, "zero_variants": False},
            bundle=str(bundles[best]),
        )
    )
    if "fp32" in bundles:
        fp32 = str(bundles["fp32"])
        old = {
            **ort,
            "thread_pool": "per-session",
            "spinning": True,
            "cpu_rewrites": False,
            "flush_denormals": False,
        }
        contenders.append(
            Contender(
                "onnxruntime fp32 as before (pool per session, spinning, no rewrites, denormals kept)",
                "onnxruntime",
                old,
                bundle=fp32,
            )
        )
        contenders.append(
            Contender(
                "onnxruntime fp32, shared pool spinning",
                "onnxruntime",
                {**ort, "spinning": True},
                bundle=fp32,
            )
        )
    return compare_backends(first, contenders, iterations, rounds=rounds, threads=threads)


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


def parity_of(bundle: Path) -> str:
    """The bundle's export parity gate, as recorded in its manifest (pass/fail and the end-to-end ratio)."""
    parity = json.loads((bundle / "manifest.json").read_text()).get("parity") or {}
    e2e = parity.get("end_to_end", {})
    verdict = "pass" if parity.get("passed") else "FAIL"
    if not e2e.get("limit"):
        return verdict
    return f"{verdict} (e2e {e2e['ratio'] / e2e['limit']:.2g} of the limit)"


def latency_table(report: dict[str, Any], threads: int, bundles: dict[str, Path]) -> list[list[str]]:
    """One row per contender. ``paired``: the median over rounds of eager's round median / the contender's (a
    round the machine ran slow for everyone counts once), with the p25-p75 of those per-round ratios; the
    speedup column divides the pooled medians."""
    eager = np.array(report["backends"]["pytorch eager"]["spread_ms"]["round_medians"])
    rows = []
    for name, result in report["backends"].items():
        total, spread = result["stages_ms"]["total"], result["spread_ms"]
        precision = name.split()[1].rstrip(",") if name.startswith("onnxruntime") else None
        ratios = eager / np.array(spread["round_medians"])
        rows.append([
            name, str(threads), f"{total['p50']:.1f}", f"{spread['p25']:.1f}-{spread['p75']:.1f}",
            f"{min(spread['round_medians']):.1f}-{max(spread['round_medians']):.1f}", f"{result['speedup_vs_torch']:.2f}x",
            f"{result['speedup_vs_torch_paired']:.2f}x ({np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f})",
            f"{result['idle_cpu_ms']:.0f}" if result["idle_cpu_ms"] is not None else "-",
            parity_of(bundles[precision]) if precision in bundles else "-",
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: the bundled one)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--iterations", type=int, default=60, help="timed act() calls per contender and thread setting")
    parser.add_argument("--rounds", type=int, default=20, help="alternated rounds the calls are split over")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread settings to measure")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loop-seconds", type=float, default=5.0)
    parser.add_argument(
        "--cameras", nargs="+", help="camera order (default: the checkpoint's norm-stats cameras)"
    )
    parser.add_argument("--act-only", action="store_true", help="skip the depth-cache and loop-jitter parts")
    args = parser.parse_args()

    from molmoact2_edge.cli.demo import CACHE, bundled_checkpoint

    checkpoint = args.checkpoint or bundled_checkpoint()
    cameras = tuple(args.cameras) if args.cameras else None
    CACHE.mkdir(parents=True, exist_ok=True)
    # every export first: export's int8 calibrator needs a process without onnxruntime's shared pool
    bundles = export_all(checkpoint, args.precisions, cameras)
    think_bundle = None
    if not args.act_only and not json.loads((bundles[args.precisions[0]] / "manifest.json").read_text())["model"].get("depth"):
        from tests._runtime_bundle import make_checkpoint

        think = CACHE / "think-ckpt"
        if not (think / "config.json").is_file():
            make_checkpoint(think, think=True)
        think_bundle = export_all(think, ["fp32"], cameras or ("front", "wrist"))["fp32"]

    rows = []
    for threads in args.threads:
        report = act_latency(checkpoint, bundles, threads, args.iterations, args.rounds)
        rows += latency_table(report, threads, bundles)
    body = markdown_table(
        [
            "act()",
            "threads",
            "p50 ms",
            "p25-p75 ms",
            "round medians ms (min-max)",
            "speedup vs PyTorch eager",
            "paired (p25-p75 over rounds)",
            "CPU the waiting contenders used, ms",
            "parity gate",
        ],
        rows,
    )
    body += (
        f"\n\nCheckpoint `{checkpoint.name}`; {report['method'].replace(f'threads {args.threads[-1]}', 'threads as listed')}; "
        f"{args.iterations} timed calls per contender and thread setting. onnxruntime rows use the backend's defaults "
        "(one shared intra-op pool per process, spinning off, CPU rewrites: fused RMSNorm, rotary embeddings and "
        "residual norms and, for int8, dynamic u8s8 GEMMs from the bundle's QDQ weights with their bias, the "
        "adaLN modulations of a flow step merged into one; constant subgraphs folded through QDQ; the flow as its "
        "variant with the RTC prefix inputs fixed to zero, which is what runs when no prefix is committed, as in "
        "these calls: time embedding and adaLN modulations folded, for int8 the gates in the GEMM scales; "
        "denormals flushed to zero while graphs run) unless the row says otherwise; eager PyTorch runs with "
        "`torch.set_num_threads` = threads. fp16 bundles are for GPUs (on the x86 CPU provider fp16 runs as casts "
        "around fp32 math) and are not timed here."
    )

    title = f"Runtime ({checkpoint.name}): act() per backend, precision and threads, depth cache, loop jitter"
    if args.act_only:
        print(body)
        write_section(f"runtime-{checkpoint.name}", title, body)
        return
    session_bundle = bundles[args.precisions[0]]
    savings = depth_cache_savings(session_bundle, args.episodes, args.steps)
    think_note = ""
    if savings is None and think_bundle is not None:  # not a Think checkpoint: a tiny random Think one
        savings = depth_cache_savings(think_bundle, args.episodes, args.steps)
        think_note = " (a tiny random MolmoAct2-Think checkpoint: which cells are replayed depends on the pixels only)"
    if savings is not None:
        body += f"\n\nDepth cache on {args.episodes} sim episode(s) x {args.steps} frames{think_note}:\n\n"
        body += markdown_table(
            ["depth cells replayed", "depth p50 ms (cache)", "depth p50 ms (no cache)"],
            [[f"{savings['replayed_fraction']:.0%}", f"{savings['depth_p50_ms_cached']:.1f}", f"{savings['depth_p50_ms_full']:.1f}"]],
        )

    loop = loop_jitter(session_bundle, "onnxruntime", args.loop_seconds, 30.0)
    err = loop["loop"]["period_error_ms"]
    body += (
        f"\n\nControl loop at 30 Hz with onnxruntime {args.precisions[0]} inference running: period error "
        f"p50 {err['p50']:.2f} ms, p99 {err['p99']:.2f} ms, max {err['max']:.2f} ms, "
        f"overruns {loop['loop']['overruns']}/{loop['loop']['ticks']}, held ticks {loop['loop']['held']}."
    )
    print(body)
    write_section(f"runtime-{checkpoint.name}", title, body)  # one section per checkpoint


if __name__ == "__main__":
    main()
