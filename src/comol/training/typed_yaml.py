"""Typed dataclass configs from YAML files and ``key=value`` overrides; generic, it knows no section.

- :func:`read_yaml`: a mapping from a file, merged over the file its top-level ``base:`` key names;
- :func:`parse_override` / :func:`set_dotted`: ``section.key=value`` with a YAML value, set into a mapping;
- :func:`from_dict`: a (nested) dataclass from a mapping, unknown keys refused with a close match, values
  checked against the field annotations and coerced where the intent is unambiguous;
- :func:`describe_fields`: every field's key, type, default and help, for ``--help``.

Every problem is a :class:`comol.errors.UserError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from comol.errors import UserError
from comol.files import read_utf8

BASE_KEY = "base"


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, merging it over its ``base`` file if it names one."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"Config files include each other in a cycle: {[str(p) for p in (*_seen, path)]}")
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.")
    text = read_utf8(path)  # a UserError naming the byte and line where it is not UTF-8
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"Config file {path}: {_yaml_problem(err)}; fix the YAML syntax there.") from err
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must contain a mapping at the top level.")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    return deep_merge(read_yaml(path.parent / str(base), (*_seen, path)), data)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error, on one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (``1e-4`` becomes a float, ``[a,b]`` a list)."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise UserError(f"Override {item!r} is not of the form section.key=value.")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"Cannot parse the value of override {item!r}: {_yaml_problem(err)}.") from err
    return key, value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and coercing values."""
    if not isinstance(data, Mapping):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        known = ", ".join(prefix + f for f in fields)
        raise UserError(f"Unknown config key '{prefix}{key}'.{hint} Known keys: {known}.")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every field, nested sections flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows.extend(describe_fields(kind, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((prefix + f.name, _type_name(kind), repr(default), f.metadata.get("help", "")))
    return rows


def _type_name(kind: Any) -> str:
    return str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against annotation ``kind``; convert where the intent is unambiguous."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{key} must not be null.")
    if kind is Any:
        return value
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise UserError(f"{key} must be a list, got {value!r}.")
        return [_coerce(item, item_kind, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key} must be a mapping, got {value!r}.")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}.")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} must be an integer, got {value!r}.")
    if kind is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise UserError(f"{key} must be a number, got {value!r}.")
        if not math.isfinite(number):
            raise UserError(f"{key} must be a finite number, got {value!r}.")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} must be a string, got {value!r}.")
    raise TypeError(f"Unsupported config type {kind!r} for {key}.")  # pragma: no cover - programming error


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections; a UserError if one is a value."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"Cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section.")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged over ``base``, section by section (mappings merge, other values replace)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged
