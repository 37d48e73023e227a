"""An executor killed inside ``apply``: reported "unknown" ("interrupted ..."), never re-applied.

docs/contract.md: the ledger entry stays ``started``; the redelivered request records the
execution with outcome ``unknown`` and "interrupted: the executor stopped during apply; the
outcome is unknown and the command is not applied again", within seconds of the kill (the
executor's 4-s ack wait), and that terminal result releases the claim.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import pytest

from mlsysops import wire
from tests import loopkit as kit
from tests.faults import harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_executor_killed_inside_apply(process_loop, cfg, plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg)
    rec = h.recorder(mechanisms)
    kit.once_policy(policies, mechanism="rec", key='"slow"', sleep=6)
    process_loop.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
    assert (await kit.publish_desc(url, "app", "slow", kit.app_doc("slow")))["accepted"]
    started = await kit.wait_for(rec.started, timeout=40, what="apply started")
    plan_id = started[0]["plan_id"]
    process_loop.kill("executor")
    killed = time.time()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        ledger = await js.key_value("mlsysops-ledger")
        entry = wire.LEDGER.decode((await ledger.get(f"{plan_id}.rec")).value or b"")
        assert entry.state == "started"
        process_loop.start("executor")
        # the request comes back after the executor consumer's short ack wait (4 s), the
        # killed executor's last in-progress ack being at most 1 s before the kill
        await kit.wait_for(lambda: kit.stored(js, "EVENTS", "mlsysops.result.rec"), timeout=10,
                           what="the interrupted execution's result, within 10 s of the kill")
        reported = time.time() - killed
        trace = await h.read_trace(url)
        result = trace.results[plan_id]
        assert result["outcome"] == "unknown"
        assert result["error"].startswith("interrupted: the executor stopped during apply")
        assert "not applied again" in result["error"]
        entry = wire.LEDGER.decode((await ledger.get(f"{plan_id}.rec")).value or b"")
        assert (entry.state, entry.error) == ("unknown", result["error"])
        await asyncio.sleep(2)
        assert rec.lines() == [], "the interrupted command was applied again"
        assert [s["plan_id"] for s in rec.started()] == [plan_id]
        # the terminal result released the claim: the next plan on the key is scheduled
        plan = wire.Plan(plan_id="after", app="slow", policy="manual", created_at=wire.now(),
                         commands={"rec": {"app": "slow", "key": "slow"}})
        await js.publish("mlsysops.plan.slow.manual", wire.encode(plan),
                         headers={"Nats-Msg-Id": "after"})
        await kit.wait_for(rec.lines, timeout=20, what="the next plan applied")
        decision = (await h.read_trace(url)).scheduled()
        assert "after" in decision and decision["after"]["holder"] is None
        assert [r["command"]["_plan_id"] for r in rec.lines()] == ["after"]
    finally:
        await nc.close()
    h.report("executor killed inside apply", {
        "interrupted result published after the kill (s)": round(reported, 1),
        "result": result["error"]})


async def test_applied_execution_survives_a_failed_ledger_write(process_loop, cfg,
                                                               plugin_dirs) -> None:
    """``apply`` succeeded but recording it failed once: the result must still be applied."""
    rec = h.recorder(plugin_dirs[1])
    process_loop.cfg = h.fast(cfg)
    process_loop.start("executor")  # the request goes to it directly, as a scheduler sends it
    nc = await nats.connect(cfg.nats_url)
    try:
        js = nc.jetstream()
        request = wire.ExecRequest(exec_id="W.rec", plan_id="W", mechanism="rec",
                                   command={"app": "w", "key": "w", "sleep": 1}, app="w",
                                   policy="manual")
        await kit.wait_for(lambda: _publish_when_ready(js, request), timeout=30,
                           what="the request published")
        await kit.wait_for(rec.started, timeout=30, what="apply started")
        # While apply runs, the ledger stream refuses writes (as JetStream does while the
        # broker stops): the executor's "applied" record fails once.
        info = await js.stream_info("KV_mlsysops-ledger")
        size = info.config.max_msg_size
        info.config.max_msg_size = 1
        await js.update_stream(info.config)
        await kit.wait_for(rec.lines, timeout=10, what="apply finished")
        await asyncio.sleep(1.0)
        info.config.max_msg_size = size
        await js.update_stream(info.config)
        # writes work again: the outcome the executor knows must be recorded and announced
        await kit.wait_for(lambda: kit.stored(js, "EVENTS", "mlsysops.result.rec"),
                           timeout=6, what="the result after the ledger accepts writes")
        result = (await h.read_trace(cfg.nats_url)).results["W"]
        assert (result["outcome"], result["error"]) == ("applied", "")
    finally:
        await nc.close()


async def _publish_when_ready(js: Any, request: wire.ExecRequest) -> bool:
    """Publish once the loop's streams exist (the services create them)."""
    try:
        await js.publish("mlsysops.exec.rec", wire.encode(request),
                         headers={"Nats-Msg-Id": request.exec_id})
    except Exception:
        return False
    return True
