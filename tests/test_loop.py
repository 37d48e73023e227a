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
        cluster = await kit.publish_desc(cfg.nats_url, "cluster", "c1", kit.cluster_doc())
        assert cluster["accepted"]
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


async def test_seed_static_placement_plans_exactly_once_across_restarts(
        loop_, cfg, plugin_dirs) -> None:
    """The shipped static placement policy, run unchanged: one plan, even across restarts."""
    import asyncio
    import shutil

    policies, mechanisms = plugin_dirs
    shutil.copy(Path(__file__).parent.parent / "plugins/policies/policy-staticPlacement.py",
                policies)
    text = (policies / "policy-staticPlacement.py").read_text()
    assert "def initialize" not in text  # runs with the default (empty) context
    log = kit.recorder(mechanisms, name="fluidity")
    loop_.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
    assert (await kit.publish_desc(url, "app", "pinned", kit.app_doc("pinned", node="node-a")))[
        "accepted"]
    await kit.wait_for(lambda: kit.applied(log), what="the placement")
    await loop_.stop("analyzer", "planner")
    loop_.start("analyzer", "planner")
    await asyncio.sleep(12)  # longer than the default analyze interval (10 s)
    records = kit.applied(log)
    assert len(records) == 1
    command = records[0]["command"]
    assert command["name"] == "pinned"
    assert command["deployment_plan"] == {"c0": [{"action": "deploy", "host": "node-a"}],
                                          "initial_plan": True}


async def test_policies_are_picked_up_changed_and_removed_at_run_time(
        loop_, cfg, plugin_dirs) -> None:
    import asyncio

    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    loop_.start()
    events: list[dict] = []
    nc = await kit.collect(cfg.nats_url, events, families=("plan", "error"))
    try:
        assert (await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop")))[
            "accepted"]
        kit.once_policy(policies, "late")  # added while running
        await kit.wait_for(lambda: kit.applied(log), what="a plan from the new policy")
        (policies / "policy-broken.py").write_text("def analyze(:\n")
        await kit.wait_for(lambda: any(e["subject"] == "mlsysops.error.policy.broken"
                                       for e in events), what="the load error")
        error = next(e for e in events if e["subject"] == "mlsysops.error.policy.broken")
        assert "SyntaxError" in error["message"] and error["traceback"]
        # a changed file is reloaded: the new version plans for another mechanism key
        kit.always_policy(policies, "late", interval="200ms", key="'k2'")
        await kit.wait_for(lambda: any(r["command"].get("key") == "k2"
                                       for r in kit.applied(log)), what="the new behaviour")
        (policies / "policy-late.py").unlink()
        await asyncio.sleep(1.0)  # both services notice the removal

        def plans_of_late() -> int:
            return sum(1 for e in events if e.get("policy") == "late" and "commands" in e)

        before = plans_of_late()
        await asyncio.sleep(1.5)
        # removed: no more plans (a plan made before the removal may still be applying,
        # so what counts is what the planner publishes, not what the executor records)
        assert plans_of_late() == before
    finally:
        await nc.close()
