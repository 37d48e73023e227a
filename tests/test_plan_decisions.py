"""A policy's context follows the scheduler's decision on its plan (issue 11, item 8b).

What ``plan()`` returns as the new context is committed only if the scheduler scheduled
at least one command of the plan; if it discarded them all, the pair keeps the context it
had before, so a one-shot policy ("deployed" recorded in its context) plans again at its
next analysis instead of never. Either way the policy finds the decision in
``context["_last_decision"]``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest

from tests import loopkit as kit

pytestmark = pytest.mark.timeout(60)

ONE_SHOT = '''
def initialize():
    return {{"configuration": {{"analyze_interval": "300ms"}}}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    return "planned" not in context, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    context["planned"] = True
    return {{"recorder": {{"policy": "{name}", "key": "k", "sleep": 1.0,
                          "last": context.get("_last_decision")}}}}, context
'''


async def test_a_discarded_one_shot_plan_is_made_again_and_applied(loop_, cfg, plugin_dirs):
    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    for name in ("first", "second"):  # both plan for the same conflict key at once
        (policies / f"policy-{name}.py").write_text(ONE_SHOT.format(name=name))
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events, families=("decision", "result"))
    try:
        reply = await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop"))
        assert reply["accepted"], reply
        await kit.wait_for(lambda: len(kit.applied(log)) == 2, timeout=30,
                           what="both one-shot policies applied")
        await kit.wait_for(lambda: len([e for e in events if e["subject"].startswith(
            "mlsysops.result.")]) == 2, what="both results")
    finally:
        await nc.close()
    applied = {r["command"]["policy"]: r["command"] for r in kit.applied(log)}
    assert sorted(applied) == ["first", "second"]
    discarded = [e for e in events if e["subject"].startswith("mlsysops.decision.")
                 and e["outcome"] == "discarded"]
    assert discarded, "the two first plans should have met on the key"
    loser = discarded[0]["policy"]
    latest = [d for d in discarded if d["policy"] == loser][-1]  # it may have met it again
    last = applied[loser]["last"]
    assert last is not None and last["outcome"] == "discarded", last
    assert last["plan_id"] == latest["plan_id"]
    assert last["mechanisms"]["recorder"]["holder"] == latest["holder"]
    assert "held by plan" in last["mechanisms"]["recorder"]["reason"]
    assert last["committed"] is False
    winner = "first" if loser == "second" else "second"
    assert applied[winner]["last"] is None


async def test_a_plan_made_while_no_scheduler_runs_is_decided_once_one_starts(
        loop_, cfg, plugin_dirs, monkeypatch):
    """With no scheduler the pair stays in flight (its verdict comes back after the
    planner's decision wait) and nothing is planned twice; once a scheduler runs, the
    plan is decided, applied once, and the policy's context is committed."""
    import services.planner.service as planner

    monkeypatch.setattr(planner, "DECISION_WAIT", 1.0)
    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    (policies / "policy-solo.py").write_text(ONE_SHOT.format(name="solo"))
    loop_.start("monitor", "analyzer", "planner", "executor")
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events, families=("plan", "result"))
    try:
        reply = await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop"))
        assert reply["accepted"], reply
        await kit.wait_for(lambda: any(e["subject"].startswith("mlsysops.plan.")
                                       for e in events), what="the plan")
        await asyncio.sleep(3.5)  # three decision waits: the verdict came back meanwhile
        plans = {e["plan_id"] for e in events if e["subject"].startswith("mlsysops.plan.")}
        assert len(plans) == 1, plans  # re-published with its id at most, never made again
        loop_.start("scheduler")
        await kit.wait_for(lambda: kit.applied(log), timeout=30, what="the apply")
        await asyncio.sleep(1.5)
    finally:
        await nc.close()
    assert len(kit.applied(log)) == 1
    assert [e["plan_id"] for e in events if e["subject"].startswith("mlsysops.result.")] == [
        *plans]
    context = await _context(cfg.nats_url, "solo.shop")
    assert context["planned"] is True
    assert context["_last_decision"]["outcome"] == "scheduled"
    assert context["_last_decision"]["committed"] is True


async def _context(url: str, key: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-context")
        entry = await kv.get(key)
        return json.loads(entry.value or b"{}")["context"]  # type: ignore[no-any-return]
    finally:
        await nc.close()
