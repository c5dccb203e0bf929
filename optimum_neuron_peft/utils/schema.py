"""Reading JSON files from inputs strictly: bounded size and nesting, then a typed schema, one error naming the file,
the field, what was expected and what was found.

Written here rather than taken from a library: `jsonschema` is not one of the project's dependencies, and the rules
needed (bool is not an int, no NaN, no duplicate keys, bounded depth) are a few dozen lines. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import OptimumNeuronPeftError

MAX_JSON_BYTES = 256 << 20  # metadata of the largest models is a few MB
MAX_DEPTH = 32  # our files nest 6 deep at most

ErrorType = Callable[[str], Exception]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


class Schema:
    expected = "a value"

    def check(self, value: Any, field: str, fail: Callable[[str, str, Any], None]) -> None:
        raise NotImplementedError


class AnyValue(Schema):
    def check(self, value, field, fail):
        pass


class Bool(Schema):
    expected = "a boolean (true/false)"

    def check(self, value, field, fail):
        if type(value) is not bool:
            fail(field, self.expected, value)


class Null(Schema):
    expected = "null"

    def check(self, value, field, fail):
        if value is not None:
            fail(field, self.expected, value)


class Int(Schema):
    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        bounds = [f">= {min}"] * (min is not None) + [f"<= {max}"] * (max is not None)
        self.expected = "an integer" + (f" {' and '.join(bounds)}" if bounds else "")

    def check(self, value, field, fail):
        if type(value) is not int or (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            fail(field, self.expected, value)


class Num(Schema):
    def __init__(self, min: float | None = None, max: float | None = None):
        self.min, self.max = min, max
        bounds = [f">= {min}"] * (min is not None) + [f"<= {max}"] * (max is not None)
        self.expected = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")

    def check(self, value, field, fail):
        if type(value) not in (int, float) or not math.isfinite(value) or (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            fail(field, self.expected, value)


class Str(Schema):
    def __init__(self, pattern: str | None = None, choices: tuple[str, ...] | None = None, expected: str | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.choices = choices
        self.expected = expected or (f"one of {list(choices)}" if choices else "a string")

    def check(self, value, field, fail):
        if type(value) is not str or (self.pattern and not self.pattern.fullmatch(value)) or (
            self.choices is not None and value not in self.choices
        ):
            fail(field, self.expected, value)


class OneOf(Schema):
    def __init__(self, *options: Schema):
        self.options = options
        self.expected = " or ".join(o.expected for o in options)

    def check(self, value, field, fail):
        for option in self.options:
            try:
                option.check(value, field, _raise_mismatch)
                return
            except _Mismatch:
                continue
        fail(field, self.expected, value)


def Optional(schema: Schema) -> Schema:  # noqa: N802 - reads like a type
    return OneOf(schema, Null())


class List(Schema):
    def __init__(self, item: Schema, max_len: int | None = None, min_len: int = 0):
        self.item, self.max_len, self.min_len = item, max_len, min_len
        self.expected = f"a list of {item.expected}"

    def check(self, value, field, fail):
        if type(value) is not list or len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            fail(field, self.expected, value)
            return
        for i, item in enumerate(value):
            self.item.check(item, f"{field}[{i}]", fail)


class Map(Schema):
    """An object with arbitrary (string) keys, every value of one schema."""

    def __init__(self, value: Schema, key: Schema | None = None):
        self.value, self.key = value, key
        self.expected = f"an object mapping names to {value.expected}"

    def check(self, value, field, fail):
        if type(value) is not dict:
            fail(field, self.expected, value)
            return
        for k, v in value.items():
            if self.key is not None:
                self.key.check(k, f"{field} key", fail)
            self.value.check(v, _join(field, k), fail)


class Obj(Schema):
    """An object with known fields; unknown fields are allowed (files written by newer versions) unless closed."""

    def __init__(self, required: Mapping[str, Schema] | None = None, optional: Mapping[str, Schema] | None = None, closed: bool = False):
        self.required, self.optional, self.closed = dict(required or {}), dict(optional or {}), closed
        self.expected = "an object" + (f" with {sorted(self.required)}" if self.required else "")

    def check(self, value, field, fail):
        if type(value) is not dict:
            fail(field, self.expected, value)
            return
        for name, schema in self.required.items():
            if name not in value:
                fail(_join(field, name), f"{schema.expected} (required)", _Missing())
            schema.check(value[name], _join(field, name), fail)
        for name, schema in self.optional.items():
            if name in value:
                schema.check(value[name], _join(field, name), fail)
        if self.closed:
            for name in value:
                if name not in self.required and name not in self.optional:
                    fail(_join(field, name), "no such field", value[name])


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


class _Mismatch(Exception):
    pass


def _raise_mismatch(field: str, expected: str, found: Any) -> None:
    raise _Mismatch


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else str(name)


def validate(value: Any, schema: Schema, *, file: str | os.PathLike, error: ErrorType = OptimumNeuronPeftError) -> Any:
    """``value`` if it matches ``schema``, else ``error`` with one line: file, field, expected, found."""

    def fail(field: str, expected: str, found: Any) -> None:
        shown = "nothing" if isinstance(found, _Missing) else f"{_type_name(found)} {_shown(found)}"
        raise error(f"{file}: field '{field or '(top level)'}': expected {expected}, found {shown}")

    schema.check(value, "", fail)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(data: bytes | str, *, file: str | os.PathLike, error: ErrorType = OptimumNeuronPeftError) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, nesting at most `MAX_DEPTH`."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise error(f"{file}: expected JSON nested at most {MAX_DEPTH} deep, found deeper nesting") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{file}: not valid JSON ({err})") from None
    if _depth(value) > MAX_DEPTH:
        raise error(f"{file}: expected JSON nested at most {MAX_DEPTH} deep, found deeper nesting")
    return value


def read_json(path: str | os.PathLike, schema: Schema | None = None, *, error: ErrorType = OptimumNeuronPeftError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:  # fmt: skip
    """Read, parse (`parse_json`) and validate (`validate`) a JSON file of at most ``max_bytes``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path}: expected a JSON file of at most {max_bytes} bytes, found {size}")
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{path}: could not read it ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: expected a JSON file of at most {max_bytes} bytes, found more")
    value = parse_json(data, file=path, error=error)
    return value if schema is None else validate(value, schema, file=path, error=error)
