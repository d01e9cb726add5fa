"""The command-line contract: every subcommand has --help with an example, and bad input exits
non-zero with a single line naming the problem (long paths included: no wrapping)."""

import pytest
from typer.testing import CliRunner

from walkthrough.cli import app

runner = CliRunner()
COMMANDS = ["record", "info", "train-idm", "eval-idm", "label", "train-policy", "play", "dagger", "eval-policy", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"walkthrough {command}" in result.output  # the usage example names the command


@pytest.mark.parametrize("args, message", [
    (["info", "DEEP/MISSING"], "MISSING"),
    (["record", "--game", "NotAnAtariGame", "--out", "DEEP/OUT"], "NotAnAtariGame"),
    (["label", "--ckpt", "DEEP/NO_RUN", "DEEP", "--out", "DEEP/LABELS"], "NO_RUN"),
    (["train-policy", "--data", "DEEP/MISSING", "--out", "DEEP/RUN"], "MISSING"),
    (["play", "--ckpt", "DEEP/NO_RUN", "--out", "DEEP/PLAY"], "NO_RUN"),
    (["play", "--ckpt", "DEEP/NO_RUN", "--out", "DEEP/PLAY", "--device", "tpu:9"], "tpu:9"),
    (["dagger", "--ckpt", "DEEP/NO_RUN", "--game", "Breakout", "--data", "DEEP", "--out", "DEEP/OUT"], "NO_RUN"),
    (["eval-policy", "--ckpt", "DEEP/NO_RUN", "--data", "DEEP", "--device", "tpu:9"], "tpu:9"),
    (["label", "--ckpt", "DEEP/NO_RUN", "DEEP", "--out", "DEEP/LABELS", "--device", "tpu:9"], "tpu:9"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    deep = tmp_path / ("a_rather_long_directory_name_" * 4)  # longer than any terminal line
    deep.mkdir()
    args = [a.replace("DEEP", str(deep)) for a in args]
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
