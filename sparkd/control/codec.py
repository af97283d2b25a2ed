"""PURE: typed JSON. Frozen dataclasses to JSON objects and back, checked field by field.

The control socket's documents (`sparkd.control.status`) are frozen dataclasses; the daemon
writes them with `to_json`, and every reader turns what arrives into the same classes with
`from_json`, which checks each value against the field's annotation and names the path of the
first one that does not fit (`status.engines[0].port: expected an integer, got "80a"`).

Supported annotations: str, int, float, bool, None, `X | None`, `Literal[...]`, `tuple[X, ...]`,
`Mapping[str, X]`, and nested dataclasses. A field's JSON key is its name unless its metadata
says otherwise (`field(metadata={"json": "from"})`: `from` is a Python keyword). Keys a reader
does not know are ignored (a newer daemon may add fields: docs/status.md); a missing key takes
the field's default, and is an error when the field has none.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from sparkd.errors import SchemaError

T = TypeVar("T")


def json_key(f: dataclasses.Field[Any]) -> str:
    key = f.metadata.get("json", f.name)
    assert isinstance(key, str)
    return key


@functools.cache
def _fields(cls: type[Any]) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def to_json(value: Any) -> Any:
    """A dataclass (or a tuple, mapping or scalar holding them) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {json_key(f): to_json(getattr(value, f.name)) for f, _ in _fields(type(value))}
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type[T], data: object, path: str = "$") -> T:
    """`data` (parsed JSON) as an instance of the dataclass `cls`; SchemaError otherwise."""
    value = _decode(cls, data, path)
    assert isinstance(value, cls)
    return value


def _describe(data: object) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "true" if data else "false"
    if isinstance(data, str):
        return repr(data[:40])
    if isinstance(data, int | float):
        return repr(data)
    if isinstance(data, Mapping):
        return "an object"
    return "a list" if isinstance(data, list) else type(data).__name__


def _fail(path: str, expected: str, data: object) -> SchemaError:
    return SchemaError(f"{path}: expected {expected}, got {_describe(data)}")


def _decode(tp: Any, data: object, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, Mapping):
            raise _fail(path, f"an object ({tp.__name__})", data)
        kwargs: dict[str, Any] = {}
        for f, hint in _fields(tp):
            key = json_key(f)
            if key in data:
                kwargs[f.name] = _decode(hint, data[key], f"{path}.{key}")
            elif (f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING):
                raise SchemaError(f"{path}: missing {key!r}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:  # __post_init__ checks
            raise SchemaError(f"{path}: {exc}") from None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, data, path)
            except SchemaError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, " or ".join(_name(o) for o in options), data)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if data not in allowed or isinstance(data, bool) != isinstance(allowed[0], bool):
            raise _fail(path, "one of " + ", ".join(repr(a) for a in allowed), data)
        return data
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(data, list):
            raise _fail(path, "a list", data)
        return tuple(_decode(item, v, f"{path}[{i}]") for i, v in enumerate(data))
    if origin in (Mapping, dict):
        item = typing.get_args(tp)[1]
        if not isinstance(data, Mapping):
            raise _fail(path, "an object", data)
        return {str(k): _decode(item, v, f"{path}.{k}") for k, v in data.items()}
    if tp is type(None):
        if data is not None:
            raise _fail(path, "null", data)
        return None
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail(path, "true or false", data)
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise _fail(path, "an integer", data)
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise _fail(path, "a number", data)
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise _fail(path, "a string", data)
        return data
    raise TypeError(f"{path}: the codec has no rule for {tp!r}")


def _name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"an object ({tp.__name__})"
    names: dict[Any, str] = {str: "a string", int: "an integer", float: "a number",
                             bool: "true or false", type(None): "null"}
    return names.get(tp, "a list" if typing.get_origin(tp) is tuple else "an object")
