"""The CLI's contract: commands listed, user errors as one line + non-zero exit, --debug shows tracebacks."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from molmoact2_edge.cli import main as cli_main


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setitem(cli_main.COMMANDS, "fails", "tests._cli_fixture_commands:fails")
    monkeypatch.setitem(cli_main.COMMANDS, "crashes", "tests._cli_fixture_commands:crashes")
    return CliRunner()


def test_help_lists_every_registered_command() -> None:
    result = CliRunner().invoke(cli_main.cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in cli_main.COMMANDS:
        assert name in result.output


def test_user_error_prints_one_line_and_exits_nonzero(runner: CliRunner) -> None:
    result = runner.invoke(cli_main.cli, ["fails", "/nope"])
    assert result.exit_code == 1
    assert "error: /nope: config.json is missing" in result.output
    assert "Traceback" not in result.output


def test_debug_reraises_with_traceback(runner: CliRunner) -> None:
    result = runner.invoke(cli_main.cli, ["--debug", "fails", "/nope"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "CheckpointError"


def test_bug_is_not_swallowed(runner: CliRunner) -> None:
    result = runner.invoke(cli_main.cli, ["crashes"])
    assert isinstance(result.exception, RuntimeError)


def test_unknown_command_suggests_closest(runner: CliRunner) -> None:
    result = runner.invoke(cli_main.cli, ["fail", "x"])
    assert result.exit_code == 2
    assert "Did you mean 'fails'?" in result.output


def test_console_script_exit_code_without_traceback() -> None:
    """Through the real entry point in a subprocess: stderr holds one error line, exit code is non-zero."""
    code = (
        "import sys; from molmoact2_edge.cli import main as m; "
        "m.COMMANDS['fails'] = 'tests._cli_fixture_commands:fails'; m.main(['fails', '/x'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: /x: config.json is missing")
    assert "Traceback" not in proc.stderr
