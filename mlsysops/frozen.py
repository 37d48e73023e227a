"""Read-only plain data, shared by every policy call instead of copied into each.

A policy receives the descriptions, the mechanisms' status and the telemetry. With
thousands of applications a fresh deep copy per call costs more than the call itself, so
the State freezes each value once, when it changes, and every call gets the same frozen
object. :class:`FrozenDict` and :class:`FrozenList` are real ``dict`` and ``list``
subclasses (``isinstance(x, dict)``, ``json.dumps`` and msgspec keep working); anything
that would change them raises :class:`TypeError` saying how to get a copy:
``copy.deepcopy(x)`` (or ``dict(x)``, ``list(x)`` for one level) returns plain, mutable
data.
"""

from __future__ import annotations

import copy
from typing import Any, NoReturn

_HOW = ("policy arguments are read-only (shared by every call); "
        "change a copy: copy.deepcopy(value)")


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError(_HOW)


class FrozenDict(dict[Any, Any]):
    """A dict that refuses changes; ``copy.deepcopy`` gives a plain, mutable one."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def copy(self) -> dict[Any, Any]:
        return dict(self)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class FrozenList(list[Any]):
    """A list that refuses changes; ``copy.deepcopy`` gives a plain, mutable one."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(v, memo) for v in self]

    def copy(self) -> list[Any]:
        return list(self)

    def __reduce__(self) -> Any:
        return (list, (list(self),))


def freeze(value: Any) -> Any:
    """``value`` with every dict and list in it made read-only (frozen parts are reused)."""
    if isinstance(value, FrozenDict | FrozenList):
        return value
    if isinstance(value, dict):
        return FrozenDict((k, freeze(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return FrozenList(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of frozen (or any plain) data."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value
