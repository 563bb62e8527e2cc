import glob
import os

import pytest

from agent import config as cfgmod
from agent.config import ConfigError, parse


def problems(text):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    return [str(p) for p in exc.value.problems]


def test_defaults():
    cfg = parse("")
    assert cfg.imds.endpoint == "http://169.254.169.254"
    assert cfg.imds.poll_interval == 1.0
    assert cfg.aws.region == "" and cfg.aws.endpoint_url == ""
    assert cfg.hooks == []


def test_contract_keys_parse():
    cfg = parse('''
[imds]
endpoint = "http://127.0.0.1:1338"
poll_interval = 0.5
[aws]
region = "eu-west-1"
endpoint_url = "http://127.0.0.1:5000"
[[hooks]]
on = ["spot-interruption", "rebalance-recommendation", "scheduled-maintenance", "asg-termination", "shutdown"]
command = ["/usr/local/bin/save-checkpoint", "--fast"]
timeout = 60
''')
    assert cfg.hooks[0].command == ["/usr/local/bin/save-checkpoint", "--fast"]
    assert cfg.hooks[0].timeout == 60.0


def test_hook_timeout_key_path():
    out = problems('''
[[hooks]]
on = ["shutdown"]
command = ["/bin/true"]
[[hooks]]
on = ["shutdown"]
command = ["/bin/true"]
timeout = "soon"
''')
    assert out == ["hooks[1].timeout: expected a number, got a string"]


def test_every_problem_is_reported_at_once():
    out = problems('''
[imds]
poll_intervall = 1
endpoint = "ftp://x"
[[hooks]]
on = ["spot-interuption"]
command = ["/bin/true"]
''')
    assert "imds.poll_intervall: unknown key (did you mean 'poll_interval'?)" in out
    assert any(p.startswith("imds.endpoint: must be an http") for p in out)
    assert any(p.startswith("hooks[0].on[0]: 'spot-interuption' is not one of") for p in out)


def test_shell_string_command_rejected():
    assert problems('[[hooks]]\non = ["shutdown"]\ncommand = "save --fast"\n') == [
        "hooks[0].command: expected an array, got a string"]
    assert problems('[[hooks]]\non = ["shutdown"]\ncommand = ["save"]\n') == [
        "hooks[0].command[0]: must be an absolute path, got 'save'"]


def test_missing_required_and_bool_is_not_int():
    out = problems('[[hooks]]\ncommand = ["/bin/true"]\ntimeout = true\n')
    assert "hooks[0].on: required key is missing" in out
    assert "hooks[0].timeout: expected a number, got a boolean" in out


def test_bad_toml_names_the_line():
    out = problems("[imds\nendpoint=1")
    assert out[0].startswith("not valid TOML")
    assert "line 1" in out[0]


def test_one_line_error_names_source():
    with pytest.raises(ConfigError) as exc:
        parse('[imds]\ntimeout = -1\n[aws]\nbogus = 1\n', "/etc/spot-agent/agent.toml")
    line = exc.value.one_line()
    assert "\n" not in line
    assert line.startswith("/etc/spot-agent/agent.toml: imds.timeout: must be >= 0.05")
    assert "(and 1 more)" in line


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.toml"))))
def test_examples_are_valid(path):
    with open(path) as fh:
        parse(fh.read(), path)


def test_every_key_is_in_the_configuration_reference():
    from agent.schema import documented_keys
    from tests import docs

    readme = docs.configuration()

    missing = []
    for key, type_, _default, _doc in documented_keys(cfgmod.Config):
        if type_ in ("table", "array of tables"):
            bare = key.replace("[]", "")
            if f"[{bare}]" not in readme and f"[[{bare}]]" not in readme and f"`{bare}`" not in readme:
                missing.append(key)
            continue
        leaf = key.split(".")[-1].replace("[]", "")
        if f"`{key}`" not in readme and f"`{key.replace('[]', '')}`" not in readme and f"`{leaf}`" not in readme:
            missing.append(key)
    assert missing == []


def _default_cells(default) -> set:
    """The ways docs/configuration.md may write a default: `true`, `1.0` or `1`, `"gp3"` or `gp3`, `[]`."""
    import dataclasses
    import json

    if default is dataclasses.MISSING:
        return {"required", "(required)"}
    if isinstance(default, bool):
        return {f"`{str(default).lower()}`"}
    if isinstance(default, (int, float)):
        out = {f"`{default}`", f"`{float(default)}`"}
        if float(default).is_integer():
            out.add(f"`{int(default)}`")
        return out
    if isinstance(default, str):
        return {f'`"{default}"`', f"`{default}`"} if default else {'`""`'}
    if isinstance(default, (list, tuple)):
        return {"`" + json.dumps(list(default)) + "`", "`" + json.dumps(list(default)).replace(", ", ",") + "`"}
    if isinstance(default, dict):
        return {"`" + json.dumps(default) + "`"} if default else {"`{}`"}
    return {f"`{default}`"}


def test_every_key_has_its_default_in_the_configuration_reference():
    """A row per key in docs/configuration.md, whose default cell says what the code's default is."""
    from agent.schema import documented_keys
    from tests import docs

    rows = docs.config_defaults()
    wrong = []
    for key, type_, default, _doc in documented_keys(cfgmod.Config):
        if type_ in ("table", "array of tables"):
            continue
        path = key.replace("[]", "")
        cell = rows.get(path)
        if cell is None:
            wrong.append(f"{path}: no table row")
            continue
        # A cell may explain itself after the value: `8388608` (8 MiB), `[]` (everything).
        value = cell if cell.startswith("(") else cell.split(" (", 1)[0].strip()
        if value not in _default_cells(default) and cell not in _default_cells(default):
            wrong.append(f"{path}: docs say {cell!r}, the code's default is {default!r}")
    assert wrong == []
