"""``from mlsysops.utilities import evaluate_condition``, for policies written upstream.

The upstream MLSysOps agent ships this helper for policies that compare a QoS target
of an application description with a measurement. This module exists only so that such
policies import unchanged; only ``evaluate_condition`` is provided (no upstream policy
imports anything else from it).
"""

from __future__ import annotations

import operator as _op
from collections.abc import Callable
from typing import Any

__all__ = ["RELATIONS", "evaluate_condition"]

# The ``relation`` values of a QoS metric in an application description.
RELATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "lower_or_equal": _op.le,
    "greater_or_equal": _op.ge,
    "equal": _op.eq,
    "lower_than": _op.lt,
    "greater_than": _op.gt,
}


def evaluate_condition(a: Any, b: Any, operator: str) -> Any:
    """``a <relation> b``: ``evaluate_condition(5, 3, "greater_than")`` is True.

    The comparison's own result is returned, as upstream does (a bool for numbers, an
    element-wise result for pandas or NumPy operands). Raises :class:`ValueError` for a
    relation other than those of :data:`RELATIONS`, as upstream's does.
    """
    compare = RELATIONS.get(operator) if isinstance(operator, str) else None
    if compare is None:
        raise ValueError(f"Invalid operator: {operator!r} (one of: {', '.join(RELATIONS)})")
    return compare(a, b)
