"""`skinclr ... --help`: every option of every command says what it does and, where it has one,
its default, in its own help text (not only in what the formatter appends).

The parser is built in-process (skinclr.cli.main.build_parser), so the walk over every command
and subcommand takes milliseconds."""
from __future__ import annotations

import argparse

import pytest

from skinclr.cli.main import build_parser


def commands(parser: argparse.ArgumentParser, prefix: str = "skinclr") -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every command that runs something, subcommands such as `data check` included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, f"{prefix} {name}") or [(f"{prefix} {name}", sub)]
    return found


COMMANDS = commands(build_parser())


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_the_walk_finds_every_command():
    names = {name for name, _ in COMMANDS}
    assert {"skinclr data check", "skinclr data synth", "skinclr data download", "skinclr pretrain",
            "skinclr finetune", "skinclr evaluate", "skinclr predict", "skinclr sweep", "skinclr promote",
            "skinclr ensemble", "skinclr report", "skinclr quickstart", "skinclr server", "skinclr gc"} <= names
    assert sum(len(options(p)) for _, p in COMMANDS) >= 40


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_has_help_that_states_its_default(name, parser):
    for action in options(parser):
        flag = "/".join(action.option_strings) or action.dest
        text = action.help
        assert text and text is not argparse.SUPPRESS and text.strip(), f"{name} {flag}: no help text"
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        if "%(default)s" in text:
            continue
        if default in ("", []):  # an empty default is said in words, e.g. "default: none"
            assert "default" in text, f"{name} {flag}: its help does not say what it does without it: {text!r}"
        else:
            assert str(default) in text, f"{name} {flag}: its help does not state its default {default!r}: {text!r}"


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_the_help_renders_with_its_example(name, parser):
    text = parser.format_help()  # a bad %-placeholder in any help string fails here
    assert "example:" in text and name in text
    for action in options(parser):
        if action.option_strings:
            assert action.option_strings[-1] in text
