"""Dataclasses from JSON, every field checked against its type hint (the type itself, not its annotation's text):
a value of the wrong type is refused naming its field, and a type this module does not know is a programming
error, not a "malformed manifest". One converter is built per type and reused, so a manifest of 90k tensor
records is read at the speed of plain dataclass construction."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")
Converter = Callable[[Any], Any]


class FieldTypeError(TypeError):
    """A JSON value that does not have its field's type; the message names the field."""


class _Mismatch(Exception):
    """Raised inside converters: what is wrong, and the path to it (filled in on the way out)."""

    def __init__(self, problem: str) -> None:
        self.problem, self.path = problem, ""

    def at(self, step: str) -> _Mismatch:
        self.path = step + self.path
        return self


def from_json(kind: type[T], data: Any, where: str) -> T:
    """``kind`` (a dataclass of JSON types, nested dataclasses, lists, tuples, ``dict[str, X]``, unions) built
    from ``data``; an unknown or missing key or a value of the wrong type raises FieldTypeError naming it."""
    try:
        return converter(kind)(data)
    except _Mismatch as mismatch:
        raise FieldTypeError(f"{where}{mismatch.path} {mismatch.problem}") from None


@cache
def converter(hint: Any) -> Converter:
    """A function that checks a JSON value against ``hint`` and returns it as that type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass_converter(hint)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        return _union_converter(tuple(converter(arg) for arg in args))
    if origin is list or (origin is tuple and args[1:] == (Ellipsis,)):
        return _sequence_converter(converter(args[0]), list if origin is list else tuple)
    if origin is dict and args[0] is str:
        return _mapping_converter(converter(args[1]))
    if hint is Any:
        return lambda value: value
    if hint is type(None):
        return _scalar_converter(lambda value: value is None)
    if hint in (int, str, bool):
        return _scalar_converter(lambda value: type(value) is hint)
    if hint is float:
        return _scalar_converter(lambda value: type(value) in (int, float))
    raise NotImplementedError(f"typed_json cannot check values of type {hint!r}")


def _scalar_converter(check: Callable[[Any], bool]) -> Converter:
    def convert(value: Any) -> Any:
        if not check(value):
            raise _Mismatch(f"has the wrong type ({type(value).__name__})")
        return value

    return convert


def _union_converter(options: tuple[Converter, ...]) -> Converter:
    def convert(value: Any) -> Any:
        for option in options:
            try:
                return option(value)
            except _Mismatch:
                continue
        raise _Mismatch(f"has the wrong type ({type(value).__name__})")

    return convert


def _sequence_converter(item: Converter, kind: type) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            raise _Mismatch("is not a list")
        out = []
        for i, element in enumerate(value):
            try:
                out.append(item(element))
            except _Mismatch as mismatch:
                raise mismatch.at(f"[{i}]") from None
        return out if kind is list else tuple(out)

    return convert


def _mapping_converter(item: Converter) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Mismatch("is not a JSON object")
        out = {}
        for key, element in value.items():
            try:
                out[key] = item(element)
            except _Mismatch as mismatch:
                raise mismatch.at(f".{key}") from None
        return out

    return convert


def _dataclass_converter(kind: type) -> Converter:
    hints = typing.get_type_hints(kind)
    fields = {f.name: converter(hints[f.name]) for f in dataclasses.fields(kind) if f.init}
    required = [
        f.name
        for f in dataclasses.fields(kind)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]

    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Mismatch("is not a JSON object")
        values = {}
        for key, element in value.items():
            field = fields.get(key)
            if field is None:
                raise _Mismatch(f"has unknown field {key!r}")
            try:
                values[key] = field(element)
            except _Mismatch as mismatch:
                raise mismatch.at(f".{key}") from None
        if missing := next((name for name in required if name not in values), None):
            raise _Mismatch(f"has no field {missing!r}")
        return kind(**values)

    return convert
