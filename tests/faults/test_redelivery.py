"""Work held by a killed service comes back quickly, not after a long ack wait.

The analyzer evaluates all pairs in step, so the planner usually holds a verdict of every
application at the same moment; a planner killed then stalls every application until
those verdicts are redelivered.
"""

from __future__ import annotations

import time

import pytest

from tests import loopkit as kit
from tests.faults import harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SLOW_PLAN = '''
import json, time
MARK = {mark!r}

def initialize():
    return {{"configuration": {{"analyze_interval": "300ms"}}}}

def analyze(context, *args):
    return True, context

def plan(context, application_description, *args):
    with open(MARK, "a") as f:
        f.write(json.dumps({{"t": time.time()}}) + "\\n")
    time.sleep(1.5)
    app = application_description[0]["name"]
    return {{"rec": {{"app": app, "key": app}}}}, context
'''


async def test_verdict_held_by_a_killed_planner_comes_back_soon(process_loop, cfg,
                                                                plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg)  # call timeout 2 s: the planner's ack wait is 14 s
    rec = h.recorder(mechanisms)
    mark = policies.parent / "plan-calls.jsonl"
    (policies / "policy-slowplan.py").write_text(SLOW_PLAN.format(mark=str(mark)))
    process_loop.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "app", "a1", kit.app_doc("a1")))["accepted"]
    await kit.wait_for(rec.lines, timeout=40, what="the loop flowing")
    calls = len(mark.read_text().splitlines())
    await kit.wait_for(lambda: len(mark.read_text().splitlines()) > calls, timeout=10,
                       what="plan() running")
    process_loop.kill("planner")  # inside plan(): the verdict is delivered, not acked
    restart = time.time()
    process_loop.start("planner")
    # a plan needs 1.5 s; allow a redelivery within about five seconds
    await kit.wait_for(lambda: rec.first_after(restart), timeout=8,
                       what="an apply after the planner restart")
