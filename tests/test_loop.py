"""The loop end to end, in one process: description in, ``apply`` out, exactly once."""

from __future__ import annotations

from pathlib import Path

from tests import loopkit as kit


async def test_description_to_apply_once(loop_, cfg, plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    kit.once_policy(policies)
    loop_.start()
    events: list[dict] = []
    nc = await kit.collect(cfg.nats_url, events)
    try:
        assert (await kit.publish_desc(cfg.nats_url, "cluster", "c1", kit.cluster_doc()))["accepted"]
        reply = await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop"))
        assert reply["accepted"], reply
        await kit.wait_for(lambda: kit.applied(log), what="apply")
        await kit.wait_for(lambda: any(e["subject"] == "mlsysops.result.recorder" for e in events),
                           what="result")
        await __import__("asyncio").sleep(1.5)  # several more analyze intervals
    finally:
        await nc.close()
    records = kit.applied(log)
    assert [r["command"]["app"] for r in records] == ["shop"]
    families = [e["subject"].split(".")[1] for e in events]
    for family in ("verdict", "plan", "decision", "exec", "result"):
        assert families.count(family) == 1, (family, families)
    result = next(e for e in events if e["subject"] == "mlsysops.result.recorder")
    assert result["outcome"] == "applied" and result["app"] == "shop"
    plan = next(e for e in events if e["subject"].startswith("mlsysops.plan."))
    assert plan["subject"] == "mlsysops.plan.shop.once"
    assert set(plan) >= {"plan_id", "app", "policy", "created_at", "commands"}
    assert Path(log).exists()
