"""``molmo-edge``: the entry point, lazy command table and error -> exit code mapping.

Commands live in their own modules under ``cli/`` and are imported only when
named (or when ``--help`` lists them), so ``molmo-edge run`` on a Jetson never
imports torch, and a missing optional extra breaks only the command that needs
it. Every ``MolmoEdgeError`` becomes ``error: <message>`` on stderr and a
non-zero exit code; ``--debug`` re-raises it with its traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from molmoact2_edge import __version__
from molmoact2_edge.errors import MolmoEdgeError

# name -> "module:attribute" of a click command. Add a line here when a command works end to end.
COMMANDS: dict[str, str] = {
    "info": "molmoact2_edge.cli.info:info",
    "bench": "molmoact2_edge.cli.bench:bench",
    "demo": "molmoact2_edge.cli.demo:demo",
    "doctor": "molmoact2_edge.cli.doctor:doctor",
    "run": "molmoact2_edge.cli.run:run",
    "recover": "molmoact2_edge.cli.recover:recover",
    "report": "molmoact2_edge.cli.report:report",
    "serve": "molmoact2_edge.cli.serve:serve",
    "sim": "molmoact2_edge.cli.sim:sim",
    "train": "molmoact2_edge.cli.train:train",
    "eval": "molmoact2_edge.cli.eval:eval_command",
    "motors": "molmoact2_edge.cli.hardware:motors",
    "calibrate": "molmoact2_edge.cli.hardware:calibrate",
    "emulate": "molmoact2_edge.cli.hardware:emulate",
    "export": "molmoact2_edge.cli.export:export",
    "inspect": "molmoact2_edge.cli.export:inspect",
    "build-engines": "molmoact2_edge.cli.export:build_engines",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except MolmoEdgeError as err:  # a command whose optional extra is missing
            return _unavailable_command(cmd_name, str(err))
        return getattr(module, attr)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and name not in COMMANDS and not name.startswith("-"):
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise click.UsageError(f"No such command '{name}'.{hint}", ctx)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MolmoEdgeError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _unavailable_command(name: str, reason: str) -> click.Command:
    """A command whose module could not load: it explains why instead of vanishing from --help."""

    @click.command(name=name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise MolmoEdgeError(reason)

    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="molmo-edge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors and log at DEBUG level.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def cli(debug: bool, verbose: bool) -> None:
    """molmo-edge: export MolmoAct2-style policies and run them on cheap robots.

    \b
    Typical flow:
      molmo-edge export CKPT -o BUNDLE --precision fp16
      molmo-edge run BUNDLE --robot so101 --port /dev/ttyACM0 --camera front=/dev/video0
      molmo-edge bench BUNDLE
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    from rich.console import Console
    from rich.logging import RichHandler

    # logs go to stderr so that `--json` output on stdout stays machine-readable
    handler = RichHandler(console=Console(stderr=True), show_path=debug)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="molmo-edge")


if __name__ == "__main__":
    main()
