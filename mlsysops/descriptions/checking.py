"""Check plain data against a description schema, collecting every problem with its path.

This walks the schema of :mod:`mlsysops.descriptions.schema` the way the Kubernetes API
server applies a CRD's structural schema:

- an unknown field is not an error: it is dropped, with a warning naming its path;
- a ``null`` field is dropped like an absent one (Kubernetes prunes nulls of fields that
  are not ``nullable``); a required field that is null is therefore an error;
- ``integer`` takes integers only (not ``2.5``, not ``"2"``, not ``true``), ``number``
  takes integers and finite floats, ``string`` takes strings only, ``boolean`` takes
  ``true``/``false`` only (not ``"True"``); integers must fit in 64 bits (numbers need
  only be finite);
- enums are compared exactly (``OnFailure``, not ``on_failure``).

YAML 1.1 boolean words (:class:`~mlsysops.descriptions.loading.YamlBoolWord`) are read as
the string written where a string is expected and as a boolean elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from mlsysops.descriptions.loading import YamlBoolWord
from mlsysops.wire import FieldError

_INT64 = 2**63
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Findings:
    """Errors and warnings gathered while checking one document."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.warnings: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path=path, message=message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(FieldError(path=path, message=message))

    def wrong(self, path: str, expected: str, value: object) -> Any:
        """Report that ``value`` is not ``expected``; returns None for ``return`` chaining."""
        self.error(path, f"must be {expected}; got {show(value)}")
        return None


def show(value: object) -> str:
    """``value`` as a user would describe it, for messages."""
    if isinstance(value, YamlBoolWord):
        return f"the boolean {str(value.truth).lower()} (written {value!s})"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {_short(value)!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a value of YAML type {type(value).__name__}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def child(path: str, key: object) -> str:
    """The path of field ``key`` under ``path``: ``$.a.b``, or ``$["odd key"]``."""
    if isinstance(key, str) and _NAME.match(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key if isinstance(key, str) else str(key))}]"


def check(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    """``value`` normalised to plain JSON data, reporting every problem to ``found``.

    The result is meaningful only when ``found`` has no errors.
    """
    return _CHECKS[schema["type"]](value, schema, path, found)


def _check_object(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if not isinstance(value, dict):
        return found.wrong(path, "a mapping of fields", value)
    properties = schema.get("properties", {})
    required = schema.get("required", ())
    out: dict[str, Any] = {}
    for key, item in value.items():
        where = child(path, key)
        if not isinstance(key, str) or key not in properties:
            found.warn(where, f"unknown field {str(key)!r} ignored (not in the schema)")
        elif item is None and key in required:
            found.error(where, "is required; got null")
        elif item is None:
            found.warn(where, "null value ignored: the field is treated as absent")
        else:
            out[key] = check(item, properties[key], where, found)
    for name in required:
        if name not in value:
            found.error(child(path, name), "is required but missing")
    return out


def _check_array(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if not isinstance(value, list):
        return found.wrong(path, "a list", value)
    return [check(v, schema["items"], f"{path}[{i}]", found) for i, v in enumerate(value)]


def _check_string(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if not isinstance(value, str):
        return found.wrong(path, "a string", value)
    value = str(value)  # a YamlBoolWord becomes the plain string the user wrote
    enum = schema.get("enum")
    if enum is not None and value not in enum:
        found.error(path, f"must be one of {', '.join(enum)}; got {_short(value)!r}")
    return value


def _check_boolean(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if isinstance(value, YamlBoolWord):
        return value.truth
    if not isinstance(value, bool):
        return found.wrong(path, "a boolean (true or false)", value)
    return value


def _check_integer(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return found.wrong(path, "an integer", value)
    if not -_INT64 <= value < _INT64:
        return found.wrong(path, "an integer that fits in 64 bits", value)
    return value


def _check_number(value: Any, schema: dict[str, Any], path: str, found: Findings) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return found.wrong(path, "a number", value)
    if isinstance(value, int) and abs(value) >= 10**308:  # beyond what a float can hold
        return found.wrong(path, "a finite number", value)
    if isinstance(value, float) and not math.isfinite(value):
        return found.wrong(path, "a finite number", value)
    return value


_Check = Callable[[Any, dict[str, Any], str, Findings], Any]
_CHECKS: dict[str, _Check] = {
    "object": _check_object,
    "array": _check_array,
    "string": _check_string,
    "boolean": _check_boolean,
    "integer": _check_integer,
    "number": _check_number,
}
