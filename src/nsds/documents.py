"""Typed, versioned JSON documents: dataclasses built from JSON with every field's type checked.

Every result nsds writes (plan, scores, run and compare results, caches) is a dataclass whose JSON is
`{"schema": "nsds.<kind>/<version>", ...fields}`. `build` turns parsed JSON back into the dataclass and
refuses anything whose shape or types differ from the annotations (a hand-edited "bits": "four" fails
on load with the field's path, not later deep inside a run); files.read_document adds the schema check
and turns every failure into one NsdsError line.
"""

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


class DocumentError(ValueError):
    """A document's content does not match its type; the message names the field's path."""


def build(cls: type[T], data: Any, path: str = "") -> T:
    """`data` (parsed JSON) as an instance of the annotated type `cls`, checked field by field."""
    return _convert(cls, data, path or cls.__name__)


def _convert(kind: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if set(args) - {type(None)} == {int, float}:  # a number that stays an integer when it is one
            number = _convert(float, value, path)
            return value if isinstance(value, int) else number
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except DocumentError as err:
                errors.append(str(err))
        raise DocumentError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if origin is typing.Literal:
        if value not in args:
            raise DocumentError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise DocumentError(f"{path}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind) if f.init}
        unknown = set(value) - set(fields)
        if unknown:
            raise DocumentError(f"{path}: unexpected field(s) {sorted(unknown)}")
        missing = [
            name
            for name, f in fields.items()
            if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise DocumentError(f"{path}: missing field(s) {missing}")
        return kind(**{name: _convert(hints[name], v, f"{path}.{name}") for name, v in value.items()})
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, list):
            raise DocumentError(f"{path}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or kind) is tuple else items
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise DocumentError(f"{path}: expected an object, got {type(value).__name__}")
        item = args[1] if args else Any
        return {k: _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DocumentError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DocumentError(f"{path}: expected an integer, got {value!r}")
        return value
    if kind in (str, bool):
        if not isinstance(value, kind):
            raise DocumentError(f"{path}: expected {kind.__name__}, got {value!r}")
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise DocumentError(f"{path}: expected a path string, got {value!r}")
        return Path(value)
    raise TypeError(f"documents cannot hold {kind!r} ({path})")


def plain(value: Any) -> Any:
    """A dataclass (or nested containers of them) as JSON-ready values: Paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
