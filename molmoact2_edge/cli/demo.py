"""``molmo-edge demo``: the bundled checkpoint, exported and run in closed loop on the simulated SO-101.

The checkpoint in ``checkpoints/`` (or ``--checkpoint``) is exported once to a bundle cached
under ``.cache/molmo-edge/bundles/<checkpoint sha256>-<precision>/``; then each episode starts a
fresh seeded MuJoCo scene whose six servos are a Feetech emulator on a pty, reached through the
real ``SO101`` robot class and ``FeetechBus`` driver, behind the safety layer, at the sim's
control rate. It shows live progress, prints success per episode, latency per stage, loop jitter
and power (or why power is unavailable), and saves plots, one MP4 per episode (the camera beside
commanded vs actual joints) and the ``report`` page of its telemetry.

\b
Examples:
  molmo-edge demo
  molmo-edge demo --episodes 5 --task place --backend onnxruntime --out demo_out/
  molmo-edge demo --checkpoint my_ckpt/ --precision fp16
  molmo-edge demo --display              # watch it live in rerun
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import click

from molmoact2_edge.cli.run import DEFAULT_SIM_TASK, SIM_TASKS, display_options
from molmoact2_edge.errors import CheckpointError
from molmoact2_edge.runtimes.first_move import FirstMoveConfig

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(".cache") / "molmo-edge"
EVAL_SEED = 100_000  # first scene seed of `eval` and `demo`; `sim record` demos count up from 0


DEFAULT_CHECKPOINT = "so101-touch"  # the demo's policy; its Think sibling is so101-touch-think


def bundled_checkpoint(root: Path = REPO / "checkpoints") -> Path:
    """The checkpoint ``demo`` runs: ``checkpoints/so101-touch``, else the first directory holding a config.json."""
    if (root / DEFAULT_CHECKPOINT / "config.json").is_file():
        return root / DEFAULT_CHECKPOINT
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if not found:
        raise CheckpointError(
            f"no bundled checkpoint under {root} (expected <name>/config.json); pass --checkpoint DIR"
        )
    return found[0]


def cached_bundle(checkpoint: Path, precision: str, cache: Path = CACHE, options: Any = None) -> Path:
    """The bundle for ``checkpoint`` at ``precision``, exported on first use and reused while it verifies.

    options: an ``export.pipeline.ExportOptions`` (int8 needs its ``calib``); default: just the precision.
    """
    from molmoact2_edge.checkpoint import checkpoint_sha256
    from molmoact2_edge.errors import BundleError
    from molmoact2_edge.export.pipeline import ExportOptions, export_bundle
    from molmoact2_edge.runtimes.bundle import GRAPHS, Bundle

    target = cache / "bundles" / f"{checkpoint_sha256(checkpoint)[:16]}-{precision}{_variant(options)}"
    if (target / "manifest.json").is_file():
        try:
            bundle = Bundle.open(target)
            stale = [g for g in bundle.graph_names if [s["name"] for s in bundle.input_specs(g)] != list(GRAPHS[g].inputs)]
            if not stale:
                log.info("using cached bundle %s", target)
                return target
            log.warning("cached bundle %s has the old inputs of %s (e.g. no RTC inputs); exporting again", target, stale)
        except BundleError as err:
            log.warning("cached bundle %s is unusable (%s); exporting again", target, err)
    click.echo(f"exporting {checkpoint} ({precision}) to {target} ...")
    # into a staging folder renamed when complete: an export killed mid-way (kill -9 runs no cleanup)
    # leaves only the staging folder, which the next export replaces
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_bundle(
        checkpoint,
        staging,
        options or ExportOptions(precision=precision),
        progress=lambda m: click.echo(f"  {m}"),
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _variant(options: Any) -> str:
    """A cache-name suffix for export options that change the bundle's contents (int8 calibration data, cameras):
    two benchmarks calibrating on different data must not share (and silently reuse) one int8 bundle."""
    calib = getattr(options, "calib", None)
    cameras = getattr(options, "cameras", None)
    if calib is None and cameras is None:
        return ""
    key = f"{Path(calib).resolve() if calib is not None else ''}|{','.join(cameras or ())}"
    return "-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def measured_rate(checkpoint: Path, task: str, precision: str) -> str | None:
    """The checkpoint's recorded closed-loop success on ``task`` (``eval_demo_<precision>.json`` beside it), as a line.

    Three demo episodes cannot tell 80 % from 50 %; this says what 50 seeded episodes through the
    same bundle and loop measured, with its 95 % Wilson interval.
    """
    import json

    path = checkpoint / f"eval_demo_{precision}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("task") != task:
        return None
    k, n = int(record["successes"]), int(record["episodes"])
    low, high = wilson_interval(k, n)
    return (
        f"measured: {k}/{n} ({100 * k / n:.0f} %, 95 % interval {100 * low:.0f}-{100 * high:.0f} %) "
        f"over seeds {record['seed']}-{record['seed'] + n - 1} through this {precision} bundle ({path.name})"
    )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def save_plots(stats: dict[str, Any], telemetry_path: Path, out: Path, hz: float) -> list[Path]:
    """Latency per stage (from the JSONL's chunk records), loop jitter, power over time."""
    from molmoact2_edge.runtimes import plots
    from molmoact2_edge.runtimes.telemetry import read_jsonl

    out.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[float]] = {}
    for record in read_jsonl(telemetry_path):
        if record["type"] == "chunk":
            for stage, ms in record["timings_ms"].items():
                samples.setdefault(stage, []).append(ms / 1e3)
    written = [plots.latency_histograms({"demo": samples}, out / "latency_per_stage.png")]
    written.append(plots.loop_jitter(stats["period_errors_ms"], hz, out / "loop_jitter.png"))
    power = plots.power_trace(stats["power_trace"], out / "power.png")
    return written + ([power] if power else [])


@click.command("demo")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Default: checkpoints/.",
)
@click.option(
    "--precision", default="fp32", show_default=True, help="Bundle precision (fp32, fp16, int8, int4)."
)
@click.option("--backend", default="auto", show_default=True, help="auto | onnxruntime | tensorrt | torch.")
@click.option(
    "--task",
    "--sim-task",
    "sim_task",
    type=click.Choice(SIM_TASKS),
    default=DEFAULT_SIM_TASK,
    show_default=True,
    help="Simulated task (checked before exporting).",
)
@click.option("--episodes", default=3, show_default=True)
@click.option("--duration", default=20.0, show_default=True, help="Seconds per episode at most.")
@click.option(
    "--hz", type=float, default=None, help="Control rate [default: the bundle's robot contract, the rate it was trained at]."
)
@click.option("--override-contract", is_flag=True, help="Let --hz differ from the bundle's robot contract.")
@click.option(
    "--first-move-limit",
    default=FirstMoveConfig.max_fraction,
    show_default=True,
    help="Refuse a first target farther than this fraction of a joint's range (as `run`).",
)
@click.option("--size", default=128, show_default=True, help="Camera resolution (square).")
@click.option("--seed", default=EVAL_SEED, show_default=True,
              help="Seed of the first episode's scene (counts up); the default is eval's, away from the demos'.")  # fmt: skip
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=CACHE / "demo", show_default=True
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Plots, the report page and videos.")
@click.option("--video/--no-video", default=True, show_default=True, help="One MP4 per episode (needs --plots).")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE,
    show_default=True,
    help="Bundle cache.",
)
@display_options
def demo(
    checkpoint: Path | None,
    precision: str,
    backend: str,
    sim_task: str,
    episodes: int,
    duration: float,
    hz: float | None,
    override_contract: bool,
    first_move_limit: float,
    size: int,
    seed: int,
    out: Path,
    plots: bool,
    video: bool,
    cache: Path,
    display: str | None,
    save_rrd: Path | None,
) -> None:
    """Export the bundled checkpoint and run it on the simulated SO-101 through the real Feetech driver.

    \b
    Examples:
      molmo-edge demo
      molmo-edge demo --episodes 5 --task place --out demo_out/
    """
    from molmoact2_edge.cli.run import RunSettings, print_summary, run_policy, sim_episodes
    from molmoact2_edge.runtimes.bundle import Bundle
    from molmoact2_edge.runtimes.preflight import preflight, resolve_run
    from molmoact2_edge.viz.progress import RunProgress

    ckpt = checkpoint or bundled_checkpoint()
    bundle = Bundle.open(cached_bundle(ckpt, precision, cache))
    choices = resolve_run(bundle.contract, "sim-so101", hz=hz, override=override_contract)
    preflight(bundle.contract, "sim-so101", None, task=sim_task)
    click.echo(f"control rate {choices.hz:g} Hz (the bundle's robot contract), joint frame {choices.joint_frame}")
    out.mkdir(parents=True, exist_ok=True)
    telemetry = out / "telemetry.jsonl"
    telemetry.unlink(missing_ok=True)
    # a simulated arm holding still is harmless: tolerate a slow or busy laptop starving inference
    settings = RunSettings(
        bundle, "sim-so101", None, backend, duration, episodes, choices.hz, telemetry=telemetry,
        stall_timeout_s=10.0, joint_frame=choices.joint_frame, overrides=choices.overrides,
        first_move_limit=first_move_limit,
        display=display, save_rrd=save_rrd, video_dir=out / "videos" if plots and video else None,
    )  # fmt: skip
    progress = RunProgress(episodes)
    try:
        episodes_of = sim_episodes(sim_task, size, choices.hz, choices.joint_frame)
        results, stats = run_policy(settings, lambda i: episodes_of(seed + i), observers=[progress])
    finally:
        progress.close()
    print_summary(results, stats)
    successes = sum(r["success"] for r in results)
    click.echo(
        f"success: {successes}/{len(results)} episodes ({sim_task}, seeds {seed}-{seed + len(results) - 1})"
    )
    measured = measured_rate(ckpt, sim_task, precision)
    if measured:
        click.echo(measured)
    click.echo(f"telemetry: {telemetry}")
    if plots:
        from molmoact2_edge.viz.report import write_report

        written = save_plots(stats, telemetry, out / "plots", choices.hz)
        click.echo(f"plots: {', '.join(str(p) for p in written)}")
        click.echo(f"report: {write_report(telemetry, out / 'report')[-1]}")
        for r in results:
            if r.get("video"):
                click.echo(f"video: {r['video']}")
