"""Policy files written for the upstream MLSysOps framework run here unchanged.

The policies in ``tests/upstream_policies/`` are written the way upstream policies are
(their imports, ``telemetry['query']``, ``context['configuration']['analyze_interval']``,
``logger``, ``evaluate_condition``, their signatures and return shapes); these tests load
them with our loader and run them through the real loop.
"""

from __future__ import annotations

import pytest

from mlsysops.policies import DEFAULT_INTERVAL, interval_of

# -- the interval an upstream policy sets in its live context -----------------------------

@pytest.mark.parametrize(("value", "seconds"), [("5s", 5.0), (2, 2.0), ("500ms", 0.5), (1.5, 1.5)])
def test_a_policy_that_sets_analyze_interval_in_its_context_gets_that_interval(
        value: object, seconds: float) -> None:
    assert interval_of({"configuration": {"analyze_interval": value}}, 7.0) == seconds


@pytest.mark.parametrize("context", [
    {}, {"configuration": {}}, {"configuration": None}, {"configuration": ["x"]},
    {"configuration": {"analyze_interval": "soon"}},
    {"configuration": {"analyze_interval": "0s"}},
    {"configuration": {"analyze_interval": True}},
    {"configuration": {"analyze_interval": float("nan")}},
    [],
])
def test_a_missing_or_invalid_analyze_interval_keeps_the_interval_in_force(
        context: object) -> None:
    assert interval_of(context, 7.0) == 7.0
    assert interval_of(context, DEFAULT_INTERVAL) == DEFAULT_INTERVAL
