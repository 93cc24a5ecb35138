"""Typed run configs: a YAML file plus command-line values, checked against dataclasses; and the one data root.

A verb that takes a `--config` reads it with `load(path, Run, given)`: every key is checked against the fields of
`Run` (nested dataclasses are checked key by key), so a misspelt or mistyped key is one line naming the file and
the key, e.g. `cfg.yaml: train.max_stepz: unknown key (did you mean max_steps?)`. Command-line values that were
given (not None) override the file's.

Option groups: a dataclass shared by several verbs (the trainer's options, later the sampling options) is declared
once. `option_group(Config)` derives a dataclass with the same fields, each `T | None = None`: the CLI expands it
into one `--option` per field, Python callers pass it as a keyword argument, and `given(options)` lists the fields
that were set, to lay over the YAML's values and the defaults.

This module imports neither torch nor the models, so the CLI and the data helpers can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from lmstack.errors import LmstackError

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ data root


def data_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: `override` (a --data-root option), else $LMSTACK_DATA, else ../shared/data beside
    the repository. Configs' `${data}`, eval's built-in tasks, rag's defaults and the benches all start here."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("LMSTACK_DATA")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def expand_data(value: Any, root: Path) -> Any:
    """`${data}` in every string of a nested YAML value, replaced by `root`."""
    if isinstance(value, dict):
        return {k: expand_data(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_data(v, root) for v in value]
    if isinstance(value, str) and "${data}" in value:
        return value.replace("${data}", str(root))
    return value


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A path as given if it exists (or is absolute), else the same path under the repository root if that one
    exists: configs name `runs/...` and `configs/...` relative to the repository."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


# ------------------------------------------------------------------------------------------ YAML


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file that must hold a mapping; a syntax error is reported as file:line."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise LmstackError(f"config file not found: {path}" if not file.exists() else f"{path}: not a file")
    try:
        value = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise LmstackError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LmstackError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(value, dict):
        raise LmstackError(f"{path}: expected a mapping of keys at the top level, got {_kind(value)}")
    return value


def load(cls: type[T], path: str | os.PathLike[str] | None, given: Mapping[str, Any] | None = None,
         data: str | os.PathLike[str] | None = None) -> T:
    """`cls` from the YAML file at `path` (optional) with `given` laid over it (None values are "not given"),
    `${data}` expanded to the data root, and every key and value type checked. Errors name the file and key."""
    values = read_yaml(path) if path else {}
    where = str(path) if path else "command line"
    values = check(cls, expand_data(values, data_root(data)), where)
    overrides = check(cls, {k: v for k, v in (given or {}).items() if v is not None}, "command line")
    merged = {**values}
    for key, value in overrides.items():  # a nested group given on the command line merges with the file's
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) and _is_group(cls, key) else value
    return build(cls, merged, where)


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """`cls(**values)` with nested dataclass fields built too; a missing required key is named."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LmstackError(f"{where}: missing required key {f.name!r}")
            continue
        value, inner = values[f.name], _dataclass_in(hints[f.name])
        kwargs[f.name] = build(inner, value, f"{where}: {f.name}") if inner and isinstance(value, dict) else value
    return cls(**kwargs)


def check(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """`values` with every key a field of `cls` and every value of the field's type (ints are accepted for
    floats; nested dataclasses are checked key by key). Errors read `WHERE: PREFIX.key: problem`."""
    if not isinstance(values, Mapping):
        raise LmstackError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping of keys, "
                           f"got {_kind(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(sorted(names))}"
            raise LmstackError(f"{where}: {name}: unknown key{hint}")
        out[key] = coerce(hints[key], value, f"{where}: {name}", prefix=f"{name}.")
    return out


def coerce(annotation: Any, value: Any, where: str, prefix: str = "") -> Any:
    """`value` checked against `annotation` (int, float, str, bool, Literal, list[X], dict, X | None, a
    dataclass); the only conversion is int -> float. `where` names the key in the error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where, prefix)
            except LmstackError as e:
                errors.append(e)
        raise errors[0]
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise LmstackError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return check(annotation, value, where.rsplit(": ", 1)[0], prefix)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise LmstackError(f"{where}: expected a list, got {_kind(value)}")
        item = args[0] if args else Any
        return [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise LmstackError(f"{where}: expected a mapping, got {_kind(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise LmstackError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LmstackError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LmstackError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, Path)):
            raise LmstackError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value), repr(value))


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass in `annotation` (`D`, `D | None`), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def _is_group(cls: type, key: str) -> bool:
    return _dataclass_in(typing.get_type_hints(cls)[key]) is not None


# ------------------------------------------------------------------------------------------ option groups


def option_group(cls: type, exclude: set[str] = frozenset(), name: str | None = None) -> type:
    """A dataclass with the fields of `cls` (less `exclude`), each `T | None = None`, and its docstring (the
    `Args:` lines give the CLI help). None means "not given": the YAML's value or `cls`'s default applies."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name] | None, dataclasses.field(default=None, metadata=f.metadata))
              for f in dataclasses.fields(cls) if f.name not in exclude]
    group = dataclasses.make_dataclass(name or f"{cls.__name__}Options", fields, kw_only=True)
    group.__doc__ = inspect.getdoc(cls)
    group.__module__ = cls.__module__
    group.source = cls  # type: ignore[attr-defined]  (the full config the options lay over)
    return group


def given(options: Any) -> dict[str, Any]:
    """The fields of an option group that were given (not None)."""
    if options is None:
        return {}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) is not None}


def field_helps(cls: type) -> dict[str, str]:
    """Help text per field of a dataclass: `metadata["help"]`, else the docstring's `Args:` line."""
    helps = docstring_args(cls.__doc__)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = f.metadata["help"]
    return helps


def docstring_args(doc: str | None) -> dict[str, str]:
    """One help line per `name: text` entry of a Google-style docstring's `Args:` section."""
    return parse_docstring(doc)[1]


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into the text before `Args:` and one help line per argument."""
    import re

    summary, _, args = inspect.cleandoc(doc or "").partition("\nArgs:\n")
    helps: dict[str, str] = {}
    lines = [line for line in args.splitlines() if line.strip()]
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0  # `name: help` lines; deeper = continued
    name = None
    for line in lines:
        match = re.match(r"\s*(\w+):\s*(.*)$", line)
        if match and len(line) - len(line.lstrip()) == indent:
            name, helps[match.group(1)] = match.group(1), match.group(2)
        elif name is not None:
            helps[name] += " " + line.strip()
    return summary.strip(), helps
