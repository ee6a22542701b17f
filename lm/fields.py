"""Typed dataclasses from mappings (parsed YAML/JSON, command-line strings) and back: the one mechanism that
reads the training config (lm/config.py) and the sweep spaces (sweeps/space.py).

`build` makes a (nested) dataclass from a mapping, converting each value to its field's annotated type with
`coerce` (Literal types are choices); `dump` turns one back into plain YAML data; `field_docs` reads the
attribute docstrings (the string literal right below a field) that `--help` prints. Every error is a
`ConfigError` with a one-line message naming the source (file) and the dotted field.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from lm.cli import InputError


class ConfigError(InputError):
    """A configuration value is missing, unknown, of the wrong type or out of range (one-line message)."""


T = TypeVar("T")


class _Unset(enum.Enum):
    UNSET = "unset"  # an enum member: still `is UNSET` after pickling (Ray sends specs to its workers)


UNSET: Any = _Unset.UNSET
"""Default of a field that must tell "not given" from null; `dump` leaves such a field out."""


def build(cls: type[T], data: Any, source: str, path: str = "", noun: str = "field") -> T:
    """An instance of dataclass `cls` from a mapping (parsed YAML/JSON), each value converted by `coerce` to its
    field's annotated type; missing keys take the field defaults.

    A field whose type is a dataclass is a section, built from a nested mapping (null: all defaults); a
    `dict[str, X]` field maps names to X. Only `init` fields are keys. `source` (the file) and `path` (the
    dotted position of `data` in it) start every message; `noun` is what the keys are called ("field", "key").
    Raises ConfigError for a value that is not a mapping, an unknown key or a value that does not convert.
    """
    where = f"{source}: {path}" if path else source
    if not isinstance(data, dict):
        example = getattr(cls, "EXAMPLE", None)
        raise ConfigError(f"{where}: expected a mapping{f' like {example}' if example else ''}, got {_show(data)}")
    hints = type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            if path:
                raise ConfigError(f"{where}.{key}: unknown {noun} (expected one of {known})")
            # The top of a Config holds only sections; the top of a sweep space also plain keys.
            sections = all(dataclasses.is_dataclass(hints[k]) for k in known)
            what = "section" if sections else f"top-level {noun}"
            raise ConfigError(f"{source}: unknown {what} '{key}' (expected one of {known})")
        kwargs[key] = _convert(value, hints[key], source, f"{path}.{key}" if path else key, noun)
    return cls(**kwargs)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert `value` (from YAML, JSON or a command line string) to the annotated field type.

    Accepts "3e-4" for floats (YAML reads exponents without a dot as strings), "2_000_000" and integral
    floats like 2e6 for ints, true/false/1/0 for bools, null/none for optional fields, and for a Literal (a
    choice of strings) one of its strings, or a YAML boolean (off, yes) that spells exactly one of them.
    """
    return _convert(value, annotation, where, "", "field")


def _convert(value: Any, annotation: Any, source: str, path: str, noun: str) -> Any:
    where = f"{source}: {path}" if path else source
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{path}' must be a mapping, got {type(value).__name__}")
        return build(annotation, value or {}, source, path, noun)  # type: ignore[arg-type]
    if typing.get_origin(annotation) is dict:
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        item = typing.get_args(annotation)[1]
        return {k: _convert_item(v, item, source, f"{path}.{k}", noun) for k, v in (value or {}).items()}
    choices = _union_args(annotation)
    optional = type(None) in choices
    choices = [c for c in choices if c is not type(None)]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{where}: expected {' or '.join(map(_kind, choices))}, got null")
    for choice in choices:
        try:
            return _scalar(value, choice)
        except (ValueError, TypeError):
            pass
    expected = " or ".join(map(_kind, choices)) + (" or null" if optional else "")
    hint = ""
    if isinstance(value, bool) and any(typing.get_origin(c) is Literal for c in choices):
        hint = " (YAML reads unquoted yes/no/on/off as true/false: quote the word)"
    raise ConfigError(f"{where}: expected {expected}, got {value!r}{hint}")


def _convert_item(value: Any, annotation: Any, source: str, path: str, noun: str) -> Any:
    """One value of a `dict[str, X]` field: a dataclass X is built from its own mapping (not a section)."""
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, source, path, noun)  # type: ignore[arg-type]
    return _convert(value, annotation, source, path, noun)


def dump(obj: Any) -> Any:
    """Plain YAML data from a dataclass built by `build` (its `init` fields; UNSET ones left out), recursively."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: dump(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init and getattr(obj, f.name) is not UNSET
        }
    if isinstance(obj, dict):
        return {str(k): dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    if isinstance(obj, (str, Path)):
        return str(obj)  # a plain str also for str enums (lm.record.Key): yaml.safe_dump knows only plain types
    return obj


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _scalar(value: Any, annotation: Any) -> Any:
    if typing.get_origin(annotation) is Literal:
        return _to_choice(value, typing.get_args(annotation))
    convert = _CONVERTERS.get(annotation)
    if convert is None:
        raise ConfigError(f"unsupported field type {annotation}")
    return convert(value)


def _kind(annotation: Any) -> str:
    """How a message names what a type accepts: "an integer", "one of ['pre', 'post']", '"auto"'."""
    if typing.get_origin(annotation) is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        return json.dumps(choices[0]) if len(choices) == 1 else f"one of {choices}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def _to_choice(value: Any, choices: tuple[Any, ...]) -> str:
    if isinstance(value, bool):  # YAML 1.1 reads unquoted off/on/yes/no as booleans
        spellings = ("true", "yes", "on") if value else ("false", "no", "off")
        matches = [c for c in choices if c in spellings]
        if len(matches) == 1:
            return str(matches[0])
        raise ValueError
    if isinstance(value, str) and value in choices:
        return str(value)
    raise ValueError


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        text = value.replace("_", "")
        value = int(text) if text.lstrip("-").isdigit() else float(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        value = int(value)
    if not isinstance(value, int):
        raise ValueError
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value.replace("_", "") if isinstance(value, str) else value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError
    return str(value)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _show(value: Any) -> str:
    """A value in a message: scalars as written, containers by their type (they can be long)."""
    return repr(value) if value is None or isinstance(value, (str, int, float, bool)) else type(value).__name__


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field: the string literal right below its annotation}."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_name(annotation: Any) -> str:
    """A field type as help text shows it: int, float | null, {pre, post, none}."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        return "{" + ", ".join(str(c) for c in typing.get_args(annotation)) + "}"
    return getattr(annotation, "__name__", str(annotation))


def value_text(value: Any) -> str:
    """A default as help text shows it: null, true, 0.003."""
    """A default as help text shows it: null, true, 3e-3."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)
