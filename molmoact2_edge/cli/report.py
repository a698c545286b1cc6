"""``molmo-edge report TELEMETRY.jsonl``: joints, latency, loop timing and power of a run as PNGs and one HTML page."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("telemetry", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder [default: TELEMETRY's folder / report].",
)
def report(telemetry: Path, out: Path | None) -> None:
    """Plot a run's telemetry (from `run --telemetry`, `demo`, `bench`): target vs actual per joint with
    safety clips marked, latency per stage, loop period error, power and energy per chunk.

    \b
    Examples:
      molmo-edge report .cache/molmo-edge/demo/telemetry.jsonl
      molmo-edge report run.jsonl -o run_report/
    """
    from molmoact2_edge.viz.report import write_report

    written = write_report(telemetry, out or telemetry.parent / "report")
    for path in written[:-1]:
        click.echo(f"plot: {path}")
    click.echo(f"report: {written[-1]}")
