"""Mechanism status at fleet size: stored per application, sliced for each policy.

At 10,000 applications a mechanism's status is megabytes: as one message it is refused by
NATS (1 MiB by default) and policies go blind. It is stored per application instead, an
application's policy receives its own application's part, a ``_global`` policy every
part, all read-only and shared between calls; a status that cannot be stored is an error
operators see.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from mlsysops import frozen
from tests import loopkit as kit

# A mechanism reporting FLEET applications of two components each (about 2.4 MB at 10k),
# or, with a file "huge" beside it, one application whose own part is over 1 MiB.
BIG = '''
from pathlib import Path

HERE = Path(__file__).parent
FLEET = 10_000

def apply(command):
    pass

def get_status():
    if (HERE / "huge").exists():
        return {"applications": {"app0": {"blob": "x" * 1_200_000}}}
    gone = (HERE / "gone").read_text().split() if (HERE / "gone").exists() else []
    apps = {}
    for i in range(FLEET):
        name = f"app{i}"
        if name in gone:
            continue
        apps[name] = {f"c{c}": [{"host": f"node-{i % 50}", "deployment": f"{name}-c{c}",
                                 "replicas": 1, "ready_replicas": 1, "ready": True}]
                      for c in range(2)}
    return {"namespace": "default", "applications": apps}
'''

# Records, per application, which applications' parts it received, and that it may not
# change them.
LOOKER = '''
import copy

def initialize():
    return {"configuration": {"analyze_interval": "500ms"}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    state = (mechanisms.get("big") or {}).get("state") or {}
    apps = state.get("applications") or {}
    context["seen"] = sorted(apps)[:3]
    context["count"] = len(apps)
    context["namespace"] = state.get("namespace")
    try:
        apps.clear()
        context["mutable"] = True
    except TypeError as exc:
        context["mutable"] = str(exc)
    mine = copy.deepcopy(dict(apps))
    mine["extra"] = 1  # a copy is the policy's own
    return False, context

def plan(context, *args):
    return {}, context
'''

GLOBAL_LOOKER = LOOKER.replace(
    '{"configuration": {"analyze_interval": "500ms"}}',
    '{"configuration": {"analyze_interval": "500ms"}, "scope": "global"}')


async def _context(url: str, key: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        try:
            kv = await nc.jetstream().key_value("mlsysops-context")
            entry = await kv.get(key)
        except Exception:
            return {}
        return json.loads(entry.value or b"{}")["context"]  # type: ignore[no-any-return]
    finally:
        await nc.close()


def _setup(plugin_dirs: tuple[Path, Path], *, scope: str = "app") -> None:
    policies, mechanisms = plugin_dirs
    (mechanisms / "big.py").write_text(BIG)
    (policies / "policy-looker.py").write_text(GLOBAL_LOOKER if scope == "global" else LOOKER)


@pytest.mark.slow
async def test_an_application_policy_sees_its_part_of_a_fleet_sized_status(
        loop_, cfg, plugin_dirs) -> None:
    _setup(plugin_dirs)
    loop_.start("monitor", "analyzer", "executor")
    assert (await kit.publish_desc(cfg.nats_url, "app", "app7", kit.app_doc("app7")))["accepted"]

    async def seen() -> dict[str, Any]:
        ctx = await _context(cfg.nats_url, "looker.app7")
        return ctx if ctx.get("count") else {}

    ctx = await kit.wait_for(seen, timeout=60, what="the policy seeing big's status")
    assert ctx["seen"] == ["app7"] and ctx["count"] == 1
    assert ctx["namespace"] == "default"  # the cluster-wide part comes too
    assert "read-only" in ctx["mutable"]


@pytest.mark.slow
async def test_a_global_policy_sees_every_part_and_a_departed_one_goes(
        loop_, cfg, plugin_dirs) -> None:
    _setup(plugin_dirs, scope="global")
    loop_.start("analyzer", "executor")

    async def count(n: int) -> dict[str, Any]:
        ctx = await _context(cfg.nats_url, "looker._global")
        return ctx if ctx.get("count") == n else {}

    await kit.wait_for(lambda: count(10_000), timeout=90, what="all 10,000 parts")
    (plugin_dirs[1] / "gone").write_text("app1 app2")
    await kit.wait_for(lambda: count(9_998), timeout=30, what="two departed parts removed")


@pytest.mark.slow
async def test_a_status_that_cannot_be_stored_is_an_error_operators_see(
        loop_, cfg, plugin_dirs) -> None:
    _setup(plugin_dirs)
    (plugin_dirs[1] / "huge").write_text("")
    events: list[dict[str, Any]] = []
    watcher = await kit.collect(cfg.nats_url, events, families=("error",))
    try:
        loop_.start("executor")
        await kit.wait_for(lambda: any(e["subject"] == "mlsysops.error.mechanism.big"
                                       for e in events), timeout=30, what="an error event")
    finally:
        await watcher.close()
    event = next(e for e in events if e["subject"] == "mlsysops.error.mechanism.big")
    assert "app0" in event["message"] and "could not be stored" in event["message"]
    from mlsysops import observe
    from mlsysops.bus import Bus

    bus = Bus(cfg, "operator")
    await bus.connect()
    try:
        status = await observe.collect_status(bus)
    finally:
        await bus.close()
    assert "app0" in status["mechanisms"]["big"]["store_error"]


def test_frozen_arguments_refuse_changes_and_copies_are_plain() -> None:
    value = frozen.freeze({"applications": {"a": [{"host": "n1"}]}, "n": 1})
    assert isinstance(value, dict) and isinstance(value["applications"]["a"], list)
    for change in (lambda: value.update(x=1), lambda: value["applications"].pop("a"),
                   lambda: value["applications"]["a"].append({}),
                   lambda: value["applications"]["a"][0].__setitem__("host", "n2")):
        with pytest.raises(TypeError, match="read-only"):
            change()
    mine = copy.deepcopy(value)
    mine["applications"]["a"][0]["host"] = "n2"
    assert type(mine) is dict and type(mine["applications"]["a"]) is list
    assert value["applications"]["a"][0]["host"] == "n1"
    assert json.loads(json.dumps(value)) == {"applications": {"a": [{"host": "n1"}]}, "n": 1}
