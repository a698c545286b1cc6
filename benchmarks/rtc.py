"""Chunk transitions under latency: naive swap vs inference-time RTC vs training-time RTC, in the simulator.

Two sections of docs/benchmarks.md:

1. ``rtc-transitions``: for each injected latency and each transition, ``molmo-edge eval --inject-latency-ms
   MS --rtc MODE --json`` in its own process (cells never share a process or thread pool), seeded
   episodes; success rate with a 95 % Wilson interval, p99 seam jump vs p99 within-chunk step (degrees,
   arm joints), safety clips per episode, the measured delay in ticks.
2. ``rtc-vjp``: the exportable guidance (finite-difference VJP, one extra expert pass per step, and the
   identity-Jacobian form) against the exact autograd VJP of the PyTorch reference, on simulator
   observations with the previous chunk as the committed prefix.

Defaults are the full protocol (50 episodes per cell, 0/100/200/300 ms, wall clock):

    MUJOCO_GL=egl python benchmarks/rtc.py --rtc-checkpoint runs/touch-rtc

``--clock virtual`` counts ticks instead of sleeping (the latency is then the whole inference delay):
for a machine that cannot run the policy at the sim's rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_cell(path: Path, rtc: str, latency_ms: float, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "molmoact2_edge.cli.main", "eval", str(path), "--task", args.task,
        "--episodes", str(args.episodes), "--seed", str(args.seed), "--inject-latency-ms", str(latency_ms),
        "--rtc", rtc, "--clock", args.clock, "--threads", str(args.threads), "--json",
    ]  # fmt: skip
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    report["wall_s"] = time.perf_counter() - start
    return report


def transitions(args: argparse.Namespace) -> None:
    contenders = [("naive swap", args.checkpoint, "off"), ("inference-time RTC", args.checkpoint, "inference")]
    if args.rtc_checkpoint is not None:
        contenders.append(("training-time RTC", args.rtc_checkpoint, "training"))
    rows = []
    for latency in args.latencies:
        for name, path, rtc in contenders:
            r = run_cell(path, rtc, latency, args)
            lo, hi = wilson(r["successes"], r["episodes"])
            seam, step = r["seam_jump_p99_deg"], r["within_chunk_step_p99_deg"]
            ratio = f"{seam / step:.2f}" if seam is not None and step else "-"
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            rows.append([
                f"{latency:g}", name, f"{r['successes']}/{r['episodes']}", f"{100 * r['success_rate']:.0f}% "
                f"({100 * lo:.0f}-{100 * hi:.0f})", fmt(seam), fmt(step), ratio,
                f"{r['safety_clips_per_episode']:.1f}", fmt(r["delay_ticks"].get("p50")),
                f"{r['held_ticks_per_episode']:.1f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), f"({r['wall_s']:.0f} s)", flush=True)
            _write_transitions(rows, args)  # after every cell: a cut-short run still leaves its table


def _write_transitions(rows: list[list[str]], args: argparse.Namespace) -> None:
    headers = ["latency ms", "transition", "successes", "success (95% CI)", "seam jump p99 deg",
               "within-chunk step p99 deg", "seam / step", "safety clips / episode", "delay ticks p50",
               "held ticks / episode"]  # fmt: skip
    body = (
        markdown_table(headers, rows)
        + f"\n\nTask `{args.task}`, seeds {args.seed}..{args.seed + args.episodes - 1} per cell, {args.clock} clock, "
        f"base checkpoint `{args.checkpoint}`, training-time RTC checkpoint `{args.rtc_checkpoint}`. "
        "Each cell is one `molmo-edge eval --inject-latency-ms MS --rtc MODE --json` process "
        "(PyTorch reference policy, the sampler the flow graph exports). Jumps are the largest arm-joint "
        "change of the policy's targets (before the safety layer), degrees."
    )
    write_section("rtc-transitions", "Chunk transitions under latency: naive vs inference-time vs training-time RTC", body)


def vjp_accuracy(args: argparse.Namespace) -> None:
    import torch

    from molmoact2_edge.model.policy import Policy
    from molmoact2_edge.rtc import CommittedPrefix
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    torch.set_num_threads(args.threads)
    policies = {v: Policy.from_checkpoint(args.checkpoint, rtc="inference", rtc_vjp=v) for v in ("autograd", "fd", "identity")}
    size = int(policies["fd"].config.vit_config.image_default_input_size[0])
    errors: dict[str, list[float]] = {"fd": [], "identity": [], "off": []}
    seconds: dict[str, list[float]] = {v: [] for v in policies}
    delay = 3
    with SimEnv(args.task, render=RenderConfig(width=size, height=size, depth=False), cameras=("front",)) as env:
        for k in range(args.vjp_observations):
            obs = env.reset(args.seed + k)
            previous = policies["fd"].act(obs, seed=k).actions  # the chunk the robot is executing
            for _ in range(2):
                obs, _, _ = env.step(previous[0])
            prefix = CommittedPrefix(previous[2:], delay)  # 2 ticks later: its remaining actions
            chunks = {}
            for name, policy in policies.items():
                t0 = time.perf_counter()
                chunks[name] = policy.act(obs, seed=10_000 + k, prefix=prefix).actions
                seconds[name].append(time.perf_counter() - t0)
            plain = policies["fd"].act(obs, seed=10_000 + k).actions
            exact = chunks["autograd"]
            scale = float(np.max(np.abs(plain - exact)))
            for name, chunk in (("fd", chunks["fd"]), ("identity", chunks["identity"]), ("off", plain)):
                errors[name].append(float(np.max(np.abs(chunk - exact))) / max(scale, 1e-9))
    rows = [
        [name, f"{np.mean(errors[key]):.3f}", f"{np.max(errors[key]):.3f}",
         f"{1e3 * np.median(seconds.get(key, [float('nan')])):.0f}" if key in seconds else "-", extra]
        for name, key, extra in (
            ("finite-difference VJP (exported)", "fd", "1"),
            ("identity Jacobian", "identity", "0"),
            ("no guidance (plain flow)", "off", "0"),
        )
    ]  # fmt: skip
    rows.append(["exact autograd VJP (reference only)", "0", "0", f"{1e3 * np.median(seconds['autograd']):.0f}", "backward"])
    body = markdown_table(
        ["guidance", "mean error vs autograd", "max error vs autograd", "act() ms p50", "extra expert passes / step"], rows
    ) + (
        f"\n\nError = max |chunk - chunk(autograd)| / max |chunk(no guidance) - chunk(autograd)| over the chunk "
        f"(robot units), {args.vjp_observations} simulator observations of `{args.task}`, committed prefix = the "
        f"previous chunk's remaining actions, delay {delay} ticks, same noise seed for every row; "
        f"checkpoint `{args.checkpoint}`, {args.threads} torch thread(s)."
    )
    write_section("rtc-vjp", "RTC guidance: exportable vector-Jacobian products vs autograd", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "so101-touch")
    parser.add_argument("--rtc-checkpoint", type=Path, default=None,
                        help="A checkpoint trained with --rtc-max-delay (the training-time RTC row).")  # fmt: skip
    parser.add_argument("--task", default="touch")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 100, 200, 300])
    parser.add_argument("--clock", choices=["wall", "virtual"], default="wall")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vjp-observations", type=int, default=10)
    parser.add_argument("--only", choices=["transitions", "vjp"], default=None)
    args = parser.parse_args()
    if args.only in (None, "vjp"):
        vjp_accuracy(args)
    if args.only in (None, "transitions"):
        transitions(args)


if __name__ == "__main__":
    main()
