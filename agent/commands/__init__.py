"""One module per CLI subcommand. Each defines ``register(subparsers)`` and sets ``func``."""

import argparse

from agent.config import DEFAULT_CONFIG_PATH


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"config file (default {DEFAULT_CONFIG_PATH})")
