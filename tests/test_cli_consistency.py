"""Every example in every command's --help parses as written, and the repository paths it names exist.

An example is a line of a command's help starting with ``molmo-edge`` (continued with a trailing
backslash). It is parsed by the real click command: an unknown option, a bad choice or a missing
argument fails. A path that does not exist is accepted only when it is a placeholder for the
user's own file (anything outside ``checkpoints/``, which ships with the repository).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

import click
import pytest

from molmoact2_edge.cli.main import COMMANDS, cli
from tests._runtime_bundle import REPO


def _commands() -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None
        yield name, command
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield f"{name} {sub.name}", sub


def _examples(text: str) -> list[str]:
    lines, out, current = text.splitlines(), [], ""
    for line in lines:
        stripped = line.strip()
        if current:
            current += " " + stripped.rstrip("\\").strip()
        elif stripped.startswith("molmo-edge ") and not stripped.startswith("molmo-edge:"):
            current = stripped.rstrip("\\").strip()
        if current and not stripped.endswith("\\"):
            out.append(re.sub(r"\s+#.*$", "", current))  # a trailing comment
            current = ""
    return out


_BY_EXAMPLE = {ex: name for name, command in _commands() for ex in _examples(command.help or "")}
_BY_EXAMPLE.update({ex: "molmo-edge" for ex in _examples(cli.help or "")})
EXAMPLES = sorted((owner, ex) for ex, owner in _BY_EXAMPLE.items())


def test_there_are_examples_for_the_main_commands() -> None:
    named = {ex.split()[1] for _, ex in EXAMPLES}
    assert {"run", "export", "demo", "train", "motors", "calibrate", "eval", "recover"} <= named


@pytest.mark.parametrize(("owner", "example"), EXAMPLES, ids=[f"{o}: {e}" for o, e in EXAMPLES])
def test_help_example_parses(owner: str, example: str) -> None:
    words = shlex.split(example)[1:]
    if words[0] in ("torchrun",):
        return
    command = cli.get_command(click.Context(cli), words[0])
    assert command is not None, example
    args = words[1:]
    if isinstance(command, click.Group):
        command, args = command.commands[args[0]], args[1:]
    args = [a for a in args if a not in ("[--json]",)]
    try:
        command.make_context(words[0], args)
    except click.BadParameter as err:
        missing = "does not exist" in str(err)
        names_repo_path = any(a.startswith("checkpoints/") and not (REPO / a).exists() for a in args)
        assert missing and not names_repo_path, f"{example}: {err}"
    except click.UsageError as err:
        pytest.fail(f"{owner} --help example does not parse: {example}: {err}")


def _param(command_name: str, option: str) -> click.Parameter:
    command = cli.get_command(click.Context(cli), command_name)
    assert command is not None
    return next(p for p in command.params if option in getattr(p, "opts", ()))


def test_shared_options_agree_across_run_demo_eval_bench() -> None:
    assert {_param(c, "--sim-task").default for c in ("run", "demo", "eval")} == {"touch"}
    assert {_param(c, "--backend").default for c in ("run", "demo", "eval")} == {"auto"}
    assert "default: auto" in (_param("bench", "--backend").help or "")  # repeatable; none given means auto
    assert {_param(c, "--hz").default for c in ("run", "demo", "bench")} == {None}  # from the bundle's contract
    for sub in ("scan", "read", "write", "setup"):
        motors = cli.get_command(click.Context(cli), "motors")
        assert isinstance(motors, click.Group)
        opts = next(p.opts for p in motors.commands[sub].params if p.name == "ids")
        assert opts[0] == "--ids", (sub, opts)
    assert "koch" in _param("run", "--robot").type.choices  # type: ignore[attr-defined]


def test_demo_checks_the_sim_task_before_exporting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["demo", "--task", "fly", "--cache", str(tmp_path)])
    assert result.exit_code == 2 and "'fly' is not one of" in result.output
    assert not any(tmp_path.iterdir())  # nothing was exported
