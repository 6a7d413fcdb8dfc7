"""The README's commands as a newcomer types them: every `orchestrator` line of its command list names a
real subcommand and only options that subcommand has, every `orchestrator` command of its shell blocks
parses as written, and every `make` target it names exists."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README, flags=re.S)


def _help(words: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        _parser().parse_args([*words, "--help"])
    assert done.value.code == 0, words
    return out.getvalue()


def test_every_command_of_the_list_has_the_options_it_shows() -> None:
    (listing,) = [b for b in _blocks("text") if b.startswith("orchestrator sweep")]
    lines = [line for line in listing.splitlines() if line.startswith("orchestrator ")]
    assert len(lines) >= 12
    for line in lines:
        words = line.split()[1:3]
        words = words if words[0] == "data" else words[:1]
        text = _help(words)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
            has = re.search(rf"{flag}(?![\w-])", text)
            assert has, f"{line!r}: `orchestrator {' '.join(words)}` has no {flag}"


def test_every_shell_command_parses_as_written() -> None:
    commands = []
    for block in _blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith("orchestrator "):
                commands.append(shlex.split(command)[1:])
            elif command.startswith("make "):
                target = command.split()[1]
                assert re.search(rf"(?m)^{re.escape(target)}:", (ROOT / "Makefile").read_text()), target
    assert commands
    for args in commands:
        _parser().parse_args(args)  # exits 2 on what argparse refuses
