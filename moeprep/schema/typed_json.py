"""Dataclasses from JSON, every field checked against its type hint (the type itself, not its annotation's text):
a value of the wrong type is refused naming its field, and a type this module does not know is a programming
error, not a "malformed manifest"."""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


class FieldTypeError(TypeError):
    """A JSON value that does not have its field's type; the message names the field."""


@cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def from_json(kind: type[T], data: Any, where: str) -> T:
    """``kind`` (a dataclass of JSON types, nested dataclasses, lists, tuples, ``dict[str, X]``, unions) built
    from ``data``; an unknown or missing key or a value of the wrong type raises FieldTypeError naming it."""
    return build(data, kind, where)


def build(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint``, checked all the way down."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return build(value, arg, where)
            except FieldTypeError:
                continue
        raise FieldTypeError(f"{where} has the wrong type ({type(value).__name__})")
    if origin in (list, tuple):
        if not isinstance(value, list) or (origin is tuple and args[1:] != (Ellipsis,)):
            raise FieldTypeError(f"{where} is not a list")
        items = [build(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldTypeError(f"{where} is not a JSON object")
        return {key: build(item, args[1], f"{where}.{key}") for key, item in value.items()}
    if not _is_scalar(value, hint):
        raise FieldTypeError(f"{where} has the wrong type ({type(value).__name__})")
    return value


def _is_scalar(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, str, bool):
        return type(value) is hint
    if hint is float:
        return type(value) in (int, float)
    raise NotImplementedError(f"typed_json cannot check values of type {hint!r}")


def _dataclass(kind: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise FieldTypeError(f"{where} is not a JSON object")
    fields = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    if unknown := sorted(set(data) - set(fields)):
        raise FieldTypeError(f"{where} has unknown field {unknown[0]!r}")
    required = (
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init
    )
    if missing := next((name for name in required if name not in data), None):
        raise FieldTypeError(f"{where} has no field {missing!r}")
    hints = _hints(kind)
    return kind(**{name: build(value, hints[name], f"{where}.{name}") for name, value in data.items()})
