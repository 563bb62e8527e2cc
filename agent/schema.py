"""Turn parsed TOML into typed dataclasses, collecting every problem with its key path.

Why our own: the agent runs hooks as root from this file, so every unknown key, wrong type and bad value
must be reported, all at once, with a path a user can find (``hooks[1].timeout``). A library that stops at
the first error, or silently ignores unknown keys, would let a typo disable a drain step.

A dataclass field may carry ``metadata``:
  - ``choices``: allowed values;
  - ``check``: ``callable(value) -> str | None`` returning an error message;
  - ``min`` / ``max``: numeric bounds;
  - ``doc``: one line for the README.
A dataclass may define ``validate(self) -> list[tuple[str, str]]`` for cross-field rules; it returns
(relative key, message) pairs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

T = TypeVar("T")

MAX_INT = 2 ** 63 - 1  # TOML integers are 64-bit; a bigger one is a typo, not a setting
MAX_FLOAT = 1e9  # a number key without its own max: seconds, and 1e9 is 31 years
NUL_MESSAGE = "must not contain a NUL character"


@dataclasses.dataclass(frozen=True)
class ConfigProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Raised with every problem found; ``str()`` is one line per problem."""

    def __init__(self, problems: List[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + str(p) for p in self.problems)

    def one_line(self) -> str:
        first = self.problems[0] if self.problems else ConfigProblem("", "invalid")
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        prefix = f"{self.source}: " if self.source else ""
        return f"{prefix}{first}{more}"


def join(path: str, key: str) -> str:
    if key.startswith("["):
        return f"{path}{key}"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return "array"
    if origin in (dict, Dict):
        return "inline table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _hints(cls: type) -> Dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def _convert(tp: Any, value: Any, path: str, problems: List[ConfigProblem]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(inner[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(ConfigProblem(path, f"expected a table, got {_describe(value)}"))
            return None
        return _build(tp, value, path, problems)
    if origin in (list, List):
        if not isinstance(value, list):
            problems.append(ConfigProblem(path, f"expected an array, got {_describe(value)}"))
            return None
        out = []
        for i, item in enumerate(value):
            converted = _convert(args[0], item, f"{path}[{i}]", problems)
            if converted is not None:
                out.append(converted)
        return out
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(ConfigProblem(path, f"expected a table, got {_describe(value)}"))
            return None
        out_d = {}
        for k, v in value.items():
            if "\x00" in str(k):
                problems.append(ConfigProblem(join(path, repr(str(k))), NUL_MESSAGE))
                continue
            converted = _convert(args[1], v, join(path, str(k)), problems)
            if converted is not None:
                out_d[str(k)] = converted
        return out_d
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(ConfigProblem(path, f"expected a number, got {_describe(value)}"))
            return None
        # nan passes every comparison (so every min/max check) and inf breaks every deadline sum.
        number = float(value) if isinstance(value, float) or abs(value) <= MAX_INT else math.inf
        if not math.isfinite(number):
            problems.append(ConfigProblem(path, f"must be a finite number, got {value}"))
            return None
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(ConfigProblem(path, f"expected an integer, got {_describe(value)}"))
            return None
        if abs(value) > MAX_INT:
            problems.append(ConfigProblem(path, f"must fit in 64 bits, got {value}"))
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(ConfigProblem(path, f"expected true or false, got {_describe(value)}"))
            return None
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(ConfigProblem(path, f"expected a string, got {_describe(value)}"))
            return None
        if "\x00" in value:
            # A NUL cannot go into argv, the environment or a path: the hook would silently not run.
            problems.append(ConfigProblem(path, NUL_MESSAGE))
            return None
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema: unsupported type {tp!r} at {path}")


def _check_field(field: dataclasses.Field, value: Any, path: str, problems: List[ConfigProblem]) -> bool:
    meta = field.metadata
    choices = meta.get("choices")
    values = value if isinstance(value, list) else [value]
    ok = True
    if choices is not None:
        for i, v in enumerate(values):
            if v not in choices:
                where = f"{path}[{i}]" if isinstance(value, list) else path
                problems.append(ConfigProblem(where, f"{v!r} is not one of {', '.join(map(str, choices))}"))
                ok = False
    if isinstance(value, float) and "max" not in meta and abs(value) > MAX_FLOAT:
        # Every number key is seconds: 1e300 is finite, and overflows the first wait or datetime.
        problems.append(ConfigProblem(path, f"must be at most {MAX_FLOAT:g}, got {value}"))
        ok = False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            problems.append(ConfigProblem(path, f"must be >= {meta['min']}, got {value}"))
            ok = False
        if "max" in meta and value > meta["max"]:
            problems.append(ConfigProblem(path, f"must be <= {meta['max']}, got {value}"))
            ok = False
    check = meta.get("check")
    if check is not None and ok:
        message = check(value)
        if message:
            problems.append(ConfigProblem(path, message))
            ok = False
    return ok


def _build(cls: Type[T], data: Dict[str, Any], path: str, problems: List[ConfigProblem]) -> Optional[T]:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: Dict[str, Any] = {}
    before = len(problems)
    for key, value in data.items():
        if key not in fields:
            near = _nearest(key, list(fields))
            hint = f" (did you mean {near!r}?)" if near else ""
            problems.append(ConfigProblem(join(path, key), f"unknown key{hint}"))
            continue
        field = fields[key]
        fpath = join(path, key)
        converted = _convert(hints[key], value, fpath, problems)
        if converted is None and value is not None:
            continue
        if _check_field(field, converted, fpath, problems):
            kwargs[key] = converted
    for name, field in fields.items():
        if name not in data and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            problems.append(ConfigProblem(join(path, name), "required key is missing"))
    if len(problems) != before:
        return None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        for rel, message in validate():
            problems.append(ConfigProblem(join(path, rel) if rel else path, message))
    return obj


def _nearest(key: str, candidates: List[str]) -> Optional[str]:
    import difflib

    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return match[0] if match else None


def build(cls: Type[T], data: Dict[str, Any], source: str = "") -> T:
    """Build ``cls`` from ``data`` or raise :class:`ConfigError` listing every problem."""
    problems: List[ConfigProblem] = []
    obj = _build(cls, data, "", problems)
    if problems or obj is None:
        raise ConfigError(problems or [ConfigProblem("", "invalid configuration")], source)
    return obj


def documented_keys(cls: type, prefix: str = "") -> List[Tuple[str, str, Any, str]]:
    """(key path, type, default, doc) for every key: the README's reference table is checked against it."""
    rows: List[Tuple[str, str, Any, str]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Union:
            tp = [a for a in args if a is not type(None)][0]
            origin = typing.get_origin(tp)
            args = typing.get_args(tp)
        key = join(prefix, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            rows.append((key, "table", None, f.metadata.get("doc", "")))
            rows.extend(documented_keys(tp, key))
        elif origin in (list, List) and args and dataclasses.is_dataclass(args[0]):
            rows.append((key, "array of tables", None, f.metadata.get("doc", "")))
            rows.extend(documented_keys(args[0], f"{key}[]"))
        else:
            rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
