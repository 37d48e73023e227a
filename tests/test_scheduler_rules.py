"""The scheduler's rule under load and faults (issue 11, items 6 and 8a).

Plans are published straight on ``mlsysops.plan.<app>.<policy>`` as a planner does, and
what a user sees is read back from ``mlsysops.decision.*``, ``mlsysops.result.*``,
``mlsysops.error.*``, the recording mechanism's log and ``mlsysops status --json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from mlsysops import settings as settings_mod
from mlsysops import wire
from mlsysops.bus import Bus
from tests import loopkit as kit
from tests.conftest import ROOT, InProcessLoop

pytestmark = pytest.mark.timeout(90)


async def publish_plan(js: Any, plan_id: str, commands: dict[str, Any], *,
                       app: str = "_global", policy: str = "p") -> None:
    plan = wire.Plan(plan_id=plan_id, app=app, policy=policy, created_at=wire.now(),
                     commands=commands)
    await js.publish(f"mlsysops.plan.{app}.{policy}", wire.encode(plan),
                     headers={"Nats-Msg-Id": plan_id})


def decisions(events: list[dict[str, Any]], plan_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["subject"].startswith("mlsysops.decision.")
            and e["plan_id"] == plan_id]


def decided(events: list[dict[str, Any]], plan_id: str) -> dict[str, Any] | None:
    found = decisions(events, plan_id)
    return found[0] if found else None


def result(events: list[dict[str, Any]], plan_id: str) -> dict[str, Any] | None:
    return next((e for e in events if e["subject"].startswith("mlsysops.result.")
                 and e["plan_id"] == plan_id), None)


@dataclasses.dataclass
class Flow:
    """What a user's tooling sees of the loop: the flow subjects, and a JetStream client."""

    events: list[dict[str, Any]]
    js: Any


@pytest.fixture
async def flow(cfg: settings_mod.Settings) -> AsyncIterator[Flow]:
    events: list[dict[str, Any]] = []
    watcher = await kit.collect(cfg.nats_url, events)
    nc = await nats.connect(cfg.nats_url)
    yield Flow(events, nc.jetstream())
    await nc.close()
    await watcher.close()


@pytest.fixture
async def bus_(cfg: settings_mod.Settings) -> Any:
    """A client connection with the loop's streams and buckets (as any service makes them)."""
    bus = Bus(cfg, "test")
    await bus.connect()
    yield bus
    await bus.close()


# --------------------------------------------------------------------------- backlog
async def test_a_claim_holds_until_its_execution_has_run_even_with_a_backlog(
        cfg, plugin_dirs, flow) -> None:
    """With executions queued (here: no executor yet), a second plan on the same key is
    discarded for as long as the first has not run, however long that takes."""
    log = kit.recorder(plugin_dirs[1])
    short = settings_mod.Settings(**{**cfg.__dict__, "exec_timeout": 1.0})
    loop = InProcessLoop(short)
    loop.start("scheduler")
    events, js = flow.events, flow.js
    try:
        await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="an active scheduler")
        await publish_plan(js, "A", {"recorder": {"n": "A", "key": "k"}})
        await kit.wait_for(lambda: decided(events, "A"), what="A decided")
        assert decided(events, "A")["outcome"] == "scheduled"  # type: ignore[index]
        await asyncio.sleep(2.0)  # twice --exec-timeout after A's decision; A has not run
        await publish_plan(js, "B", {"recorder": {"n": "B", "key": "k"}})
        await kit.wait_for(lambda: decided(events, "B"), what="B decided")
        b = decided(events, "B")
        assert b is not None and b["outcome"] == "discarded", b
        assert b["holder"] == "A"
        loop.start("executor")
        await kit.wait_for(lambda: result(events, "A"), what="A executed")
        await publish_plan(js, "C", {"recorder": {"n": "C", "key": "k"}})
        await kit.wait_for(lambda: result(events, "C"), what="C executed")
        assert [r["command"]["n"] for r in kit.applied(log)] == ["A", "C"]
    finally:
        await loop.stop()


# --------------------------------------------------------------------------- stored first
async def test_a_decision_is_never_published_before_it_is_stored(
        loop_, cfg, plugin_dirs, monkeypatch, flow) -> None:
    """A scheduler that cannot store its decision publishes nothing; so a plan never gets
    two different decisions (a published "discarded", then "scheduled")."""
    kit.recorder(plugin_dirs[1])
    original = Bus.put_with_ttl
    failed: list[str] = []

    async def put_with_ttl(self: Bus, role: str, key: str, value: bytes, ttl: float,
                           last: int | None = None) -> int:
        if key == "plan.B" and not failed:
            failed.append(key)
            # meanwhile A's execution ends: deciding B again would now schedule it
            done = wire.LedgerEntry(state="applied", plan_id="A", mechanism="recorder")
            await self.kv("ledger").put("A.recorder", wire.encode(done))
            raise TimeoutError("the store did not answer (injected)")
        return await original(self, role, key, value, ttl, last)

    monkeypatch.setattr(Bus, "put_with_ttl", put_with_ttl)
    loop_.start("scheduler")  # no executor: A stays unexecuted until the ledger says so
    events, js = flow.events, flow.js
    await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="an active scheduler")
    await publish_plan(js, "A", {"recorder": {"n": "A", "key": "k"}})
    await kit.wait_for(lambda: decided(events, "A"), what="A decided")
    await publish_plan(js, "B", {"recorder": {"n": "B", "key": "k"}})
    await kit.wait_for(lambda: failed and len(decisions(events, "B")) >= 1, timeout=30,
                       what="B decided after the failed store")
    await publish_plan(js, "C", {"recorder": {"n": "C", "key": "other"}})
    await kit.wait_for(lambda: decided(events, "C"), what="C decided (B is behind us)")
    outcomes = {d["outcome"] for d in decisions(events, "B")}
    assert outcomes == {"scheduled"}, decisions(events, "B")


# --------------------------------------------------------------------------- poison plan
async def test_a_plan_that_cannot_be_handled_is_set_aside_and_later_plans_go_on(
        loop_, cfg, plugin_dirs, bus_, flow) -> None:
    log = kit.recorder(plugin_dirs[1])
    # an undecodable record in the scheduler's bucket: every attempt to decide X raises
    await bus_.kv("sched").put("claim.recorder.bad", b"\xff not a claim")
    loop_.start("scheduler", "executor")
    events, js = flow.events, flow.js
    await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="an active scheduler")
    published = time.monotonic()
    await publish_plan(js, "X", {"recorder": {"n": "X", "key": "bad"}}, policy="px")
    await publish_plan(js, "Y", {"recorder": {"n": "Y", "key": "good"}})
    await kit.wait_for(lambda: result(events, "Y"), timeout=60,
                       what="the plan behind the poison plan applied")
    print(f"[scheduler] poison plan set aside; the plan behind it applied "
          f"{time.monotonic() - published:.1f} s after both were published")
    assert [r["command"]["n"] for r in kit.applied(log)] == ["Y"]
    errors = [e for e in events if e["subject"] == "mlsysops.error.service.scheduler"
              and e.get("details", {}).get("plan_id") == "X"]
    assert errors, [e for e in events if e["subject"].startswith("mlsysops.error.")]
    assert "set aside" in errors[0]["message"]
    assert "'claim.recorder.bad' in the scheduler's bucket cannot be decoded" in (
        errors[0]["message"])
    # and an operator sees it in `mlsysops status`
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mlsysops", "status", "--json", "--nats-url", cfg.nats_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=True)
    aside = json.loads(out.stdout)["set_aside"]
    assert [a["plan_id"] for a in aside] == ["X"], aside
    assert aside[0]["policy"] == "px" and aside[0]["reason"]


# --------------------------------------------------------------------------- deleted app
async def test_a_plan_for_a_deleted_application_is_discarded_with_that_reason(
        loop_, cfg, plugin_dirs, flow) -> None:
    log = kit.recorder(plugin_dirs[1])
    loop_.start("monitor", "scheduler", "executor")
    events, js = flow.events, flow.js
    await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="an active scheduler")
    for app in ("here", "gone"):
        reply = await kit.publish_desc(cfg.nats_url, "app", app, kit.app_doc(app))
        assert reply["accepted"], reply
    assert (await kit.publish_desc(cfg.nats_url, "app", "gone", b""))["deleted"]
    await publish_plan(js, "G", {"recorder": {"n": "G", "key": "g"}}, app="gone")
    await publish_plan(js, "H", {"recorder": {"n": "H", "key": "h"}}, app="here")
    await publish_plan(js, "Z", {"recorder": {"n": "Z", "key": "z"}})  # a global policy
    await kit.wait_for(lambda: result(events, "H") and result(events, "Z"),
                       what="H and Z applied")
    g = decided(events, "G")
    assert g is not None and g["outcome"] == "discarded", g
    assert "application 'gone'" in g["reason"] and "deleted" in g["reason"]
    assert sorted(r["command"]["n"] for r in kit.applied(log)) == ["H", "Z"]


# --------------------------------------------------------------------------- several keys
MULTI = '''
def conflict_key(command):
    return command["keys"]

def apply(command):
    pass
'''


async def test_a_command_claims_all_its_conflict_keys_or_none(
        loop_, cfg, plugin_dirs, flow) -> None:
    (plugin_dirs[1] / "multi.py").write_text(MULTI)
    loop_.start("scheduler")  # no executor: scheduled plans keep their claims
    events, js = flow.events, flow.js
    await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="an active scheduler")
    await publish_plan(js, "A", {"multi": {"keys": ["x", "y"]}})
    await publish_plan(js, "B", {"multi": {"keys": ["y", "z"]}})
    await publish_plan(js, "C", {"multi": {"keys": ["z"]}})
    await kit.wait_for(lambda: all(decided(events, p) for p in "ABC"), what="decisions")
    a, b, c = (decided(events, p) for p in "ABC")
    assert a["outcome"] == "scheduled", a  # type: ignore[index]
    assert b["outcome"] == "discarded" and b["holder"] == "A", b  # type: ignore[index]
    assert "y" in b["reason"]  # type: ignore[index]
    assert c["outcome"] == "scheduled", c  # B claimed nothing, z stayed free
    assert a["conflict_keys"] == ["x", "y"]  # type: ignore[index]
