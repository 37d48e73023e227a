"""Faulty plugins are reported and contained; the other policies keep their cadence.

A policy that raises, one that hangs, one that blocks its event loop (``time.sleep`` in an
``async def``), one that returns garbage, one with a syntax error; a mechanism whose
``apply`` raises and one whose ``apply`` hangs. Each is reported on
``mlsysops.error.policy.<name>`` / ``.mechanism.<name>`` (and load errors and quarantine in
the ``mlsysops-status`` bucket, shown by ``mlsysops status``) with a useful message; calls
that overrun MLSYSOPS_CALL_TIMEOUT / MLSYSOPS_APPLY_TIMEOUT are abandoned; a policy that
keeps failing is quarantined after MLSYSOPS_QUARANTINE_AFTER failures until its file
changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from mlsysops import wire
from tests import loopkit as kit
from tests.faults import harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
ROOT = Path(__file__).resolve().parents[2]

HEAD = '''
import time
def initialize():
    return {"configuration": {"analyze_interval": "300ms"}}

def plan(context, *args):
    return {}, context
'''
FAULTY_POLICIES = {
    "raiser": HEAD + '''
def analyze(context, *args):
    raise RuntimeError("raiser fails on purpose")
''',
    "hanger": HEAD + '''
def analyze(context, *args):
    time.sleep(3600)
''',
    "awaiter": HEAD + '''
import asyncio
async def analyze(context, *args):
    await asyncio.sleep(3600)
''',
    "blocker": HEAD + '''
async def analyze(context, *args):
    time.sleep(5)  # blocks the event loop it runs on
    return False, context
''',
    "garbage": HEAD + '''
def analyze(context, *args):
    return "garbage"
''',
    "broken": '''
def analyze(context:
    return True
''',
}
FAULTY_MECHANISMS = {
    "boom": '''
def apply(command):
    raise RuntimeError("boom fails on purpose")
''',
    "stuck": '''
import time
def apply(command):
    time.sleep(3600)
''',
}
# "after N": N >= MLSYSOPS_QUARANTINE_AFTER (3); evaluations of the policy's applications
# that failed while the third failure was being reported also count
QUARANTINED = re.compile(r"quarantined after ([3-9]) consecutive failures; it runs again "
                         r"when its file changes")
QUARANTINES = ("raiser", "hanger", "awaiter", "blocker", "garbage")
HEALTHY_RAISER = '''
def initialize():
    return {"configuration": {"analyze_interval": "300ms"}}

def analyze(context, *args):
    return "planned" not in context, context

def plan(context, application_description, *args):
    context["planned"] = True
    app = application_description[0]["name"]
    return {"rec": {"app": app, "key": "raiser-" + app, "policy": "raiser"}}, context
'''


def cli(cfg: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLSYSOPS_NATS_URL": cfg.nats_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlsysops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


async def errors(url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        return [e for _, e in await h.read_stream(nc.jetstream(), "MLSYSOPS_EVENTS",
                                                  "mlsysops.error.>")]
    finally:
        await nc.close()


def of(events: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["subject"] == f"mlsysops.error.{kind}.{name}"]


async def plugins_loaded(url: str, keys: list[str]) -> bool:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        for key in keys:
            try:
                entry = await kv.get(f"plugin.{key}")
            except Exception:
                return False
            if not wire.PLUGIN_STATUS.decode(entry.value or b"").loaded:
                return False
        return True
    finally:
        await nc.close()


def cadence(rec: h.Recorder, apps: set[str], start: float, end: float) -> tuple[float, float]:
    """Applies per second per application, and the longest gap between two, in a window."""
    rates, gaps = [], []
    for app in apps:
        times = sorted(r["t"] for r in rec.lines()
                       if r["command"].get("app") == app and r["command"].get("policy") ==
                       "steady" and start <= r["t"] <= end)
        rates.append(len(times) / (end - start))
        gaps.append(max([b - a for a, b in zip([start, *times], [*times, end],
                                               strict=True)]))
    return min(rates), max(gaps)


async def test_faulty_plugins_are_reported_and_contained(process_loop, cfg,
                                                        plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg, call_timeout=1.5, apply_timeout=1.5, quarantine_after=3)
    rec = h.recorder(mechanisms)
    h.steady_policy(policies, "steady", sleep=0)
    process_loop.start()
    url = cfg.nats_url
    apps = {"a1", "a2"}
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
    for app in sorted(apps):
        assert (await kit.publish_desc(url, "app", app, kit.app_doc(app)))["accepted"]
    await h.wait_apps(rec, apps, 0, timeout=60)
    base_start = time.time()
    await asyncio.sleep(3)
    injected = time.time()
    base_rate, base_gap = cadence(rec, apps, base_start, injected)

    for name, source in FAULTY_MECHANISMS.items():
        (mechanisms / f"{name}.py").write_text(source)
    # the executor must know a mechanism before the scheduler sends it work (each rescans
    # on its own every second; see docs/reliability.md)
    await kit.wait_for(lambda: plugins_loaded(url, [f"{s}.mechanism.{m}" for s in (
        "executor", "scheduler") for m in FAULTY_MECHANISMS]), what="mechanisms loaded")
    for name, source in FAULTY_POLICIES.items():
        (policies / f"policy-{name}.py").write_text(source)
    for mechanism in FAULTY_MECHANISMS:
        h.steady_policy(policies, f"use{mechanism}", mechanism=mechanism, interval="500ms",
                        sleep=0)

    def quarantined(events: list[dict[str, Any]], name: str) -> bool:
        return any(QUARANTINED.fullmatch(e["message"]) for e in of(events, "policy", name))

    async def all_reported() -> list[dict[str, Any]] | None:
        events = await errors(url)
        done = (all(quarantined(events, n) for n in QUARANTINES)
                and of(events, "policy", "broken") and of(events, "mechanism", "boom")
                and of(events, "mechanism", "stuck"))
        return events if done else None

    try:
        events = await kit.wait_for(all_reported, timeout=25, what="every fault reported")
    except AssertionError:
        seen = sorted({(e["subject"], e["message"][:120]) for e in await errors(url)})
        raise AssertionError("not every fault was reported; seen:\n" + "\n".join(
            f"{s}: {m}" for s, m in seen) + process_loop.logs()) from None
    reported = time.time() - injected
    await asyncio.sleep(max(0.0, injected + 10 - time.time()))
    rate, gap = cadence(rec, apps, injected, time.time())
    h.assert_alive(process_loop)
    events = await errors(url)

    # -- each fault, with a message that says what happened
    def messages(kind: str, name: str) -> set[str]:
        return {e["message"] for e in of(events, kind, name)}

    assert "analyze: analyze() raised RuntimeError: raiser fails on purpose" in messages(
        "policy", "raiser")
    failure = next(e for e in of(events, "policy", "raiser") if "raised" in e["message"])
    assert "policy-raiser.py" in failure["traceback"] and failure["app"] in apps
    deadline = ("analyze: analyze exceeded its deadline of 1.5s, was abandoned, and its "
                "outcome is unknown")
    assert deadline in messages("policy", "hanger")
    assert deadline in messages("policy", "awaiter")
    assert deadline in messages("policy", "blocker")
    assert ("analyze: analyze() must return a pair (result, context), got str"
            in messages("policy", "garbage"))
    (load_error,) = messages("policy", "broken")  # reported once per service, same text
    assert load_error.startswith("failed to load: failed to load policy-broken.py: SyntaxError")
    assert "line 2" in load_error
    boom = of(events, "mechanism", "boom")[0]
    assert boom["message"] == "apply() raised RuntimeError: boom fails on purpose"
    assert "boom.py" in boom["traceback"] and boom["details"]["plan_id"]
    stuck = "apply exceeded its deadline of 1.5s, was abandoned, and its outcome is unknown"
    assert messages("mechanism", "stuck") == {stuck}
    # the executions are reported with the same reason: failed when apply raised, unknown
    # when it was abandoned at its deadline (it may still have taken effect)
    for mechanism, outcome, error in (
            ("boom", "failed", boom["message"]),
            ("stuck", "unknown", stuck)):
        trace = await h.read_trace(url, mechanism)
        assert trace.results and {r["outcome"] for r in trace.results.values()} == {outcome}
        assert {r["error"] for r in trace.results.values()} == {error}
    # the deadlines were kept: calls were abandoned, not waited for (a blocker call lasts
    # 5 s, a hanger or awaiter call for ever; three failures each arrived within seconds)
    assert reported < 15

    # -- mlsysops status shows load errors and quarantines
    out = cli(cfg, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    pol = status["policies"]
    assert {e["service"] for e in pol["broken"]} == {"analyzer", "planner"}
    assert all(not e["loaded"] and "SyntaxError" in e["error"] for e in pol["broken"])
    for name in QUARANTINES:
        (entry,) = [e for e in pol[name] if e["service"] == "analyzer"]
        assert QUARANTINED.fullmatch(entry["error"]), entry
    assert pol["steady"] == [{"service": s, "loaded": True, "error": ""}
                             for s in ("analyzer", "planner")]
    text = cli(cfg, "status").stdout
    assert "broken" in text and "SyntaxError" in text and QUARANTINED.search(text)

    # -- the others kept their cadence
    assert rate >= 0.6 * base_rate and gap < 2.0, (base_rate, base_gap, rate, gap)

    # -- quarantine holds until the file changes
    counted = len(of(await errors(url), "policy", "raiser"))
    raiser = policies / "policy-raiser.py"
    raiser.write_text(raiser.read_text())  # written again, same content: still quarantined
    await asyncio.sleep(2.5)
    assert len(of(await errors(url), "policy", "raiser")) == counted
    assert not [r for r in rec.lines() if r["command"].get("policy") == "raiser"]
    changed = time.time()
    raiser.write_text(HEALTHY_RAISER)
    await kit.wait_for(lambda: {r["command"]["app"] for r in rec.lines()
                                if r["command"].get("policy") == "raiser"} == apps,
                       timeout=15, what="the changed policy running again")
    back = time.time() - changed
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        entry = wire.PLUGIN_STATUS.decode(
            (await kv.get("plugin.analyzer.policy.raiser")).value or b"")
        assert entry.loaded and entry.error == ""
    finally:
        await nc.close()
    h.report("faulty plugins", {
        "steady applies/s per app before / during faults": f"{base_rate:.2f} / {rate:.2f}",
        "longest gap between applies before / during faults (s)":
            f"{base_gap:.2f} / {gap:.2f}",
        "every fault reported (and 5 policies quarantined) within (s)": round(reported, 1),
        "quarantined policy running again after its file changed (s)": round(back, 1)})


PLAN_FAILS = '''
import json, time
CALLS = {calls!r}

def initialize():
    return {{"configuration": {{"analyze_interval": "300ms"}}}}

def analyze(context, *args):
    return True, context

def plan(context, *args):
    with open(CALLS, "a") as f:
        f.write(json.dumps({{"t": time.time()}}) + "\\n")
    raise RuntimeError("plan fails on purpose")
'''


async def test_policy_failing_in_plan_is_quarantined(process_loop, cfg, plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg, quarantine_after=3)
    h.recorder(mechanisms)
    calls = policies.parent / "plan-calls.jsonl"
    (policies / "policy-planfails.py").write_text(PLAN_FAILS.format(calls=str(calls)))
    process_loop.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "app", "a1", kit.app_doc("a1")))["accepted"]

    async def quarantine_reported() -> bool:
        return any(QUARANTINED.fullmatch(e["message"])
                   for e in of(await errors(url), "policy", "planfails"))

    await kit.wait_for(quarantine_reported, timeout=30, what="the quarantine reported")
    await asyncio.sleep(1.0)
    before = len(calls.read_text().splitlines())
    await asyncio.sleep(3.0)  # ten analyze intervals
    after = len(calls.read_text().splitlines())
    assert after == before, f"plan() called {after - before} more times once quarantined"
