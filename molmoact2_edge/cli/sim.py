"""``molmo-edge sim``: simulated SO-101 commands (record scripted demonstrations)."""

from __future__ import annotations

from pathlib import Path

import click

TASK_NAMES = ("touch", "lift", "place")


@click.group(name="sim")
def sim() -> None:
    """Simulated SO-101 (MuJoCo): scripted demonstrations as LeRobot datasets."""


@sim.command(name="record")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    default=("lift",),
    show_default=True,
    help="Task (repeat for a multi-task dataset; episodes cycle through them): " + ", ".join(TASK_NAMES),
)
@click.option("--episodes", type=int, default=20, show_default=True, help="Successful episodes to write.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New dataset directory.")
@click.option("--seed", type=int, default=0, show_default=True, help="First episode seed (seeds count up).")
@click.option(
    "--noise",
    type=float,
    default=0.0,
    show_default=True,
    help="DART noise: std (degrees) added to the executed arm joints; the clean expert action is recorded.",
)
@click.option("--fps", type=int, default=10, show_default=True, help="Control rate = dataset fps (Hz).")
@click.option(
    "--size", type=int, default=128, show_default=True, help="Camera width = height (pixels, even)."
)
@click.option("--codec", default=None, help="Video codec (default libsvtav1 as LeRobot, else libx264).")
@click.option(
    "--depth-camera",
    "depth_cameras",
    multiple=True,
    type=click.Choice(["front", "wrist"]),
    help="Also store this camera's depth map (metres) as observation.depth.<camera> (MolmoAct2-Think).",
)
def record(
    tasks: tuple[str, ...],
    episodes: int,
    out: Path,
    seed: int,
    noise: float,
    fps: int,
    size: int,
    codec: str | None,
    depth_cameras: tuple[str, ...],
) -> None:
    """Record scripted-expert demos as a LeRobotDataset v3.0 (front + wrist video, 6-D state and action).

    \b
    Examples:
      molmo-edge sim record --task lift --episodes 50 --out data/lift
      molmo-edge sim record --task touch --task lift --episodes 100 --noise 1 --out data/mix
      molmo-edge sim record --task lift --episodes 50 --depth-camera front --out data/lift_depth
    """
    from rich.progress import Progress

    from molmoact2_edge.errors import SimulationError
    from molmoact2_edge.sim.record import record_demos
    from molmoact2_edge.sim.tasks import get_task

    for name in tasks:
        get_task(name)
    if size < 16 or size % 2:
        raise SimulationError(f"--size must be an even number >= 16 (video needs even sides), got {size}")
    with Progress() as progress:
        bar = progress.add_task(f"recording {'+'.join(tasks)}", total=episodes)
        report = record_demos(
            out,
            list(tasks),
            episodes,
            seed=seed,
            noise=noise,
            control_hz=fps,
            size=size,
            codec=codec,
            depth_cameras=depth_cameras,
            progress=lambda n: progress.advance(bar, n),
        )
    click.echo(
        f"wrote {report.saved} episodes, {report.frames} frames to {out} "
        f"({report.attempted - report.saved} failed attempts dropped) in {report.seconds:.1f} s "
        f"({report.saved / report.seconds:.2f} episodes/s, {report.frames / report.seconds:.0f} frames/s)"
    )
