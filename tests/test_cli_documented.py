"""Every CLI command and every option of it is documented (README.md or docs/)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from syncengine.cli import SUBCOMMANDS, _load, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(
    p.read_text(encoding="utf-8")
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
)


def options_of(command: str) -> list[str]:
    parser = argparse.ArgumentParser()
    module = _load(command)
    assert module is not None, f"syncengine {command} is not installed"
    module.add_arguments(parser)
    return [
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help" and action.help != argparse.SUPPRESS
    ]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_command_and_its_options_are_documented(command: str) -> None:
    assert f"syncengine {command}" in DOCS or f"make {command}" in DOCS
    missing = [opt for opt in options_of(command) if opt not in DOCS]
    assert missing == [], f"syncengine {command}: undocumented options {missing}"


def test_top_level_help_lists_every_command() -> None:
    text = build_parser(only="").format_help()
    for command in SUBCOMMANDS:
        assert command in text
