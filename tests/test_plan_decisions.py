"""A policy's context follows the scheduler's decision on its plan (issue 11, item 8b).

What ``plan()`` returns as the new context is committed only if the scheduler scheduled
at least one command of the plan; if it discarded them all, the pair keeps the context it
had before, so a one-shot policy ("deployed" recorded in its context) plans again at its
next analysis instead of never. Either way the policy finds the decision in
``context["_last_decision"]``.
"""

from __future__ import annotations

from typing import Any

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
