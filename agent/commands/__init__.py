"""One module per CLI subcommand. Each defines ``register(subparsers)`` and sets ``func``."""

import argparse

from agent.config import DEFAULT_CONFIG_PATH


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"config file (default {DEFAULT_CONFIG_PATH})")


OPTION_MAX = 1e9  # seconds (31 years) or days: beyond it, date arithmetic overflows into a traceback


def finite_float(text: str) -> float:
    """argparse ``type`` for every numeric option: ``float()`` takes ``nan`` and ``inf``, and nan
    passes every range check after it, so refuse them here, in argparse's one-line error (exit 2);
    likewise a finite 1e300, which overflows the first datetime it meets."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(value) > OPTION_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {OPTION_MAX:g} in size, got {text!r}")
    return value
