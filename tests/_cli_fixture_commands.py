"""Commands used only by tests/test_cli.py to exercise the CLI's error mapping."""

import click

from molmoact2_edge.errors import CheckpointError


@click.command()
@click.argument("path")
def fails(path: str) -> None:
    """Always fails with a user-facing error."""
    raise CheckpointError(f"{path}: config.json is missing; point CKPT at a checkpoint directory")


@click.command()
def crashes() -> None:
    """Fails with a bug (not a MolmoEdgeError): the traceback must survive."""
    raise RuntimeError("a real bug")
