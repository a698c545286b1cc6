"""Simulation and data benchmark: render cost, expert success rate and speed, demo generation, sampling.

    MUJOCO_GL=egl python benchmarks/sim.py [--seeds 50] [--demos 10]

Numbers include: sim-so101 = the SO101 driver over the emulator pty while the physics thread runs;
render = ``Scene.render`` / ``render_depth`` (update_scene + draw + readback),
median of 50 after 5 warm-up frames; expert episodes = state only (no rendering), full episodes
until success or timeout; demo generation = ``record_demos`` end to end (physics, expert, two
128 px cameras, AV1 encoding, parquet); sampling = ``LeRobotDataset.sample`` with a 30-step
chunk and both cameras, first with a cold cache (decoding) then warm.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.data.reader import LeRobotDataset  # noqa: E402
from molmoact2_edge.sim.env import SimEnv  # noqa: E402
from molmoact2_edge.sim.record import record_demos  # noqa: E402
from molmoact2_edge.sim.robot import make_sim_so101  # noqa: E402
from molmoact2_edge.sim.scene import CAMERA_NAMES, RenderConfig, Scene  # noqa: E402
from molmoact2_edge.sim.tasks import TASKS  # noqa: E402


def bench_render(size: int) -> list[list[object]]:
    scene = Scene(RenderConfig(width=size, height=size))
    scene.reset(0)
    rows = []
    for cam in CAMERA_NAMES:
        for kind, fn in (("rgb", scene.render), ("depth", scene.render_depth)):
            for _ in range(5):
                fn(cam)
            times = []
            for _ in range(50):
                t = time.perf_counter()
                fn(cam)
                times.append(time.perf_counter() - t)
            rows.append([f"{size}x{size}", cam, kind, f"{np.median(times) * 1e3:.2f}"])
    t = time.perf_counter()
    scene.step(5000)
    rows.append([f"{size}x{size}", "-", "mj_step (us)", f"{(time.perf_counter() - t) / 5000 * 1e6:.1f}"])
    scene.close()
    return rows


def bench_experts(seeds: int) -> list[list[object]]:
    rows = []
    for name in TASKS:
        env = SimEnv(name, cameras=())
        ok, steps = 0, []
        t = time.perf_counter()
        for seed in range(seeds):
            env.reset(seed)
            success = done = False
            while not done:
                _, s, done = env.step(env.expert_action())
                success |= s
            ok += success
            steps.append(env.steps)
        dt = time.perf_counter() - t
        rows.append(
            [name, f"{ok}/{seeds}", f"{np.mean(steps):.1f}", f"{dt / seeds:.3f}", f"{sum(steps) / dt:.0f}"]
        )
    return rows


def bench_record(demos: int, workdir: Path) -> tuple[list[list[object]], Path]:
    out = workdir / "demos"
    report = record_demos(out, ["lift"], demos, noise=1.0)
    row = [
        "lift, 2 cams 128 px, DART noise 1 deg",
        report.saved,
        report.frames,
        f"{report.seconds:.1f}",
        f"{report.saved / report.seconds:.2f}",
        f"{report.frames / report.seconds:.1f}",
    ]
    return [row], out


def bench_sampling(root: Path, workdir: Path) -> list[list[object]]:
    rows = []
    ds = LeRobotDataset(root, cache_dir=workdir / "cache")
    order = np.random.default_rng(0).permutation(len(ds))
    for label in ("cold (decode + cache)", "warm (cached)"):
        t = time.perf_counter()
        for i in order:
            ds.sample(int(i), 30)
        dt = time.perf_counter() - t
        rows.append([label, len(ds), f"{dt:.2f}", f"{len(ds) / dt:.0f}"])
    return rows


def bench_sim_robot() -> list[list[object]]:
    """Driver calls of the real SO101 class over the emulator pty (physics thread running meanwhile)."""
    handle = make_sim_so101("lift", seed=0, size=64, cameras=("front",))
    rows = []
    try:
        robot = handle.robot
        state = robot.read_state()
        for label, call in (
            ("read_state (sync read, 6 servos)", robot.read_state),
            ("send_action (sync write, 6 servos)", lambda: robot.send_action(state)),
            ("get_observation (state + 64 px frame)", lambda: robot.get_observation(handle.instruction)),
        ):
            times = []
            for _ in range(50):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            rows.append([label, f"{np.median(times) * 1e3:.2f}", f"{np.percentile(times, 99) * 1e3:.2f}"])
    finally:
        handle.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=50, help="expert episodes per task")
    parser.add_argument("--demos", type=int, default=10, help="demos recorded with images")
    args = parser.parse_args()

    render_rows = bench_render(128) + bench_render(224)
    expert_rows = bench_experts(args.seeds)
    robot_rows = bench_sim_robot()
    with tempfile.TemporaryDirectory() as tmp:
        record_rows, root = bench_record(args.demos, Path(tmp))
        sample_rows = bench_sampling(root, Path(tmp))

    sections = [
        ("Render cost (ms/frame, EGL llvmpipe, no shadows, no MSAA, decimated meshes)",
         markdown_table(["size", "camera", "kind", "ms"], render_rows)),
        ("Scripted experts, state only (10 Hz control)",
         markdown_table(["task", "success", "mean steps", "s/episode", "steps/s"], expert_rows)),
        ("`sim-so101` through the Feetech driver over the emulator pty (ms)",
         markdown_table(["call", "p50", "p99"], robot_rows)),
        ("Demo generation (`record_demos`, AV1 video)",
         markdown_table(["setting", "episodes", "frames", "s", "episodes/s", "frames/s"], record_rows)),
        ("`LeRobotDataset.sample(i, 30)`, both cameras, random order",
         markdown_table(["cache", "samples", "s", "samples/s"], sample_rows)),
    ]  # fmt: skip
    body = "\n\n".join(f"**{title}**\n\n{table}" for title, table in sections)
    print(body)
    write_section("sim", "Simulation and datasets", body)


if __name__ == "__main__":
    main()
