"""``molmo-edge recover DIR``: turn a recording interrupted by a crash into a valid LeRobot dataset, in place."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("recover")
@click.argument("record_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def recover(record_dir: Path) -> None:
    """Recover the `run --record RECORD_DIR` that was killed: every spooled frame becomes part of a dataset.

    \b
    Examples:
      molmo-edge recover recordings/session1
    """
    from molmoact2_edge.runtimes.recording import recover as recover_recording

    count = recover_recording(record_dir)
    click.echo(f"recovered {count} episode(s) into {record_dir}")
