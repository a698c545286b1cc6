"""``molmo-edge bench BUNDLE``: latency per stage and per chunk, loop jitter with inference running, power.

\b
Examples:
  molmo-edge bench bundle/
  molmo-edge bench bundle/ --backend onnxruntime --backend torch --iterations 50 --json
  molmo-edge bench bundle/ --plots bench_plots/ --telemetry bench.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

STAGES = ("vision", "prefill", "depth", "decode", "flow", "total")


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    return f"{stats[key]:.1f}" if stats and key in stats else "-"


def render(report: dict[str, Any]) -> str:
    """The report as text tables (what the command prints without --json)."""
    lines = [f"latency per stage, ms (p50 / p99), {report['iterations']} timed calls per backend ({report['method']}):"]
    header = f"  {'backend':12s}" + "".join(f"{s:>18s}" for s in STAGES) + f"{'vs torch':>10s}"
    lines.append(header)
    for name, result in report["backends"].items():
        cells = "".join(
            f"{_ms(result['stages_ms'].get(s), 'p50') + ' / ' + _ms(result['stages_ms'].get(s), 'p99'):>18s}"
            for s in STAGES
        )
        speedup = f"{result['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in result else "-"
        paired = f" (paired {result['speedup_vs_torch_paired']:.2f}x)" if "speedup_vs_torch_paired" in result else ""
        spread = result["spread_ms"]
        lines.append(
            f"  {name:12s}{cells}{speedup:>10s}{paired}   total p25-p75 {spread['p25']:.1f}-{spread['p75']:.1f}"
        )
    loop = report["loop"]["loop"]
    err = loop["period_error_ms"]
    lines.append(
        f"control loop {1e3 / loop['period_ms']:.0f} Hz with inference: period error p50 {_ms(err, 'p50')} ms, "
        f"p99 {_ms(err, 'p99')} ms, max {_ms(err, 'max')} ms, overruns {loop['overruns']}/{loop['ticks']}, "
        f"held {loop['held']}"
    )
    depth = report.get("depth")
    if depth:
        lines.append(
            f"depth (Think, {depth['frames']} moving frames): graph calls per frame {depth['graph_calls_per_frame']:.1f} "
            f"(no cache {depth['graph_calls_per_frame_uncached']:.1f}), stage p50 {depth['stage_ms_p50']:.1f} ms "
            f"(no cache {depth['stage_ms_p50_uncached']:.1f} ms), cells re-predicted {depth['cells_repredicted_mean']:.1f}"
            f"/{depth['cells']}, drafts rejected {depth['drafts_rejected_mean']:.1f}"
        )
    power = report["power"]
    if power.get("available"):
        energy = power["energy_per_chunk_j"]
        lines.append(
            f"power ({power['sampler']}): energy per chunk p50 {energy.get('p50', float('nan')):.3f} J"
        )
    else:
        lines.append(f"power: unavailable ({power.get('reason', 'no sampler')})")
    return "\n".join(lines)


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--backend", "backends", multiple=True, help="Backend to measure; repeat to compare (default: auto)."
)
@click.option("--iterations", default=20, show_default=True, help="Timed act() calls per backend.")
@click.option(
    "--loop-seconds", default=5.0, show_default=True, help="How long to run the control loop for jitter."
)
@click.option(
    "--hz", type=float, default=None, help="Control rate for the jitter measurement [default: the bundle's robot contract]."
)
@click.option("--threads", type=int, help="CPU threads for every backend (default: each backend's own).")
@click.option("--rounds", type=int, help="Alternated rounds the timed calls are split over (default: about 3 calls a round).")
@click.option(
    "--one-at-a-time", is_flag=True,
    help="Start each backend's process for its turn and end it after (default: only when memory cannot hold them all).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write PNG plots here.")
@click.option("--telemetry", type=click.Path(dir_okay=False, path_type=Path), help="JSONL of the loop run.")
def bench(
    bundle: Path,
    backends: tuple[str, ...],
    iterations: int,
    loop_seconds: float,
    hz: float | None,
    threads: int | None,
    rounds: int | None,
    one_at_a_time: bool,
    as_json: bool,
    plots: Path | None,
    telemetry: Path | None,
) -> None:
    """Measure BUNDLE: latency per stage (p50/p99), loop jitter with inference running, power and energy.

    \b
    Each backend is timed in its own process, loaded once; they take turns over
    short --rounds, one at a time; repeating --backend compares them and, when
    torch is among them, reports each backend's speedup over it (pooled medians,
    and paired: the median of the per-round ratios).
    Examples:
      molmo-edge bench bundle/
      molmo-edge bench bundle/ --backend onnxruntime --backend torch --json
    """
    from molmoact2_edge.runtimes.benchmark import run_benchmark
    from molmoact2_edge.runtimes.bundle import Bundle
    from molmoact2_edge.viz.progress import StepProgress

    hz = hz or Bundle.open(bundle, verify=False).contract.control_hz  # a bench may time any rate: no override needed
    progress = StepProgress("bench", None)
    progress.show(
        f"bench: {iterations} act() calls per backend ({', '.join(backends) or 'auto'}), each in its own process, "
        f"then the control loop for {loop_seconds:g} s at {hz:g} Hz"
    )
    try:
        report = run_benchmark(
            bundle, list(backends) or ["auto"], iterations, loop_seconds, hz, telemetry, threads, rounds,
            resident=False if one_at_a_time else None,
        )
    finally:
        progress.close()
    if plots is not None:
        from molmoact2_edge.runtimes.plots import benchmark_plots

        report["plots"] = [str(p) for p in benchmark_plots(report, plots, hz)]
    for result in report["backends"].values():
        result.pop("raw_s", None)
    report["loop"].pop("period_errors_ms", None)
    report.pop("power_trace", None)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if plots is not None and not as_json:
        click.echo(f"plots: {', '.join(report['plots'])}")
