"""Durations as policies write them: ``"500ms"``, ``"10s"``, ``"5m"``, ``"2h"``, ``"1d"``."""

from __future__ import annotations

import math
import re

from mlsysops.errors import BadInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(value: object, *, what: str = "duration", minimum: float = 0.0) -> float:
    """Seconds in ``value`` (a string like "10s" or a number of seconds).

    Raises :class:`BadInput` naming ``what`` for anything else, and for values below
    ``minimum`` (so that an interval of "0s" can never become a hot loop).
    """
    if isinstance(value, bool):
        raise BadInput(f"{what}: {value!r} is not a duration like '10s' or '5m'", path=what)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _PATTERN.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise BadInput(
            f"{what}: {value!r} is not a duration like '500ms', '10s', '5m', '2h' or '1d'",
            path=what,
        )
    if not math.isfinite(seconds):  # NaN and infinity (also "1e400"-sized strings)
        raise BadInput(f"{what}: {value!r} is not a finite duration", path=what)
    if seconds < minimum:
        raise BadInput(f"{what}: {value!r} is shorter than the minimum of {minimum}s", path=what)
    return seconds
