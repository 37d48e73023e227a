"""Bytes of a published description to plain data, refusing what could hurt the service.

JSON is decoded as JSON (PyYAML reads ``1e5`` as a string); everything else as YAML with
a loader that differs from ``yaml.SafeLoader`` in four ways:

- aliases are refused (no description needs them, and refusing them rules out
  "billion laughs" expansion bombs);
- nesting deeper than ``max_depth`` is refused from the event stream, before any
  (recursive) composition;
- unquoted dates stay strings (as in JSON and in Kubernetes), never ``datetime``;
- the YAML 1.1 boolean words ``yes``/``no``/``on``/``off`` (any case PyYAML accepts) become
  :class:`YamlBoolWord`: a string that remembers its truth value. The validator reads it
  as a boolean where the schema wants a boolean and as the string the user wrote where it
  wants a string, so ``server_side_encryption: on`` and ``mobile: yes`` both mean what the
  user meant. ``true``/``false`` are booleans in every YAML version and stay booleans.

Every failure is a :class:`~mlsysops.errors.BadInput` with a message for the user.
"""

from __future__ import annotations

from typing import Any

import msgspec
import yaml

from mlsysops.errors import BadInput

try:  # libyaml parses about five times faster than the pure-Python parser
    from yaml import CSafeLoader as _FastSafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _FastSafeLoader  # type: ignore[assignment]

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_VALUE = "tag:yaml.org,2002:value"  # the YAML 1.1 "=" scalar, which SafeLoader cannot build


class YamlBoolWord(str):
    """A YAML 1.1 boolean word (``on``, ``No``, ...) kept as written; ``truth`` is its value."""

    __slots__ = ("truth",)
    truth: bool

    def __new__(cls, word: str) -> YamlBoolWord:
        self = super().__new__(cls, word)
        self.truth = word.lower() in ("yes", "on")
        return self


class _Loader(_FastSafeLoader):
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_TIMESTAMP, _VALUE)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _construct_bool(loader: Any, node: yaml.ScalarNode) -> bool | YamlBoolWord:
    word = loader.construct_scalar(node)
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    return YamlBoolWord(word)


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _too_deep(limit: int, where: str = "") -> BadInput:
    return BadInput(f"the document is nested deeper than the limit of {limit} levels{where}")


def load_document(payload: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """The data in ``payload`` (JSON or YAML), or :class:`BadInput` saying why not."""
    if len(payload) > max_bytes:
        raise BadInput(f"the payload is {len(payload)} bytes; the limit is {max_bytes}")
    text = _decode(payload)
    if text.lstrip()[:1] in ("{", "["):
        data = _load_json(text, max_depth)
        if data is not _NOT_JSON:
            return data
    return _load_yaml(text, max_depth)


def _decode(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the payload is not UTF-8 text: bad byte at offset {exc.start}") from None


_NOT_JSON = object()


def _load_json(text: str, max_depth: int) -> Any:
    """JSON data, or ``_NOT_JSON`` when the text is not JSON (it may still be flow YAML)."""
    try:
        data = msgspec.json.decode(text)
    except msgspec.ValidationError as exc:  # a number out of range (a DecodeError subclass)
        raise BadInput(f"the JSON payload is not acceptable: {exc}") from None
    except msgspec.DecodeError:
        return _NOT_JSON
    except RecursionError:
        raise _too_deep(max_depth) from None
    if _depth(data) > max_depth:
        raise _too_deep(max_depth)
    return data


def _depth(data: Any) -> int:
    """How deeply mappings and lists nest in ``data`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, level)
            stack.extend((item, level + 1) for item in value)
    return deepest


def _load_yaml(text: str, max_depth: int) -> Any:
    try:
        _screen(text, max_depth)
        return yaml.load(text, Loader=_Loader)  # a safe loader: see _Loader
    except yaml.reader.ReaderError as exc:  # control characters
        raise BadInput(f"not valid YAML or JSON: {exc.reason} (offset {exc.position})") from None
    except yaml.MarkedYAMLError as exc:
        if "nesting depth" in (exc.problem or ""):  # PyYAML >= 6.0.3 stops deep flow nesting
            raise _too_deep(max_depth, _where(exc)) from None  # itself: say it our way
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise BadInput(f"not valid YAML or JSON: {what}{_where(exc)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise BadInput(f"not valid YAML or JSON: {exc}") from None


def _screen(text: str, max_depth: int) -> None:
    """Refuse aliases and deep nesting from the event stream, before anything is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise BadInput(f"aliases (*name) are not accepted in descriptions{_where(event)}")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise _too_deep(max_depth, _where(event))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _where(event_or_error: Any) -> str:
    """Where a YAML event or error is in the text, as " (line L, column C)"."""
    mark = (
        getattr(event_or_error, "problem_mark", None)
        or getattr(event_or_error, "context_mark", None)
        or getattr(event_or_error, "start_mark", None)
    )
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
