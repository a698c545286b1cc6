"""Think depth stage on sim episodes: graph calls and time with the depth cache vs without, exactness, act() vs continuous.

\b
    python benchmarks/think_depth.py --checkpoint checkpoints/so101-touch-think
    python benchmarks/think_depth.py                      # a tiny random Think checkpoint (logic only)

What each number includes:

- frames: sim episodes (task ``lift``, the scripted expert moving the arm) at the control
  rate ``--hz``; one chunk is requested every ``n_action_steps`` control steps, as the
  control loop does, so consecutive frames are one chunk apart.
- three sessions of the same fp32 Think bundle on onnxruntime CPU see every frame, in
  alternating order: **cache** (unchanged cells replayed, changed cells verified against
  their cached codes in ``decode_block`` calls), **cache, sequential** (the same cache, one
  ``decode_step`` per token: the decoding the speculative one must reproduce exactly) and
  **no cache** (every cell predicted, one ``decode_step`` per token). Depth graph calls and
  depth-stage ms are per frame, the first frame of each episode (nothing cached) left out.
- codes identical: the cache session's codes equal the sequential session's on every frame.
- act(): ``PolicySession.act`` end to end, the Think bundle (with its cache) vs the continuous
  checkpoint's bundle on the same frames and backend, interleaved.
- first frames: an episode's first frame re-predicts every cell; the cache session drafts them
  from the camera's last codes (the previous episode's last frame), the sequential one steps.
- the floor: both again on the last frame repeated (nothing changed: every cell replayed, every
  draft accepted, so the depth stage is exactly one ``decode_block`` call). No exact scheme with
  the cache does less on a frame, so this bounds what any drafting could reach on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.preprocess import depth_cell_vectors  # noqa: E402
from molmoact2_edge.runtimes.session import PolicySession  # noqa: E402
from molmoact2_edge.runtimes.telemetry import percentiles  # noqa: E402


def sim_frames(episodes: int, chunks: int, hz: float, every: int):  # type: ignore[no-untyped-def]
    """(episode, observation) at each chunk request: every ``every`` control steps of the scripted expert."""
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    for episode in range(episodes):
        with SimEnv("lift", seed=episode, control_hz=hz, render=RenderConfig(width=128, height=128)) as env:
            obs = env.reset(seed=episode)
            for _ in range(chunks):
                yield episode, obs
                for _ in range(every):
                    obs, _, _ = env.step(env.expert_action())


def measure(
    think: Path, continuous: Path | None, episodes: int, chunks: int, hz: float, threads: int
) -> dict:
    opts = {"intra_op_threads": threads, "providers": ("CPUExecutionProvider",)}
    sessions = {name: PolicySession(think, "onnxruntime", **opts) for name in ("cache", "sequential", "none")}
    sessions["sequential"].speculative_depth = False
    sessions["none"].depth_cache.enabled = False
    other = PolicySession(continuous, "onnxruntime", **opts) if continuous else None
    camera = sessions["cache"].camera_order[0]
    rows: dict[str, dict[str, list[float]]] = {n: {"calls": [], "ms": []} for n in sessions}
    cells, rejected, mismatched_frames, frames = [], [], 0, 0
    act_ms: dict[str, list[float]] = {"think": [], "continuous": []}
    first_frames: dict[str, dict[str, list[float]]] = {n: {"calls": [], "ms": []} for n in ("cache", "sequential")}
    history: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (episode, cell vectors, codes, changed)
    last_episode = -1
    for episode, obs in sim_frames(episodes, chunks, hz, sessions["cache"].n_action_steps):
        first = episode != last_episode
        last_episode = episode
        if first:
            for s in sessions.values():
                s.reset()
        order = list(sessions) if frames % 2 == 0 else list(reversed(sessions))
        chunks_out = {}
        for name in order:
            t0 = time.perf_counter()
            chunks_out[name] = sessions[name].act(obs, seed=frames)
            if name == "cache" and not first:
                act_ms["think"].append((time.perf_counter() - t0) * 1e3)
        if other is not None and not first:
            t0 = time.perf_counter()
            other.act(obs, seed=frames)
            act_ms["continuous"].append((time.perf_counter() - t0) * 1e3)
        if not np.array_equal(
            sessions["cache"].depth_cache.codes(camera), sessions["sequential"].depth_cache.codes(camera)
        ):
            mismatched_frames += 1
        frames += 1
        changed = np.zeros(sessions["cache"].depth_cache.num_cells, dtype=bool)
        changed[chunks_out["cache"].info["depth_repredicted"]] = True
        history.append((episode, depth_cell_vectors(obs.images[camera]), sessions["sequential"].depth_cache.codes(camera), changed))
        if first:
            if episode > 0:  # every cell re-predicted; the cache session drafts from the last episode's codes
                for name in ("cache", "sequential"):
                    first_frames[name]["calls"].append(chunks_out[name].info["depth_graph_calls"])
                    first_frames[name]["ms"].append(chunks_out[name].timings["depth"] * 1e3)
            continue
        for name, chunk in chunks_out.items():
            rows[name]["calls"].append(chunk.info["depth_graph_calls"])
            rows[name]["ms"].append(chunk.timings["depth"] * 1e3)
        cells.append(chunks_out["cache"].info["depth_cells_repredicted"])
        rejected.append(chunks_out["cache"].info["depth_drafts_rejected"])
    if other is not None:
        act_ms.update(static_frame_act(sessions["cache"], other, obs))
    for s in [*sessions.values(), *([other] if other else [])]:
        s.close()
    return {
        "frames": frames,
        "cells": sessions["cache"].depth_cache.num_cells,
        "rows": rows,
        "cells_repredicted_mean": float(np.mean(cells)),
        "drafts_rejected_mean": float(np.mean(rejected)),
        "mismatched_frames": mismatched_frames,
        "act_ms": {k: percentiles(v) for k, v in act_ms.items() if v},
        "first_frames": first_frames,
        "draft_misses": draft_misses(history),
    }


def draft_misses(history: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Over the changed cells of every frame after an episode's first: the share whose exact new code differs from
    a draft taken from the cached code (what the runtime uses), from the code the cell had on the past frame where
    its pixels looked most alike, or from the code of the most alike cell anywhere in the episode so far."""
    misses = {"cached code": 0, "the cell's look-alike past frame": 0, "the episode's look-alike cell": 0}
    total = 0
    for i, (episode, cells, codes, changed) in enumerate(history):
        past = [h for h in history[:i] if h[0] == episode]
        if not past:
            continue
        unit = cells / np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
        past_unit = [c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12) for _, c, _, _ in past]
        pooled, pooled_codes = np.concatenate(past_unit), np.concatenate([k for _, _, k, _ in past])
        for cell in np.flatnonzero(changed):
            per_frame = [float(u[cell] @ unit[cell]) for u in past_unit]
            drafts = (past[-1][2][cell], past[int(np.argmax(per_frame))][2][cell], pooled_codes[int(np.argmax(pooled @ unit[cell]))])
            for name, draft in zip(misses, drafts, strict=True):
                misses[name] += int(draft != codes[cell])
            total += 1
    return {name: count / max(total, 1) for name, count in misses.items()} | {"cells": float(total)}


def static_frame_act(think: PolicySession, continuous: PolicySession, obs, calls: int = 16) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """act() on one frame over and over, interleaved: from the second call on every cell is replayed and every
    draft accepted, so the depth stage is one block call. Think's floor with the cache, whatever the scene."""
    times: dict[str, list[float]] = {"think_static": [], "continuous_static": []}
    think.act(obs, seed=0)
    for call in range(calls):
        for name, session in (("think_static", think), ("continuous_static", continuous)):
            t0 = time.perf_counter()
            chunk = session.act(obs, seed=call)
            times[name].append((time.perf_counter() - t0) * 1e3)
            if name == "think_static" and chunk.info["depth_graph_calls"] != 1:
                raise RuntimeError(f"an unchanged frame took {chunk.info['depth_graph_calls']} depth graph calls, not 1")
    return times


def render(result: dict, hz: float) -> str:
    rows = result["rows"]
    base_calls, base_ms = np.mean(rows["none"]["calls"]), np.median(rows["none"]["ms"])
    table = []
    labels = {
        "cache": "cache (speculative block)",
        "sequential": "cache, sequential steps",
        "none": "no cache",
    }
    for name, label in labels.items():
        calls, ms = np.mean(rows[name]["calls"]), np.median(rows[name]["ms"])
        table.append(
            [label, f"{calls:.1f}", f"{1 - calls / base_calls:.0%}", f"{ms:.1f}", f"{1 - ms / base_ms:.0%}"]
        )
    body = markdown_table(["depth stage", "graph calls / frame", "fewer calls", "p50 ms", "less time"], table)
    body += (
        f"\n\n{result['frames']} frames at {hz:g} Hz (one chunk request per n_action_steps control steps); "
        f"first frame of each episode left out. Cells re-predicted per frame: "
        f"{result['cells_repredicted_mean']:.1f} of {result['cells']}; drafts rejected: "
        f"{result['drafts_rejected_mean']:.1f}. Codes identical to sequential decoding on "
        f"{result['frames'] - result['mismatched_frames']}/{result['frames']} frames."
    )
    first = result["first_frames"]
    if first["cache"]["ms"]:
        body += (
            f"\n\nFirst frames of episodes 2-{len(first['cache']['ms']) + 1} (every cell re-predicted; the cache session "
            f"drafts them from the camera's last codes, the previous episode's): depth stage p50 "
            f"{np.median(first['cache']['ms']):.1f} ms in {np.mean(first['cache']['calls']):.1f} graph calls vs "
            f"{np.median(first['sequential']['ms']):.1f} ms in {np.mean(first['sequential']['calls']):.1f} sequential "
            f"(worst frame {max(first['cache']['ms']):.1f} vs {max(first['sequential']['ms']):.1f} ms)."
        )
    misses = result["draft_misses"]
    body += "\n\nChanged cells whose new code differs from a draft (" + f"{misses['cells']:.0f} cells; " + ", ".join(
        f"{name}: {share:.0%}" for name, share in misses.items() if name != "cells"
    ) + "): the cached code is the best of the three guesses."
    act = result["act_ms"]
    if "continuous" in act:
        think, cont = act["think"]["p50"], act["continuous"]["p50"]
        body += "\n\n" + markdown_table(
            ["act() on onnxruntime fp32", "p50 ms", "p99 ms"],
            [["Think (with the cache)", f"{think:.1f}", f"{act['think']['p99']:.1f}"],
             ["continuous", f"{cont:.1f}", f"{act['continuous']['p99']:.1f}"]],
        )  # fmt: skip
        body += f"\n\nThink act() / continuous act(): {think / cont:.2f}x."
        static, cont_static = act["think_static"]["p50"], act["continuous_static"]["p50"]
        body += (
            f" The floor with the cache, an unchanged frame (every cell replayed, one `decode_block` call): Think "
            f"{static:.1f} ms vs continuous {cont_static:.1f} ms on that frame, {static / cont_static:.2f}x."
        )
    return body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a MolmoAct2-Think checkpoint (default: a tiny random one)"
    )
    parser.add_argument(
        "--continuous", type=Path,
        help="continuous checkpoint to compare act() with (default: the bundled one; with no --checkpoint a tiny random one)",
    )  # fmt: skip
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8, help="chunk requests per episode")
    parser.add_argument(
        "--hz", type=float, default=10.0, help="control rate (the sim's and the checkpoints' default)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cameras", nargs="+", default=["front", "wrist"])
    args = parser.parse_args()

    import torch

    from molmoact2_edge.cli.demo import CACHE, bundled_checkpoint, cached_bundle
    from molmoact2_edge.export.pipeline import ExportOptions

    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    checkpoint, other = args.checkpoint, args.continuous or bundled_checkpoint()
    note = ""
    if checkpoint is None:  # tiny random checkpoints, Think and continuous, of the same preset and seed
        from tests._runtime_bundle import make_checkpoint

        checkpoint, other = CACHE / "think-ckpt", args.continuous or CACHE / "continuous-ckpt"
        for path, think in ((checkpoint, True), (other, False)):
            if not (path / "config.json").is_file():
                make_checkpoint(path, think=think)
        note = (
            " Random weights: the model does not close the span with `<depth_end>` after the codes, so every frame"
            " also decodes a greedy tail of 8 tokens step by step, which a trained model does not."
        )
    options = ExportOptions(cameras=tuple(args.cameras))
    think = cached_bundle(checkpoint, "fp32", CACHE, options)
    continuous = cached_bundle(other, "fp32", CACHE, options)
    result = measure(think, continuous, args.episodes, args.chunks, args.hz, args.threads)
    body = render(result, args.hz)
    body += f"\n\nThink checkpoint `{checkpoint.name}`, continuous `{other.name}`, {args.threads} CPU thread(s).{note}"
    print(body)
    write_section(
        f"think-depth-{checkpoint.name}",
        f"Think depth stage ({checkpoint.name}): cache vs no cache, act() vs continuous",
        body,
    )


if __name__ == "__main__":
    main()
