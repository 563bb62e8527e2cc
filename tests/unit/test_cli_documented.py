"""Every subcommand and every long option of the CLI appears in the docs (README.md or docs/)."""

import argparse

from agent.cli import build_parser
from tests import docs

DOCS = docs.all_text()


def walk(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prefix} {name}".strip())
        else:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in ("--help",):
                    yield prefix, opt
    if prefix:
        yield prefix, None


def test_every_command_and_option_is_in_the_docs():
    missing = []
    for command, opt in walk(build_parser()):
        if opt is None:
            if f"spot-agent {command}" not in DOCS:
                missing.append(f"spot-agent {command}")
        elif opt not in DOCS:
            missing.append(f"spot-agent {command} {opt}")
    assert missing == []
