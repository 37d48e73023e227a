"""SIGKILL each service in turn, and restart the broker, under a steady load.

Guarantees checked after each run (see docs/reliability.md):

- every plan the scheduler acked (a ``scheduled`` decision in ``MLSYSOPS_EVENTS``) has a
  result and was applied exactly once, except an execution reported ``unknown``
  ("interrupted ...") because its executor died inside ``apply``, applied at most once;
- nothing was applied without a scheduled decision, nothing twice;
- every description the monitor accepted is stored and its application gets plans;
- every plan in ``MLSYSOPS_PLANS`` was decided, and per conflict key the first plan wins
  until its execution ends (decisions out of stream order are counted and reported);
- the loop flows again within seconds of the restart (the figures are printed).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from tests import loopkit as kit
from tests.faults import harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

APPS = {f"app-{i}" for i in range(4)}
DOWN = 2.0  # seconds a killed service stays down (the pipeline drains meanwhile)


async def _start(process_loop: Any, cfg: Any, plugin_dirs: tuple[Path, Path]
                 ) -> tuple[h.Recorder, Path, h.Load]:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg)
    rec = h.recorder(mechanisms)
    policy = h.steady_policy(policies)
    process_loop.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
    for app in sorted(APPS):
        assert (await kit.publish_desc(url, "app", app, kit.app_doc(app)))["accepted"]
    await h.wait_apps(rec, APPS, 0, timeout=60)
    load = h.Load(url)
    await load.start()
    return rec, policy, load


async def _until_accepted(load: h.Load, name: str, timeout: float = 20) -> float:
    started = time.time()
    while time.time() - started < timeout:
        if await load.publish(name, timeout=0.5):
            return time.time()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no monitor accepted {name} within {timeout}s")


def _bound(name: str, cfg: Any) -> float:
    """Longest wait for the first apply after restarting ``name`` (startup ~1 s, plus).

    The scheduler waits for the killed replica's lease (5 s TTL, minus the time it was
    down). A killed analyzer may leave verdicts in its outbox, re-published after
    2 x call timeout + 5 s; a killed planner may hold the verdicts of every application,
    redelivered after 2 x call timeout + 10 s (docs/reliability.md, known issue 3).
    """
    return {"analyzer": 2 * cfg.call_timeout + 5 + 4,
            "planner": 2 * cfg.call_timeout + 10 + 4}.get(name, 10.0)


def _rate(rec: h.Recorder, apps: set[str], start: float, end: float) -> float:
    """Applies per second per application (of ``apps``) in a window."""
    n = sum(start <= r["t"] <= end and r["command"]["app"] in apps for r in rec.lines())
    return n / (end - start) / len(apps)


async def _finish(process_loop: Any, cfg: Any, rec: h.Recorder, policy: Path,
                  load: h.Load) -> dict[str, Any]:
    """Stop the load, check every guarantee, and return the run's summary."""
    await load.stop()
    h.assert_alive(process_loop)
    accepted = dict(load.accepted)
    # every accepted description is stored, and its application is planned for
    await kit.wait_for(lambda: all(any(r["command"]["app"] == app and r["t"] > at
                                       for r in rec.lines()) for app, at in accepted.items()),
                       timeout=20, what="a plan for every accepted description")
    nc = await nats.connect(cfg.nats_url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        stored = {k.partition(".")[2] for k in await kv.keys() if k.startswith("app.")}
    finally:
        await nc.close()
    assert set(accepted) | APPS <= stored, (sorted(accepted), sorted(stored))
    trace = await h.drain(cfg.nats_url, rec, [policy])
    problems, summary = h.exactly_once(trace, rec)
    assert not problems, "\n".join(problems[:20]) + "\n" + process_loop.logs()
    order = h.decided_in_stream_order(trace)
    assert not [p for p in order if "never decided" in p], order
    clash = h.conflicts(trace, rec, process_loop.cfg.exec_timeout)
    assert not clash, "\n".join(clash[:20])
    # Decisions out of the plans' stream order are reported, not asserted: a scheduler
    # killed while holding a plan can see later plans decided first (the bug that
    # test_failover.py::test_plan_order_survives_a_lost_lease shows deterministically).
    summary["decided out of stream order"] = len(order)
    if order:
        summary["first out of order"] = order[0]
    summary.update(descriptions_accepted=len(accepted),
                   description_attempts_unanswered=len(load.refused),
                   telemetry_sent=load.telemetry_sent, telemetry_failed=load.telemetry_failed)
    # telemetry reached the plans: some applied command carries a published load value
    assert any(r["command"].get("load") for r in rec.lines())
    return summary


async def test_kill_each_service_in_turn(process_loop, cfg, plugin_dirs) -> None:
    rec, policy, load = await _start(process_loop, cfg, plugin_dirs)
    try:
        await _kill_each(process_loop, cfg, rec, policy, load)
    finally:
        await load.stop()


async def _kill_each(process_loop: Any, cfg: Any, rec: h.Recorder, policy: Path,
                     load: h.Load) -> None:
    figures: dict[str, Any] = {}
    await asyncio.sleep(3)
    base = time.time()
    # the executor first: an execution it interrupts is only closed after the executor
    # consumer's ack wait (4 s from its last in-progress ack), which the next kill overlaps
    for name in ("executor", "analyzer", "planner", "scheduler", "monitor"):
        apps = APPS | set(load.accepted)
        process_loop.kill(name)
        started_before = {s["plan_id"] for s in rec.started()}
        await asyncio.sleep(DOWN)
        restart = time.time()
        process_loop.start(name)
        row: dict[str, Any] = {}
        if name == "monitor":
            row["description accepted again after (s)"] = round(
                await _until_accepted(load, "app-0") - restart, 2)
        first = await kit.wait_for(lambda r=restart: rec.first_after(r),
                                   timeout=_bound(name, process_loop.cfg),
                                   what=f"an apply after restarting {name}")
        await h.wait_apps(rec, apps, restart, timeout=40)
        row["first apply after restart (s)"] = round(first, 2)
        row["every application applied again after (s)"] = round(
            max(v for a, v in rec.apps_after(restart).items() if a in apps), 2)
        if name == "executor":
            ended = {r["command"]["_plan_id"] for r in rec.lines()}
            row["applies cut by the kill"] = len(started_before - ended)
        row["killed at"] = round(restart - DOWN, 3)
        figures[name] = row
        h.report(f"{name} restarted", row)
        h.assert_alive(process_loop)
        await asyncio.sleep(1.0)
    figures["applies/s over the run"] = round(
        sum(r["t"] > base for r in rec.lines()) / (time.time() - base), 1)
    summary = await _finish(process_loop, cfg, rec, policy, load)
    killed = figures["executor"]["killed at"]
    trace = await h.read_trace(cfg.nats_url)
    figures["executor"]["cut applies reported after the kill (s)"] = sorted(
        round(r["finished_at"] - killed, 1) for r in trace.results.values()
        if r["outcome"] == "unknown" and h.INTERRUPTED in r["error"])
    h.report("kill -9 each service in turn", {**figures, "run": summary})


async def test_broker_restart(process_loop, cfg, plugin_dirs, nats_server) -> None:
    rec, policy, load = await _start(process_loop, cfg, plugin_dirs)
    try:
        await _restart_broker(process_loop, cfg, rec, policy, load, nats_server)
    finally:
        await load.stop()


async def _restart_broker(process_loop: Any, cfg: Any, rec: h.Recorder, policy: Path,
                          load: h.Load, nats_server: Any) -> None:
    await asyncio.sleep(4)
    apps = APPS | set(load.accepted)
    before = _rate(rec, apps, time.time() - 3, time.time())
    nats_server.stop()
    await asyncio.sleep(DOWN)
    restart = time.time()
    nats_server.start()
    probe = asyncio.ensure_future(_until_accepted(load, "app-0", timeout=30))
    try:
        # bound: a JetStream request lost with the broker times out after 10 s, and a
        # scheduler that gave up its lease waits for it to expire (5 s)
        first = await kit.wait_for(lambda: rec.first_after(restart), timeout=25,
                                   what="an apply after the broker restart")
        await h.wait_apps(rec, apps, restart, timeout=40)
        accepted_again = await probe - restart
    finally:
        probe.cancel()
    sent = load.last_load
    # telemetry published after the restart reaches the analyzer and the plans
    await kit.wait_for(lambda: any((r["command"].get("load") or 0) > sent for r in rec.lines()),
                       timeout=15, what="telemetry published after the restart in a plan")
    await asyncio.sleep(4)
    h.assert_alive(process_loop)
    after = _rate(rec, apps, time.time() - 3, time.time())
    # back to the same pace: the services reconnected every subscription and watch
    assert after >= 0.7 * before, (before, after)
    figures = {"applies/s per application before / after": f"{before:.2f} / {after:.2f}",
               "first apply after restart (s)": round(first, 2),
               "every application applied again after (s)": round(
                   max(v for a, v in rec.apps_after(restart).items() if a in apps), 2),
               "description accepted again after (s)": round(accepted_again, 2)}
    summary = await _finish(process_loop, cfg, rec, policy, load)
    h.report("nats-server stopped 2 s and restarted", {**figures, "run": summary})
