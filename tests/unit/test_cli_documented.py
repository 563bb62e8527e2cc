"""Every subcommand and every long option of the CLI appears in the README."""

import argparse
import os

from agent.cli import build_parser

README = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()


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


def test_every_command_and_option_is_in_the_readme():
    missing = []
    for command, opt in walk(build_parser()):
        if opt is None:
            if f"spot-agent {command}" not in README:
                missing.append(f"spot-agent {command}")
        elif opt not in README:
            missing.append(f"spot-agent {command} {opt}")
    assert missing == []
