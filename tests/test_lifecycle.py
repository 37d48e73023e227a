"""What a user sees when applications and analyzer replicas come and go.

Analyzer replicas (real processes, instance names host-pid as in production) share the
(policy, application) pairs by rendezvous hashing over the live members:

- an analyzer killed with SIGKILL: every pair it had is evaluated again by the others
  within the member TTL plus one analysis interval;
- an analyzer stopped gracefully (scale 2 -> 1): it removes itself at once, and its pairs
  resume within an interval or two, well before its member key would have expired;
- scaling 1 -> 3: every pair is evaluated by exactly one replica, once per interval.

The policy ``watch`` appends one line (policy, app, pid, time) per ``analyze`` call to a
file and always answers no, so the file shows which replica evaluated which pair, when.

Applications (the whole loop in-process, the seed's static placement policy verbatim, a
recording mechanism named ``fluidity``): an application deleted and published again is
deployed again, whether its old context record was already cleaned up or not, and also
once the duplicate window of the streams has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from services.analyzer import service as analyzer_service
from tests import loopkit as kit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INTERVAL = 0.5
APPS = [f"app-{i:02d}" for i in range(12)]
POLICIES = ("watch", "audit")
PAIRS = {(p, a) for p in POLICIES for a in APPS}
SLACK = 3.0  # scheduling on a loaded 2-core machine

WATCH = '''
import json, os, time
LOG = {log!r}

def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}}}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    line = json.dumps({{"policy": {name!r}, "app": application_description[0]["name"],
                       "pid": os.getpid(), "t": time.time()}})
    with open(LOG, "a") as f:
        f.write(line + "\\n")
    return False, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    return {{}}, context
'''


def watch_policy(directory: Path, name: str) -> Path:
    log = directory.parent / "evaluations.jsonl"
    (directory / f"policy-{name}.py").write_text(
        WATCH.format(log=str(log), interval=f"{int(INTERVAL * 1000)}ms", name=name))
    return log


def evaluations(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line torn by a SIGKILL
            out.append(json.loads(line))
    return out


def by_pair(log: Path, since: float, until: float = float("inf")
            ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in evaluations(log):
        if since <= e["t"] < until:
            out.setdefault((e["policy"], e["app"]), []).append(e)
    return out


def start_analyzer(process_loop: Any, tag: str) -> subprocess.Popen[bytes]:
    """An analyzer process named as in production (host-pid), registered for clean-up."""
    env = process_loop.env("analyzer")
    env["MLSYSOPS_INSTANCE"] = ""
    with open(process_loop.logdir / f"analyzer-{tag}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.analyzer"], env=env,
                                stdout=log, stderr=log)
    process_loop.procs[f"analyzer-{tag}"] = proc
    return proc


async def live_members(url: str) -> dict[str, float]:
    """Analyzer member keys in the leases bucket -> their heartbeat's updated_at."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-leases")
        out = {}
        try:
            keys = await kv.keys()
        except Exception:  # no keys at all
            return {}
        for key in keys:
            if key.startswith("members.analyzer."):
                with contextlib.suppress(Exception):
                    entry = await kv.get(key)
                    out[key] = json.loads(entry.value or b"{}")["updated_at"]
        return out
    finally:
        await nc.close()


async def just_refreshed(url: str, pid: int) -> None:
    """Return just after the member key of the analyzer ``pid`` was refreshed."""
    def mine(members: dict[str, float]) -> float | None:
        return next((t for k, t in members.items() if k.endswith(f"-{pid}")), None)

    first = mine(await live_members(url))

    async def changed() -> bool:
        return mine(await live_members(url)) not in (None, first)

    await kit.wait_for(changed, timeout=analyzer_service.MEMBER_EVERY + SLACK,
                       what="a refresh of the member key")


async def setup(process_loop: Any, cfg: Any, plugin_dirs: tuple[Path, Path]) -> Path:
    policies, _ = plugin_dirs
    log = Path()
    for name in POLICIES:
        log = watch_policy(policies, name)
    process_loop.start("monitor")
    for app in APPS:
        assert (await kit.publish_desc(cfg.nats_url, "app", app, kit.app_doc(app)))["accepted"]
    return log


async def shared_by(log: Path, pids: set[int], timeout: float = 40) -> dict[tuple[str, str], int]:
    """Wait until, over the last two intervals, each pair was evaluated by exactly one of
    ``pids`` and every one of them evaluated some pair; return pair -> pid."""
    def settled() -> dict[tuple[str, str], int] | None:
        now = time.time()
        recent = by_pair(log, now - 2 * INTERVAL - 0.3)
        if set(recent) != PAIRS:
            return None
        owners = {pair: {e["pid"] for e in evs} for pair, evs in recent.items()}
        if any(len(o) != 1 for o in owners.values()):
            return None
        flat = {pair: next(iter(o)) for pair, o in owners.items()}
        return flat if set(flat.values()) == pids else None

    return await kit.wait_for(settled, timeout=timeout,  # type: ignore[no-any-return]
                              what=f"the pairs shared by {sorted(pids)}")


async def resumed(log: Path, pairs: set[tuple[str, str]], since: float, timeout: float
                  ) -> dict[tuple[str, str], float]:
    """Wait up to ``timeout`` for an evaluation of each pair after ``since``; return the
    delay of the first one per pair (pairs never evaluated again are missing)."""
    def firsts() -> dict[tuple[str, str], float]:
        after = by_pair(log, since)
        return {pair: min(e["t"] for e in after[pair]) - since for pair in pairs if pair in after}

    with contextlib.suppress(AssertionError):
        await kit.wait_for(lambda: len(firsts()) == len(pairs), timeout=timeout,
                           what="every pair evaluated again")
    return firsts()


# --------------------------------------------------------------------------- analyzers
async def test_pairs_of_a_killed_analyzer_are_evaluated_again(process_loop, cfg,
                                                               plugin_dirs) -> None:
    log = await setup(process_loop, cfg, plugin_dirs)
    a, b = start_analyzer(process_loop, "a"), start_analyzer(process_loop, "b")
    owners = await shared_by(log, {a.pid, b.pid})
    orphans = {pair for pair, pid in owners.items() if pid == b.pid}
    await just_refreshed(cfg.nats_url, b.pid)  # the worst moment: a full TTL to wait
    process_loop.kill("analyzer-b")  # SIGKILL
    killed_at = time.time()
    bound = analyzer_service.MEMBER_TTL + INTERVAL
    delays = await resumed(log, PAIRS, killed_at, timeout=bound + 2 * SLACK)
    missing = sorted(PAIRS - set(delays))
    assert not missing, (f"{len(missing)} of {len(PAIRS)} pairs never evaluated again after "
                         f"the kill: {missing}\n{process_loop.logs()}")
    worst = max(delays[p] for p in orphans)
    print(f"\n[lifecycle] kill -9 of an analyzer: its {len(orphans)} pairs evaluated again "
          f"{min(delays[p] for p in orphans):.1f} - {worst:.1f} s after the kill")
    assert worst <= bound + SLACK, (worst, bound)
    recovered = time.time()
    await asyncio.sleep(2 * INTERVAL + 1.0)
    after = by_pair(log, recovered)
    assert set(after) == PAIRS, sorted(PAIRS - set(after))  # the survivor does them all
    assert {e["pid"] for evs in after.values() for e in evs} == {a.pid}


async def test_pairs_of_an_analyzer_stopped_gracefully_resume_at_once(process_loop, cfg,
                                                                      plugin_dirs) -> None:
    log = await setup(process_loop, cfg, plugin_dirs)
    a, b = start_analyzer(process_loop, "a"), start_analyzer(process_loop, "b")
    owners = await shared_by(log, {a.pid, b.pid})
    orphans = {pair for pair, pid in owners.items() if pid == b.pid}
    assert len(await live_members(cfg.nats_url)) == 2
    b.send_signal(signal.SIGTERM)  # scale 2 -> 1
    stopped_at = time.time()
    assert b.wait(15) == 0
    del process_loop.procs["analyzer-b"]
    # well below what the expiry of its member key would take (MEMBER_TTL - MEMBER_EVERY)
    prompt = 2 * INTERVAL + SLACK
    assert prompt < analyzer_service.MEMBER_TTL - analyzer_service.MEMBER_EVERY
    delays = await resumed(log, orphans, stopped_at, timeout=prompt + SLACK)
    missing = sorted(orphans - set(delays))
    assert not missing, (f"{len(missing)} of the stopped analyzer's {len(orphans)} pairs were "
                         f"not evaluated again within {prompt + SLACK:.0f} s: {missing}")
    worst = max(delays.values())
    print(f"\n[lifecycle] graceful stop of an analyzer: its {len(orphans)} pairs evaluated "
          f"again {min(delays.values()):.1f} - {worst:.1f} s after SIGTERM")
    assert worst <= prompt, (worst, prompt)
    members = list(await live_members(cfg.nats_url))
    assert len(members) == 1 and members[0].endswith(f"-{a.pid}"), members


async def test_three_analyzers_evaluate_every_pair_once_per_interval(process_loop, cfg,
                                                                      plugin_dirs) -> None:
    log = await setup(process_loop, cfg, plugin_dirs)
    a = start_analyzer(process_loop, "a")
    await shared_by(log, {a.pid})
    b, c = start_analyzer(process_loop, "b"), start_analyzer(process_loop, "c")  # scale 1 -> 3
    await kit.wait_for(lambda: _count(live_members(cfg.nats_url), 3), timeout=30,
                       what="three analyzer members")
    await asyncio.sleep(2.0)  # the newcomers have loaded the policies and seen each other
    start = time.time()
    await asyncio.sleep(5.0)
    window = by_pair(log, start, time.time())
    assert set(window) == PAIRS, sorted(PAIRS - set(window))
    pids = {a.pid, b.pid, c.pid}
    for pair, evs in sorted(window.items()):
        who = {e["pid"] for e in evs}
        assert len(who) == 1 and who <= pids, (pair, who)
        times = sorted(e["t"] for e in evs)
        gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
        assert len(times) >= 3, (pair, times)
        assert min(gaps) >= INTERVAL * 0.5, (pair, "evaluated twice in one interval", gaps)
        assert max(gaps) <= INTERVAL + SLACK, (pair, "an interval without evaluation", gaps)
    used = {next(iter({e["pid"] for e in evs})) for evs in window.values()}
    assert len(used) >= 2, "the new replicas took no share of the pairs"


async def _count(members: Any, n: int) -> bool:
    now = time.time()
    return len([t for t in (await members).values()
                if now - t < analyzer_service.MEMBER_TTL]) == n


# --------------------------------------------------------------------------- applications
# The seed's static placement policy (../shared/seeds/003: "Example policy-staticPlacement.py"),
# verbatim: its three code blocks, without the prose between them.
SEED_STATIC_PLACEMENT = '''""" Plugin function to implement the initial deployment logic.
"""
def initial_plan(context, app_desc, system_desc):
    # Store app name and description in context
    context['name'] = app_desc['name']
    context['spec'] = app_desc['spec']

    # Set initial plan flag to True so that analyze() can trigger plan()
    if 'initial_deployment_finished' not in context:
        context['initial_deployment_finished'] = True

    # Store app component names
    context['component_names'] = []
    plan = {}

    for component in app_desc['spec']['components']:

        comp_name = component['metadata']['name']
        logger.info('component %s', comp_name)
        context['component_names'].append(comp_name)
        node_placement = component.get("node_placement", None)
        if node_placement:
            node_name = node_placement.get("node", None)
            # If node has static placement requirement, add action to plan
            if node_name:
                plan[comp_name] = [{'action': 'deploy', 'host': node_name}]

    return plan, context

async def analyze(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    # Retrieve the first application from the list
    application = application_description[0]
    adaptation = False

    # The first time that analyze is called, set flag to True
    if 'initial_deployment_finished' not in context:
        logger.info('initial deployment not finished')
        adaptation = True

    return adaptation, context
async def plan(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    plan_result = {}
    plan_result['deployment_plan'] = {}
    application = application_description[0]
    description_changed = False


    if 'initial_deployment_finished' not in context:
        initial_plan_result, new_context = initial_plan(context, application, system_description)
        if initial_plan_result:
            plan_result['deployment_plan'] = initial_plan_result
            plan_result['deployment_plan']['initial_plan'] = True

    if plan_result['deployment_plan']:
        plan_result['name'] = context['name']

    new_plan = {
        "fluidity": plan_result
    }
    logger.info('plan: New plan %s', new_plan)

    return new_plan, context
'''  # noqa: E501


async def context_keys(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-context")
        try:
            return list(await kv.keys())
        except Exception:  # no keys
            return []
    finally:
        await nc.close()


@pytest.mark.parametrize("republish", ["at once", "after the clean-up",
                                       "after the duplicate window"])
async def test_an_application_published_again_after_delete_is_deployed_again(
        loop_, cfg, plugin_dirs, republish) -> None:
    policies, mechanisms = plugin_dirs
    (policies / "policy-staticPlacement.py").write_text(SEED_STATIC_PLACEMENT)
    log = kit.recorder(mechanisms, name="fluidity")
    if republish == "after the duplicate window":
        loop_.cfg = dataclasses.replace(cfg, dedup_window=1.0)
    loop_.start()
    url = cfg.nats_url
    events: list[dict[str, Any]] = []
    nc = await kit.collect(url, events, families=("result",))
    try:
        assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
        doc = kit.app_doc("pinned", node="node-a")
        assert (await kit.publish_desc(url, "app", "pinned", doc))["accepted"]
        await kit.wait_for(lambda: len(kit.applied(log)) == 1 and events, what="the first apply")
        reply = await kit.publish_desc(url, "app", "pinned", b"")
        assert reply["accepted"] and reply["deleted"], reply
        if republish != "at once":
            async def cleaned() -> bool:
                return "staticPlacement.pinned" not in await context_keys(url)
            await kit.wait_for(cleaned, what="the clean-up of the old context record")
            await asyncio.sleep(1.5)  # past a 1-s duplicate window
        assert (await kit.publish_desc(url, "app", "pinned", doc))["accepted"]
        with contextlib.suppress(AssertionError):
            await kit.wait_for(lambda: len(kit.applied(log)) == 2 and len(events) == 2,
                               timeout=25, what="the second apply")
    finally:
        await nc.close()
    applies = kit.applied(log)
    results = [(e["outcome"], e["plan_id"]) for e in events]
    assert len(applies) == 2, (f"applied {len(applies)} time(s); results {results}")
    assert [a["command"]["name"] for a in applies] == ["pinned", "pinned"]
    assert [o for o, _ in results] == ["applied", "applied"], results
    assert results[0][1] != results[1][1], results
