"""``molmo-edge eval``: closed-loop success rate of a checkpoint or bundle in the simulated SO-101."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from molmoact2_edge.cli.run import display_options, open_display


@click.command(name="eval")
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--task", "--sim-task", "task", default="touch", show_default=True, help="Sim task: touch, lift, place.")
@click.option("--episodes", type=int, default=50, show_default=True, help="Closed-loop episodes (seeded).")
@click.option("--seed", type=int, default=100_000, show_default=True,
              help="Seed of the first episode (counts up); keep it away from the training demos' seeds.")  # fmt: skip
@click.option("--mode", type=click.Choice(["continuous", "discrete"]), default=None,
              help="Action head [default: continuous when the checkpoint has an expert].")  # fmt: skip
@click.option("--backend", default="auto", show_default=True, help="Backend for a BUNDLE: auto | onnxruntime | tensorrt | torch.")
@click.option(
    "--videos",
    type=click.Path(path_type=Path),
    default=None,
    help="Write mp4s of the first episodes here (cameras beside commanded vs actual joints).",
)
@click.option("--num-videos", type=int, default=3, show_default=True)
@display_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (checkpoints).")
@click.option("--inject-latency-ms", type=float, default=None,
              help="Run the real-time control loop (safety layer, inference thread) and sleep MS more per inference.")  # fmt: skip
@click.option("--rtc", type=click.Choice(["off", "inference", "training", "auto"]), default=None,
              help="Chunk transitions in the real-time loop: off (naive swap), inference- or training-time RTC, "
                   "auto (training-time if the checkpoint has it, else off) [default: auto; implies the real-time loop].")  # fmt: skip
@click.option("--clock", type=click.Choice(["wall", "virtual"]), default="wall", show_default=True,
              help="Real-time loop clock: wall (real deadlines), or virtual (ticks counted; the latency is the whole "
                   "inference delay) for machines too slow to run the policy in real time.")  # fmt: skip
@click.option("--swap-threshold", type=float, default=0.5, show_default=True,
              help="Real-time loop: ask for the next chunk when this fraction of the current one is left.")
def eval_command(
    path: Path,
    task: str,
    episodes: int,
    seed: int,
    mode: str | None,
    backend: str,
    videos: Path | None,
    num_videos: int,
    as_json: bool,
    threads: int | None,
    inject_latency_ms: float | None,
    rtc: str | None,
    clock: str,
    swap_threshold: float,
    display: str | None,
    save_rrd: Path | None,
) -> None:
    """Success rate of PATH (a checkpoint directory or an exported bundle) on a sim task.

    \b
    A checkpoint runs through the PyTorch reference policy, a bundle (a directory with
    manifest.json) through the device-side PolicySession on --backend.
    Examples:
      molmo-edge eval checkpoints/so101-touch --task touch --episodes 50
      molmo-edge eval checkpoints/so101-touch --mode discrete --episodes 50 --json
      molmo-edge eval bundle/ --task touch --episodes 20 --videos out/videos
      molmo-edge eval bundle/ --episodes 5 --save-rrd eval.rrd     # rerun: cameras, joints, chunks, latency
      molmo-edge eval checkpoints/so101-touch --episodes 50 --inject-latency-ms 200 --rtc inference --json

    \b
    With --inject-latency-ms or --rtc, episodes run in real time through the device's control loop
    and report success_rate, seam_jump_p99_deg, within_chunk_step_p99_deg and safety_clips_per_episode.
    """
    from molmoact2_edge.errors import MolmoEdgeError
    from molmoact2_edge.runtimes.bundle import MANIFEST
    from molmoact2_edge.sim.tasks import get_task
    from molmoact2_edge.training.evaluation import evaluate

    get_task(task)
    if episodes < 1:
        raise MolmoEdgeError(f"--episodes must be >= 1, got {episodes}")
    realtime = inject_latency_ms is not None or rtc is not None
    if realtime and (inject_latency_ms or 0.0) < 0:
        raise MolmoEdgeError(f"--inject-latency-ms must be >= 0, got {inject_latency_ms}")
    if realtime and videos is not None:
        raise MolmoEdgeError("--videos is for the open-loop protocol; drop --inject-latency-ms/--rtc to record videos")
    rtc_mode = rtc or "auto"
    if (path / MANIFEST).is_file():
        if mode is not None:
            raise MolmoEdgeError("--mode applies to checkpoints; a bundle's action head is fixed at export")
        from molmoact2_edge.runtimes.session import PolicySession

        policy: Any = PolicySession(path, backend, rtc=rtc_mode)
        prefix = policy.rtc not in (None, "off")
        image_size = (
            int(policy.image_size[0])
            if isinstance(policy.image_size, (tuple, list))
            else int(policy.image_size)
        )
    else:
        import torch

        from molmoact2_edge.model.policy import Policy

        if threads is not None:
            torch.set_num_threads(threads)
        policy = Policy.from_checkpoint(path, mode=mode, rtc=rtc_mode)
        image_size = int(policy.config.vit_config.image_default_input_size[0])
        prefix = policy.rtc != "off" and policy.mode == "continuous"
    if realtime:
        from molmoact2_edge.sim.realtime_eval import evaluate_realtime

        # the loop swaps by time, so it keeps the whole predicted horizon: a late chunk still covers
        # the ticks until the next one arrives (n_action_steps is what it executes at zero latency)
        policy.n_action_steps = getattr(policy, "horizon", None) or policy.chunk_length

        timed = evaluate_realtime(
            policy, task, episodes, seed=seed, latency_ms=inject_latency_ms or 0.0, rtc=prefix,
            image_size=image_size, cameras=tuple(policy.camera_order or ()) or None,
            swap_threshold=swap_threshold, clock=clock,
        )  # fmt: skip
        report = {"path": str(path), "rtc": policy.rtc if prefix else "off", **timed.to_dict()}
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(
            f"{task}: {report['successes']}/{report['episodes']} successes ({100 * report['success_rate']:.0f}%) "
            f"at +{report['inject_latency_ms']:g} ms, rtc {report['rtc']}: seam jump p99 {report['seam_jump_p99_deg']} deg, "
            f"within-chunk step p99 {report['within_chunk_step_p99_deg']} deg, "
            f"{report['safety_clips_per_episode']:.1f} safety clips per episode"
        )
        return
    from molmoact2_edge.viz.progress import StepProgress

    progress = StepProgress(f"eval {task}: episode", episodes)
    successes = 0

    def on_episode(k: int, episode: Any) -> None:
        nonlocal successes
        successes += bool(episode.success)
        outcome = "success" if episode.success else "failure"
        progress.step(k + 1, f"{outcome} in {episode.steps} steps | success so far {successes}/{k + 1}")

    viewer = open_display(display, save_rrd)
    try:
        result = evaluate(
            policy, task, episodes, seed=seed, image_size=image_size, video_dir=videos, num_videos=num_videos,
            on_episode=on_episode, watch=viewer,
        )  # fmt: skip
    finally:
        progress.close()
        if viewer is not None:
            viewer.close()
    summary: dict[str, Any] = result.to_dict()
    summary["path"] = str(path)
    summary["mode"] = mode or getattr(policy, "mode", None) or getattr(policy, "action_mode", None)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{task}: {summary['successes']}/{summary['episodes']} successes ({100 * result.success_rate:.0f}%), "
        f"mean {summary['mean_steps']:.1f} steps, {summary['mean_seconds_per_chunk'] * 1000:.0f} ms per chunk"
    )
    if summary["successes"] < summary["episodes"]:
        click.echo(
            f"failures: {summary['task_failures']} task, {summary['decode_failures']} decode "
            f"({summary['chunks_not_decoded']} chunks did not decode)"
        )
    for video in result.videos:
        click.echo(f"video: {video}")
    if save_rrd is not None:
        click.echo(f"rerun recording: {save_rrd} (open it with: rerun {save_rrd})")
