"""The command line's structure: every command has a handler and a working ``--help``; the lazy
imports of distill.cli keep TensorBoard and matplotlib out of its start-up."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from distill.cli import build_parser, main
from tests.conftest import REPO


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command of ``parser`` as {(name, sub-name, ...): its parser}, those with
    sub-commands of their own (``data``) included."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*path, name)] = sub
                found.update(commands(sub, (*path, name)))
    return found


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def missing_handlers(parser: argparse.ArgumentParser) -> list[str]:
    """The commands that run something (no sub-commands of their own) and have no handler."""
    return [
        " ".join(path)
        for path, sub in commands(parser).items()
        if not has_subcommands(sub) and not callable(sub.get_default("handler"))
    ]


COMMANDS = sorted(commands(build_parser()))


def test_the_parser_has_every_documented_command() -> None:
    top = [
        "data",
        "train-teacher",
        "run",
        "check",
        "eval",
        "predict",
        "export",
        "summary",
        "sweep",
        "demo",
        "report",
    ]
    expected = {(name,) for name in top} | {
        ("data", "shapes"),
        ("data", "stats"),
        ("data", "convert"),
    }
    assert expected <= set(COMMANDS), expected - set(COMMANDS)


def test_every_command_has_a_handler() -> None:
    assert missing_handlers(build_parser()) == []


def test_a_command_without_a_handler_is_found() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.add_parser("new-command")
    data = commands(parser)[("data",)]
    data_sub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    data_sub.add_parser("new-data-command")
    assert sorted(missing_handlers(parser)) == ["data new-data-command", "new-command"]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_a_help(path: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distill {' '.join(path)} ")
    assert "--help" in out


def test_the_top_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for path in COMMANDS:
        assert f"\n    {path[0]} " in out or f"\n    {path[0]}\n" in out, path


def test_starting_the_cli_loads_neither_tensorboard_nor_matplotlib() -> None:
    """The reason for distill.cli's lazy imports (each says so): imported at the top, these two
    added 0.7-1.1 s (x1.16-1.22) to ``distill --help``. If this fails because ``import distill``
    itself now loads them, the lazy imports buy nothing: move them to the top."""
    code = (
        "import sys, distill.cli\n"
        "heavy = ('torch.utils.tensorboard', 'tensorboard', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
