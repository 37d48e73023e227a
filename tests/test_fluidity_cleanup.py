"""The cleanup policy's timing: applications whose description is gone go promptly.

Unit tests of ``plugins/policies/policy-appCleanup.py`` on a fake clock: the removal is
planned once the short grace period has passed, several deleted applications go one per
analysis (a second apart), and an application whose removal was planned is not planned
again while Fluidity's report still lists it (that report lags by up to a status
interval), unless it is still listed long after.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlsysops import policies

ROOT = Path(__file__).resolve().parent.parent
CLEANUP = ROOT / "plugins" / "policies" / "policy-appCleanup.py"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cleanup(clock: Clock) -> Any:
    spec = importlib.util.spec_from_file_location("_policy_appCleanup_timing", CLEANUP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.time = SimpleNamespace(time=clock.time)  # type: ignore[attr-defined]
    yield module
    del sys.modules[spec.name]


def running(*apps: str) -> dict[str, Any]:
    """What the policy sees of Fluidity when it runs ``apps``."""
    state = {"namespace": "default", "applications": {
        app: {"web": [{"host": "node-a", "deployment": f"{app}-web-node-a", "replicas": 1,
                       "ready_replicas": 1, "ready": True}]} for app in apps}}
    return {"fluidity": {"state": state, "options": {}}}


def step(module: Any, context: dict[str, Any], mechanisms: dict[str, Any],
         described: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """One analysis and, if it says so, one plan: (plan or {}, context)."""
    apps = [{"name": name, "spec": {}} for name in described]
    wanted, context = module.analyze(context, apps, {}, mechanisms, {}, None)
    plan: dict[str, Any] = {}
    if wanted:
        plan, context = module.plan(context, apps, {}, mechanisms, {}, None)
    assert json.loads(json.dumps(context)) == context  # storable as it is
    return plan, context


def test_the_shipped_timings_are_seconds_not_minutes(cleanup):
    context = cleanup.initialize()
    interval = policies.policy_settings("appCleanup", copy.deepcopy(context)).interval
    assert interval <= 1.0
    assert cleanup.parse_interval(context["grace_period"]) <= 5.0


def test_a_deleted_application_is_removed_right_after_the_grace_period(cleanup, clock):
    context = cleanup.initialize()
    plan, context = step(cleanup, context, running("shop"), described=("shop",))
    assert plan == {}
    plan, context = step(cleanup, context, running("shop"))  # its description is gone
    assert plan == {}
    clock.now += 4.9
    assert step(cleanup, context, running("shop"))[0] == {}  # within the grace period
    clock.now += 0.2
    plan, context = step(cleanup, context, running("shop"))
    assert plan == {"fluidity": {"name": "shop", "remove_app": True}}


def test_several_deleted_applications_go_one_per_analysis_and_none_twice(cleanup, clock):
    context = cleanup.initialize()
    stale = running("a", "b", "c")  # Fluidity's report, not yet refreshed after removals
    _, context = step(cleanup, context, stale)
    clock.now += 5
    removed = []
    for _ in range(6):
        plan, context = step(cleanup, context, stale)
        if plan:
            removed.append(plan["fluidity"]["name"])
        clock.now += 1
    assert removed == ["a", "b", "c"]  # one per second, each once


def test_a_removal_still_reported_long_after_is_planned_again(cleanup, clock):
    context = cleanup.initialize()
    _, context = step(cleanup, context, running("shop"))
    clock.now += 5
    plan, context = step(cleanup, context, running("shop"))
    assert plan["fluidity"]["name"] == "shop"
    clock.now += 10
    assert step(cleanup, context, running("shop"))[0] == {}  # the report lags: wait
    clock.now += 21  # 31 s after the first plan: that removal did not happen
    plan, context = step(cleanup, context, running("shop"))
    assert plan == {"fluidity": {"name": "shop", "remove_app": True}}
    _, context = step(cleanup, context, running())  # gone at last: forgotten
    assert context["requested"] == {} and context["missing_since"] == {}
