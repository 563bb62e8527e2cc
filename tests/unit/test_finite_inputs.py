"""Numbers must be finite, strings must be NUL-free: in the config file and on the command line.

nan compares false with everything, so it passed every ``min``/``max`` check: ``poll_interval = nan``
polled IMDS in a tight loop and ``freeze_timeout = nan`` failed every snapshot. A NUL cannot go into
argv or the environment, so a hook with one silently did not run.
"""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stderr

import pytest

from agent import cli, commands
from agent.config import ConfigError, parse


def problems(text):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    return [str(p) for p in exc.value.problems]


@pytest.mark.parametrize("section,key", [("imds", "poll_interval"), ("imds", "timeout"),
                                         ("drain", "freeze_timeout"), ("drain", "margin")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
def test_nan_and_inf_are_refused_with_the_key_path(section, key, value):
    assert problems(f"[{section}]\n{key} = {value}\n") == [
        f"{section}.{key}: must be a finite number, got {value.lstrip('+')}"]


def test_nan_in_an_array_of_tables_names_the_entry():
    text = '[[hooks]]\non = ["manual"]\ncommand = ["/bin/true"]\ntimeout = nan\n'
    assert problems(text) == ["hooks[0].timeout: must be a finite number, got nan"]


def test_integer_too_big_for_a_float_field_is_a_problem_not_an_overflow():
    # float(10**400) raises OverflowError: the schema must answer with a problem instead.
    assert problems(f"[drain]\nmargin = {10 ** 400}\n") == [f"drain.margin: must be a finite number, got {10 ** 400}"]


@pytest.mark.parametrize("value", ["1e300", "1e10"])
def test_finite_but_huge_seconds_are_refused(value):
    """threading.Event().wait(1e300) raises OverflowError: a number key without its own max is capped."""
    text = f'[[checkpoints]]\ndir = "/ckpt"\ns3 = "s3://bucket-a/c/"\ninterval = {value}\n'
    assert problems(text) == [f"checkpoints[0].interval: must be at most 1e+09, got {float(value)}"]


def test_integer_beyond_64_bits_is_refused():
    assert problems(f"[transfer]\npart_size = {2 ** 64}\n") == [f"transfer.part_size: must fit in 64 bits, got {2 ** 64}"]


def test_finite_numbers_still_parse():
    cfg = parse("[imds]\npoll_interval = 0.5\n[drain]\nfreeze_timeout = 5\n")
    assert cfg.imds.poll_interval == 0.5 and cfg.drain.freeze_timeout == 5.0


@pytest.mark.parametrize("text,path", [
    ('[[hooks]]\non = ["manual"]\ncommand = ["/bin/echo", "a\\u0000b"]\n', "hooks[0].command[1]"),
    ('[[hooks]]\non = ["manual"]\ncommand = ["/bin/true"]\nenv = { X = "a\\u0000" }\n', "hooks[0].env.X"),
    ('[agent]\nstate_dir = "/var/lib/x\\u0000y"\n', "agent.state_dir"),
])
def test_nul_in_a_string_is_refused(text, path):
    assert problems(text) == [f"{path}: must not contain a NUL character"]


def test_nul_in_a_table_key_is_refused():
    text = '[[hooks]]\non = ["manual"]\ncommand = ["/bin/true"]\nenv = { "A\\u0000B" = "x" }\n'
    [problem] = problems(text)
    assert problem.startswith("hooks[0].env.") and problem.endswith("must not contain a NUL character")


# -- the command line -------------------------------------------------------------------------

def _numeric_options():
    """(subcommand path, option string, action) for every option of every subcommand that takes a number."""
    out = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif action.type in (float, int, getattr(commands, "finite_float", float)) and action.option_strings:
                out.append((prefix, action.option_strings[0], action))

    walk(cli.build_parser(), [])
    return out


def test_no_option_uses_plain_float():
    """``type=float`` accepts nan; every numeric option goes through finite_float (or int)."""
    opts = _numeric_options()
    assert len(opts) >= 8  # drain, gc, simulate, demo, status, sync: the walk found them
    assert [f"{' '.join(p)} {o}" for p, o, a in opts if a.type is float] == []


REQUIRED = {("simulate", "trigger"): ["spot"], ("sync",): ["s3://bucket/x", "/tmp/x"]}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e300", "-1e300"])
def test_every_numeric_option_refuses_nan_and_inf_in_one_line(value):
    for prefix, option, _ in _numeric_options():
        argv = prefix + REQUIRED.get(tuple(prefix), []) + [f"{option}={value}"]
        err = io.StringIO()
        with redirect_stderr(err), pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == cli.EXIT_USAGE, argv
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and option in lines[0], (argv, lines)


def test_drain_dry_run_deadline_in_nan_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["drain", "--dry-run", "--deadline-in", "nan"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--deadline-in: must be a finite number, got 'nan'" in err


@pytest.mark.parametrize("option", ["--max-bandwidth", "--part-size"])
def test_sync_size_options_refuse_nan(option, capsys, tmp_path):
    assert cli.main(["sync", "s3://bucket/x", str(tmp_path), option, "nan"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan" in err


def test_finite_but_huge_deadline_is_one_line_not_an_overflow(capsys):
    """1e300 is finite, and overflowed the first datetime built from it (a traceback, exit 1)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["drain", "--dry-run", "--deadline-in", "1e300"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--deadline-in: must be at most 1e+09 in size" in err


def test_a_relative_config_path_is_checked_where_it_is(tmp_path, monkeypatch):
    """The component walk wants an absolute path: a relative --config is made absolute first."""
    from agent.config import load

    (tmp_path / "agent.toml").write_text("[imds]\npoll_interval = 0.5\n")
    (tmp_path / "agent.toml").chmod(0o644)
    monkeypatch.chdir(tmp_path)
    assert load("agent.toml", strict_permissions=True).imds.poll_interval == 0.5
