"""Every `upcycle` command's --help renders (typer renders help text as rich markup, so a stray
`[/...]` in a help string crashes it)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from upcycle.jobs.cli import app


def _paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `command` (typer's vendored click groups have list_commands)."""
    paths = [prefix]
    if hasattr(command, "list_commands"):
        ctx = command.context_class(command)
        for name in command.list_commands(ctx):
            paths += _paths(command.get_command(ctx, name), (*prefix, name))
    return paths


COMMANDS = _paths(typer.main.get_command(app))


def test_every_command_is_listed():
    names = {" ".join(p) for p in COMMANDS}
    for expected in ("train", "sft", "dpo", "convert", "serve", "eval", "pipeline", "plan",
                     "data prepare", "data chat-demo", "runs register", "model info", "reward train",
                     "reward score", "generate", "synthesize rejection", "rlhf"):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "upcycle")
def test_help_renders(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
