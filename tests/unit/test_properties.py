"""Property tests: any TOML value for any config key, any body for any IMDS parser.

The config schema either refuses the value with the key path in the message (exit 2 from the CLI)
or accepts it, and then every number in the result is finite and no string holds a NUL. Each IMDS
parser returns a typed answer or raises BadAnswer, whatever the body: nothing else escapes to the
watcher. Bounded example counts and no deadline, so this stays fast on 2 cores and on Python 3.9.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cli
from agent.config import Config, ConfigError, parse, to_dict
from agent.imds import parse as imds
from agent.schema import documented_keys

# derandomize: the same examples on every run, so CI never fails on a draw it cannot repeat.
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# -- TOML text from Python values ----------------------------------------------------------------


def toml_string(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(data: Dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in data.items())


def test_the_toml_writer_round_trips():
    from agent.config import tomllib

    data = {"a": {"b": [1, 2.5, float("nan"), "x\x00\x7f\n\u00e9\U0001f600"], "c": {"": True}},
            "d": dt.datetime(2020, 1, 2, 3, 4, 5, 6), "e": dt.date(1999, 12, 31), "f": -float("inf")}
    back = tomllib.loads(toml_document(data))
    assert math.isnan(back["a"]["b"][2])
    back["a"]["b"][2] = data["a"]["b"][2] = None
    assert back == data


# -- every key, with a valid document around it --------------------------------------------------

# A minimal valid entry for each table that has required keys, so the value under test is the only
# thing that can be wrong (tags, not volume_id, so that ``create`` is a valid fallback).
BASES: Dict[str, Dict[str, Any]] = {
    "hooks[]": {"on": ["manual"], "command": ["/bin/true"]},
    "volumes[]": {"name": "data", "mount": "/data", "tags": {"Name": "data"}},
    "volumes[].create": {"size_gib": 1},
    "datasets[]": {"source": "s3://bucket-a/x/", "dest": "/data/x"},
    "checkpoints[]": {"dir": "/ckpt", "s3": "s3://bucket-a/ckpt/", "marker": "COMMITTED"},  # gang needs marker
    "checkpoints[].gang": {"size": 2},
    "drain.workload.webhook": {"url": "http://127.0.0.1:1/"},
}

ROWS = documented_keys(Config)
TABLES = {key: kind for key, kind, _, _ in ROWS if kind in ("table", "array of tables")}


def place(key: str, value: Any) -> Tuple[Dict[str, Any], str]:
    """The document holding ``value`` at ``key`` (e.g. ``volumes[].create.size_gib``), inside valid
    base entries, and the concrete path the schema reports (``volumes[0].create.size_gib``)."""
    parts = key.split(".")
    doc: Dict[str, Any] = {}
    node = doc
    concrete: List[str] = []
    for i, part in enumerate(parts[:-1]):
        name = part[:-2] if part.endswith("[]") else part
        prefix = ".".join(parts[: i] + [part])
        base = dict(BASES.get(prefix, {}))
        if part.endswith("[]"):
            node[name] = [base]
            concrete.append(f"{name}[0]")
        else:
            node[name] = base
            concrete.append(name)
        node = base
    leaf = parts[-1]
    if value is not OMIT:
        node[leaf] = value
    return doc, ".".join(concrete + [leaf])


OMIT = object()


def _base_is_valid(key: str) -> bool:
    """The document around ``key``, without the key itself, must parse: then only the value can fail."""
    doc, _ = place(key, OMIT)
    try:
        parse(toml_document(doc))
    except ConfigError:
        return False
    return True


KEYS = [key for key, kind, _, _ in ROWS if _base_is_valid(key)]


def test_every_core_section_is_covered():
    """A new array of tables with required keys needs a BASES entry, or its keys drop out silently."""
    sections = {k.split(".")[0].rstrip("[]") for k in KEYS}
    assert {"agent", "imds", "hooks", "volumes", "datasets", "checkpoints", "transfer", "drain", "metrics"} <= sections
    assert "volumes[].create.size_gib" in KEYS and "drain.workload.webhook.timeout" in KEYS
    missing = sorted({k for k, kind, _, _ in ROWS} - set(KEYS))
    assert missing == [], f"add a BASES entry for the tables of {missing}"


DEFAULTS = {key: default for key, _, default, _ in ROWS if default not in (None, dataclasses.MISSING)}
INTERESTING = ["", "/abs/path", "relative/path", "http://127.0.0.1:1", "s3://bucket-a/p/", "manual",
               "shutdown", "nan", "inf", "\x00", "a\x00b", "0.0.0.0:8947", "SIGTERM", "gp3", "xfs", "auto",
               "/dev/sdf", "vol-0123456789abcdef0", "snap-0123456789abcdef0"]

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.integers(min_value=-5, max_value=70000),
    st.just(10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=4000),
    st.text(max_size=12),
    st.sampled_from(INTERESTING),
    st.datetimes(min_value=dt.datetime(1000, 1, 1)),
    st.dates(min_value=dt.date(1000, 1, 1)),
)
toml_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


KINDS = {key: kind for key, kind, _, _ in ROWS}
SPECIAL_NUMBERS = st.sampled_from([float("nan"), float("inf"), float("-inf"), 10 ** 400, -(10 ** 400), 2 ** 63,
                                   -0.0, 0, 1e308, 5e-324])
TYPED = {
    "number": SPECIAL_NUMBERS | st.floats(allow_nan=True, allow_infinity=True) | st.integers(),
    "integer": SPECIAL_NUMBERS | st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    "string": st.sampled_from(INTERESTING) | st.text(max_size=12),
    "array": st.lists(st.sampled_from(INTERESTING) | st.text(max_size=6) | SPECIAL_NUMBERS, max_size=3),
    "inline table": st.dictionaries(st.sampled_from(["s3", "ec2", "Name", "X", "a\x00"]) | st.text(max_size=4),
                                    st.sampled_from(INTERESTING) | SPECIAL_NUMBERS, max_size=3),
}


@st.composite
def key_and_value(draw):
    """A key, and a value for it: its default, one aimed at its type (nan for a number), or anything."""
    key = draw(st.sampled_from(KEYS))
    choice = draw(st.integers(min_value=0, max_value=3))
    if choice == 0 and key in DEFAULTS:
        return key, DEFAULTS[key]
    if choice <= 2 and KINDS[key] in TYPED:
        return key, draw(TYPED[KINDS[key]])
    return key, draw(toml_values)


def check_accepted(cfg: Config) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, float):
            assert math.isfinite(node) and abs(node) <= 1e9, f"{path} = {node} was accepted"
        elif isinstance(node, str):
            assert "\x00" not in node, f"{path} holds a NUL"
        elif isinstance(node, dict):
            for k, v in node.items():
                assert "\x00" not in str(k), f"{path} has a key with a NUL"
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(to_dict(cfg), "")


def names_the_key(message: str, concrete: str) -> bool:
    """The full key path, or (a cross-field rule) its table's path and the key's own name."""
    if concrete in message:
        return True
    table, _, leaf = concrete.rpartition(".")
    return leaf in message and (not table or table in message)


@settings(max_examples=200, **SETTINGS)
@given(key_and_value())
def test_any_value_for_any_key_is_refused_with_its_path_or_accepted_finite(kv):
    key, value = kv
    doc, concrete = place(key, value)
    try:
        cfg = parse(toml_document(doc))
    except ConfigError as exc:
        assert names_the_key(exc.render(), concrete), (concrete, exc.render())
        return
    check_accepted(cfg)


@pytest.fixture(scope="module")
def config_dir():
    path = tempfile.mkdtemp(prefix="spot-agent-prop-")  # root-owned, 0700: passes the file checks
    yield path
    shutil.rmtree(path)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None, database=None, derandomize=True)
@given(kv=key_and_value())
def test_check_config_exits_2_naming_the_key_or_0(config_dir, kv):
    key, value = kv
    doc, concrete = place(key, value)
    path = os.path.join(config_dir, "agent.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(toml_document(doc))
    os.chmod(path, 0o644)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["check-config", "--config", path])
    if code == 0:
        check_accepted(parse(toml_document(doc)))
    else:
        assert code == cli.EXIT_USAGE, err.getvalue()
        assert names_the_key(err.getvalue(), concrete), (concrete, err.getvalue())
        assert "Traceback" not in err.getvalue()


# -- IMDS parsers --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
TIMES = ["2017-09-18T08:22:00Z", "2017-09-18T08:22:00.5+02:00", "2017-13-45T08:22:00Z", "21 Jan 2019 09:00:43 GMT",
         "0000-00-00T00:00:00Z", "9999-12-31T23:59:59-23:59", "9999-12-31T23:00:00-0060", "31 Dec 9999 23:59:59 GMT",
         "1969-12-31T23:59:59Z", "2017-09-18T08:22:00Z\x00", ""]
time_values = st.sampled_from(TIMES) | json_values
spot_docs = st.fixed_dictionaries({}, optional={
    "action": st.sampled_from(["terminate", "stop", "hibernate", "Stop", "explode", "terminate\x00"]) | json_values,
    "time": time_values})
scheduled_item = st.fixed_dictionaries({}, optional={
    "Code": st.sampled_from(list(imds.SCHEDULED_CODES) + ["x\x00y", ""]) | json_values,
    "EventId": st.text(max_size=12) | json_values, "NotBefore": time_values, "NotAfter": time_values,
    "State": st.sampled_from(["active", "completed", "canceled", "\x00"]) | json_values,
    "Description": json_values})
bodies = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    spot_docs.map(json.dumps),
    st.fixed_dictionaries({}, optional={"noticeTime": time_values}).map(json.dumps),
    st.lists(scheduled_item, max_size=3).map(json.dumps),
    scheduled_item.map(json.dumps),
    st.sampled_from(["{\"a\": " + "9" * 5000 + "}", "NaN", "<html>", "InService", " Terminated \n"]),
)
PARSERS = [imds.parse_instance_action, imds.parse_rebalance, imds.parse_scheduled,
           imds.parse_target_lifecycle_state, imds.parse_identity_document, imds.parse_termination_time]


@settings(max_examples=200, **SETTINGS)
@given(bodies)
def test_every_parser_answers_or_raises_bad_answer(body):
    for parser in PARSERS:
        try:
            result = parser(body)
        except imds.BadAnswer as bad:
            assert bad.reason and " " not in bad.reason  # a short fixed word: a metrics label
            continue
        if parser is imds.parse_instance_action:
            assert result.action in imds.SPOT_ACTIONS
            assert (result.time is None) == bool(result.bad_time)
            # A time an Event can render: deadline_iso (hooks, status) must not overflow.
            assert result.time is None or 0 <= result.time < 253402300800
            if result.time is not None:
                dt.datetime.fromtimestamp(result.time, dt.timezone.utc)
        if parser is imds.parse_scheduled:
            for ev in result:
                for text in (ev.code, ev.event_id, ev.state, ev.description):
                    assert "\x00" not in text
                for when in (ev.not_before, ev.not_after):
                    assert when is None or 0 <= when < 253402300800
