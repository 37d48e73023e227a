"""The example policies, driven directly, with the project's example descriptions.

Time is faked by replacing the ``time`` module the policy sees; nothing sleeps. The
last test plays the policies' plans through Fluidity against kmock's Kubernetes emulator.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml

from mlsysops.plugin_api import descriptions, get_logger
from mlsysops.policies import policy_settings
from tests.test_fluidity import make_emulator, node

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "plugins" / "policies"

# Used when examples/ does not have the descriptions (same shape as examples/*.yaml).
FALLBACK_APP = {
    "name": "demo-app",
    "components": [
        {
            "metadata": {"name": "web"},
            "node_placement": {"node": "node-a"},
            "containers": [
                {
                    "image": "docker.io/library/python:3.12-slim",
                    "ports": [{"container_port": 8080, "protocol": "TCP"}],
                }
            ],
        },
        {"metadata": {"name": "load"}, "containers": [{"image": "docker.io/library/busybox:1.36"}]},
    ],
}
FALLBACK_CLUSTER = {"cluster_id": "demo-cluster", "nodes": ["node-a", "node-b"]}


def _example(file: str, kind: str, fallback: dict[str, Any]) -> dict[str, Any]:
    path = ROOT / "examples" / file
    if path.is_file():
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and isinstance(doc.get(kind), dict):
            return doc[kind]
    return fallback


APP_SPEC = _example("app.yaml", "MLSysOpsApp", FALLBACK_APP)
CLUSTER_SPEC = _example("cluster.yaml", "MLSysOpsCluster", FALLBACK_CLUSTER)
APP = APP_SPEC["name"]
NODES = list(CLUSTER_SPEC["nodes"])
COMPONENTS = [c["metadata"]["name"] for c in APP_SPEC["components"]]
PINNED = {
    c["metadata"]["name"]: c["node_placement"]["node"]
    for c in APP_SPEC["components"]
    if (c.get("node_placement") or {}).get("node")
}
FREE = [name for name in COMPONENTS if name not in PINNED]
SYSTEM = {"MLSysOpsCluster": CLUSTER_SPEC, "MLSysOpsNode": {}}
TELEMETRY = {"latest": {"node_load1": [{"value": 0.5, "labels": {}, "ts": 0.0}]},
             "history": [], "collected_at": 0.0}


def test_the_example_descriptions_have_what_the_policies_need():
    assert PINNED and FREE and len(NODES) >= 2
    assert set(PINNED.values()) <= set(NODES)


def load(path: Path) -> Any:
    """Import a plugin file as the loader does, with a ``logger`` provided."""
    spec = importlib.util.spec_from_file_location(f"_plugin_{path.stem.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.logger = get_logger(path.stem)  # type: ignore[attr-defined]
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def policy(name: str, clock: Clock | None = None, monkeypatch: Any = None) -> Any:
    module = load(POLICIES / f"policy-{name}.py")
    if clock is not None and hasattr(module, "time"):
        monkeypatch.setattr(module, "time", SimpleNamespace(time=clock.time))
    return module


def initial_context(module: Any) -> dict[str, Any]:
    context = module.initialize() if hasattr(module, "initialize") else {}
    policy_settings(module.__name__, context)  # the framework accepts it
    return context


def call(module: Any, fn: str, context: dict[str, Any], apps: list[dict[str, Any]] | None = None,
         mechanisms: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    if apps is None:
        apps = [{"name": APP, "spec": copy.deepcopy(APP_SPEC)}]
    value, context = getattr(module, fn)(
        context, apps, copy.deepcopy(SYSTEM), mechanisms or {}, TELEMETRY, None
    )
    assert json.loads(json.dumps(context)) == context  # plain data, storable as is
    assert json.loads(json.dumps(value)) == value
    return value, context


def fluidity_state(placements: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """``mechanisms`` as policies see it, with Fluidity reporting {app: {component: hosts}}."""
    apps = {
        app: {comp: [{"host": h, "replicas": 1} for h in hosts] for comp, hosts in comps.items()}
        for app, comps in placements.items()
    }
    return {"fluidity": {"state": {"namespace": "default", "applications": apps}, "options": {}}}


# --------------------------------------------------------------------------- static placement
def test_static_placement_plans_the_pinned_components_exactly_once():
    module = policy("staticPlacement")
    context = initial_context(module)

    wanted, context = call(module, "analyze", context)
    assert wanted is True
    plan, context = call(module, "plan", context)
    assert plan == {
        "fluidity": {
            "name": APP,
            "deployment_plan": {
                **{comp: [{"action": "deploy", "host": node}] for comp, node in PINNED.items()},
                "initial_plan": True,
            },
        }
    }
    for _ in range(3):
        wanted, context = call(module, "analyze", context)
        assert wanted is False
    assert call(module, "plan", context)[0] == {}  # even if asked again


def test_static_placement_without_pinned_components_plans_nothing():
    module = policy("staticPlacement")
    spec = copy.deepcopy(APP_SPEC)
    for component in spec["components"]:
        component.pop("node_placement", None)
    apps = [{"name": APP, "spec": spec}]
    wanted, context = call(module, "analyze", {}, apps)
    assert wanted is True
    plan, context = call(module, "plan", context, apps)
    assert plan == {}
    assert call(module, "analyze", context, apps)[0] is False


# --------------------------------------------------------------------------- relocation
def test_relocation_deploys_then_alternates_between_two_nodes(clock, monkeypatch):
    module = policy("relocateComponents", clock, monkeypatch)
    context = initial_context(module)
    assert policy_settings("relocate", context).mechanisms == ("fluidity",)

    wanted, context = call(module, "analyze", context)
    assert wanted is True
    plan, context = call(module, "plan", context)
    assert plan == {
        "fluidity": {
            "name": APP,
            "deployment_plan": {
                FREE[0]: [{"action": "deploy", "host": NODES[0]}],
                "initial_plan": True,
            },
        }
    }

    hosts = [NODES[0]]
    for _ in range(4):
        clock.now += 10  # before moving_interval (30s): nothing
        assert call(module, "analyze", context)[0] is False
        clock.now += 20
        wanted, context = call(module, "analyze", context)
        assert wanted is True
        plan, context = call(module, "plan", context)
        (action,) = plan["fluidity"]["deployment_plan"][FREE[0]]
        assert plan["fluidity"]["deployment_plan"]["initial_plan"] is False
        assert action["action"] == "move" and action["src_host"] == hosts[-1]
        hosts.append(action["target_host"])
    assert hosts == [NODES[0], NODES[1]] * 2 + [NODES[0]]


def test_relocation_follows_where_fluidity_reports_the_component(clock, monkeypatch):
    module = policy("relocateComponents", clock, monkeypatch)
    context = initial_context(module)
    _, context = call(module, "analyze", context)
    _, context = call(module, "plan", context)  # deployed on NODES[0], as far as it knows
    clock.now += 60
    _, context = call(module, "analyze", context)
    # ... but Fluidity says it runs on NODES[1] (say, the last move was applied twice)
    reported = fluidity_state({APP: {FREE[0]: [NODES[1]]}})
    plan, context = call(module, "plan", context, mechanisms=reported)
    assert plan["fluidity"]["deployment_plan"][FREE[0]] == [
        {"action": "move", "src_host": NODES[1], "target_host": NODES[0]}
    ]


def test_relocation_interval_is_configurable(clock, monkeypatch):
    module = policy("relocateComponents", clock, monkeypatch)
    context = initial_context(module)
    context["moving_interval"] = "2m"
    _, context = call(module, "analyze", context)
    clock.now += 90
    assert call(module, "analyze", context)[0] is False
    clock.now += 30
    assert call(module, "analyze", context)[0] is True


# --------------------------------------------------------------------------- spec change
def test_spec_change_rotates_runtime_class_image_and_resources(clock, monkeypatch):
    module = policy("changeCompSpec", clock, monkeypatch)
    context = initial_context(module)
    target = COMPONENTS[0]
    original = APP_SPEC["components"][0]
    image = original["containers"][0]["image"]
    latest = image.rsplit(":", 1)[0] + ":latest"

    specs = []
    for _ in range(6):
        wanted, context = call(module, "analyze", context)
        assert wanted is True
        plan, context = call(module, "plan", context)
        command = plan["fluidity"]
        assert command["name"] == APP and command["deployment_plan"]["initial_plan"] is False
        (action,) = command["deployment_plan"][target]
        assert action["action"] == "change_spec"
        assert action["host"] == PINNED.get(target, NODES[0])
        assert action["new_spec"]["metadata"]["name"] == target
        specs.append(action["new_spec"])
        assert call(module, "analyze", context)[0] is False  # not before change_interval
        clock.now += 30

    runtime = [s.get("runtime_class_name") for s in specs]
    images = [s["containers"][0]["image"] for s in specs]
    cpu = [s["containers"][0].get("platform_requirements", {}).get("cpu", {}).get("limits")
           for s in specs]
    assert runtime == ["crun", "crun", "crun", "nvidia", "nvidia", "nvidia"]
    assert images == [image, latest, latest, latest, image, image]
    original_cpu = original["containers"][0].get("platform_requirements", {}).get("cpu", {})
    assert cpu == [original_cpu.get("limits")] * 2 + ["300m"] * 3 + ["400m"]
    # the description itself was not modified along the way
    assert APP_SPEC["components"][0] == original


def test_spec_change_state_survives_a_restart(clock, monkeypatch):
    module = policy("changeCompSpec", clock, monkeypatch)
    context = initial_context(module)
    for _ in range(2):
        _, context = call(module, "analyze", context)
        _, context = call(module, "plan", context)
        clock.now += 30
    stored = json.dumps(context)  # what the framework keeps between calls

    restarted = policy("changeCompSpec", clock, monkeypatch)  # a fresh module: no globals
    _, context = call(restarted, "analyze", json.loads(stored))
    plan, _ = call(restarted, "plan", context)
    (action,) = plan["fluidity"]["deployment_plan"][COMPONENTS[0]]
    resources = action["new_spec"]["containers"][0]["platform_requirements"]
    assert resources["cpu"] == {**resources["cpu"], "requests": "100m", "limits": "300m"}
    assert action["new_spec"]["runtime_class_name"] == "crun"  # earlier changes are kept


# --------------------------------------------------------------------------- cleanup
def test_cleanup_plans_removal_only_for_applications_that_are_gone(clock, monkeypatch):
    module = policy("appCleanup", clock, monkeypatch)
    context = initial_context(module)
    assert policy_settings("cleanup", context).scope == "global"
    everything = [{"name": APP, "spec": copy.deepcopy(APP_SPEC)}]
    mechanisms = fluidity_state({APP: {COMPONENTS[0]: [NODES[0]]}, "old-app": {"x": [NODES[1]]},
                                 "older-app": {"y": [NODES[0]]}})

    # all described: nothing to do
    both = [*everything, {"name": "old-app", "spec": {}}, {"name": "older-app", "spec": {}}]
    assert call(module, "analyze", context, both, mechanisms)[0] is False

    # descriptions deleted: removed after the grace period, one application per plan
    wanted, context = call(module, "analyze", context, everything, mechanisms)
    assert wanted is False
    clock.now += 61
    wanted, context = call(module, "analyze", context, everything, mechanisms)
    assert wanted is True
    plan, context = call(module, "plan", context, everything, mechanisms)
    assert plan == {"fluidity": {"name": "old-app", "remove_app": True}}
    done = fluidity_state({APP: {COMPONENTS[0]: [NODES[0]]}, "older-app": {"y": [NODES[0]]}})
    wanted, context = call(module, "analyze", context, everything, done)
    assert wanted is True
    plan, context = call(module, "plan", context, everything, done)
    assert plan == {"fluidity": {"name": "older-app", "remove_app": True}}

    # described again before the plan: not removed
    again = [*everything, {"name": "older-app", "spec": {}}]
    assert call(module, "plan", context, again, done)[0] == {}


def test_cleanup_without_a_fluidity_report_does_nothing(clock, monkeypatch):
    module = policy("appCleanup", clock, monkeypatch)
    context = initial_context(module)
    for mechanisms in ({}, {"fluidity": {"state": None, "options": None}}):
        clock.now += 3600
        assert call(module, "analyze", context, [], mechanisms)[0] is False


# --------------------------------------------------------------------------- end to end
async def test_the_plans_run_through_fluidity(clock, monkeypatch):
    """Static placement, relocation, spec change and cleanup, applied to the emulator."""
    fluidity = load(ROOT / "plugins" / "mechanisms" / "fluidity.py")
    emulator = make_emulator(*(node(name) for name in NODES))  # Fluidity checks the Nodes
    emulator.auto_ready = True  # as the Deployment controller: a move waits for readiness
    descriptions.set("app", APP, copy.deepcopy(APP_SPEC))
    descriptions.set("cluster", CLUSTER_SPEC["cluster_id"], CLUSTER_SPEC)

    async def run(module: Any, context: dict[str, Any], apps: Any = None) -> dict[str, Any]:
        """One analysis (and plan, and apply) with Fluidity's live status."""
        mechanisms = {"fluidity": {"state": await fluidity.get_status(),
                                   "options": fluidity.get_options()}}
        wanted, context = call(module, "analyze", context, apps, mechanisms)
        if wanted:
            plan, context = call(module, "plan", context, apps, mechanisms)
            if plan:
                await fluidity.apply(plan["fluidity"])
        return context

    async def placement() -> dict[str, Any]:
        status = await fluidity.get_status()
        return {
            app: {comp: sorted(i["host"] for i in inst) for comp, inst in comps.items()}
            for app, comps in status["applications"].items()
        }

    try:
        async with emulator, kmock.Server(emulator) as server:
            monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
            static = policy("staticPlacement")
            relocate = policy("relocateComponents", clock, monkeypatch)
            change = policy("changeCompSpec", clock, monkeypatch)
            cleanup = policy("appCleanup", clock, monkeypatch)
            contexts = {m: initial_context(m) for m in (static, relocate, change, cleanup)}

            contexts[static] = await run(static, contexts[static])
            contexts[relocate] = await run(relocate, contexts[relocate])
            assert await placement() == {
                APP: {**{c: [n] for c, n in PINNED.items()}, FREE[0]: [NODES[0]]}
            }
            clock.now += 30
            contexts[relocate] = await run(relocate, contexts[relocate])
            assert (await placement())[APP][FREE[0]] == [NODES[1]]
            for obj in emulator.objects.values():
                if not obj.deleted and obj["kind"] != "Node":
                    kubernetes_validate.validate(obj.raw, "1.30", strict=True)

            contexts[change] = await run(change, contexts[change])  # runtime class "crun"
            name = next(iter(PINNED))
            deployment = next(
                obj for obj in emulator.objects.values() if not obj.deleted
                and obj["kind"] == "Deployment"
                and obj["metadata"]["annotations"]["mlsysops.eu/component"] == name
            )
            assert deployment["spec"]["template"]["spec"]["runtimeClassName"] == "crun"

            descriptions.set("app", APP, None)  # the user deletes the description
            for _ in range(3):
                contexts[cleanup] = await run(cleanup, contexts[cleanup], apps=[])
                clock.now += 31
            assert await placement() == {}
            assert not [o for o in emulator.objects.values()
                        if not o.deleted and o["kind"] != "Node"]
            await fluidity._reset_client()
    finally:
        await fluidity._reset_client()
        await emulator.stop()
        descriptions.clear()
