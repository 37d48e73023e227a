"""The whole loop against a Kubernetes API: descriptions in, Deployments and Services out.

The five services run in the test's event loop (``loop_``) on a real nats-server; the
shipped Fluidity mechanism talks through lightkube's async client to kmock's
``KubernetesEmulator`` served over HTTP (extended as in ``test_fluidity``: server-side
apply, Nodes, and Deployments that report ready shortly after each write, as the
Deployment controller would). The shipped example policies are copied into the
test's plugin directories, with their timing values (analysis interval, moving interval,
change interval, grace period) shortened in the copies, so that minutes become seconds.

- the project's examples (two nodes): static placement and relocation end with the
  expected Deployments and Service; the free component moves back and forth, never
  running nowhere (each move waits for the new instance to be ready); the pinned one is
  never touched again;
- spec change patches the running Deployment in place (runtime class, image, resources);
- deleting a description makes the cleanup policy plan the removal explicitly
  (``mlsysops.plan._global.appCleanup``) after its grace period, with the shipped timings,
  and only that application's objects go;
- the upstream examples (``../shared``, when present): the valid ones are accepted, the
  others refused with their reasons, and the application runs once repaired; relocation
  to a node of another cpu architecture is refused, and the component keeps running;
- a plan redelivered at each hop, and the same command in a new plan, change nothing; bad
  commands fail with Fluidity's message, in the result and in an error event.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml

from mlsysops import wire
from tests import loopkit as kit
from tests.requirements import need_upstream
from tests.test_fluidity import make_emulator, node

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "plugins" / "policies"
FLUIDITY = ROOT / "plugins" / "mechanisms" / "fluidity.py"
EXAMPLES = ROOT / "examples"
NS = "apps"

pytestmark = pytest.mark.timeout(60)

# Timing values of the shipped policies and what the copies use instead.
FAST = {
    "relocateComponents": {'"analyze_interval": "10s"': '"analyze_interval": "200ms"',
                           '"moving_interval": "30s"': '"moving_interval": "1.5s"'},
    "changeCompSpec": {'"analyze_interval": "30s"': '"analyze_interval": "200ms"',
                       '"change_interval": "30s"': '"change_interval": "1s"'},
    "appCleanup": {},  # its shipped timings: how prompt a removal is, as users get it
    "staticPlacement": {},
}


def install(plugin_dirs: tuple[Path, Path], *policies: str) -> None:
    """Copy Fluidity and the named shipped policies (timings shortened) into the test dirs."""
    policy_dir, mechanism_dir = plugin_dirs
    shutil.copy(FLUIDITY, mechanism_dir / FLUIDITY.name)
    for name in policies:
        text = (POLICIES / f"policy-{name}.py").read_text()
        for old, new in FAST[name].items():
            assert text.count(old) == 1, f"policy-{name}.py no longer contains {old}"
            text = text.replace(old, new)
        (policy_dir / f"policy-{name}.py").write_text(text)


def example(file: str) -> bytes:
    return (EXAMPLES / file).read_bytes()


# --------------------------------------------------------------------------- emulator
@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """kmock's Kubernetes emulator over HTTP; Fluidity (in the executor) is pointed at it.

    Its Nodes are those of the examples, with the architecture their descriptions give.
    """
    emulator = make_emulator(node("node-a"), node("node-b", arch="arm64"),
                             node("node-1"), node("node-2", arch="arm64"))
    emulator.auto_ready = True
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        try:
            yield emulator
        finally:
            await emulator.stop()


def objects(emu: Any, plural: str) -> dict[str, dict[str, Any]]:
    return {name: obj.raw for (res, ns, name), obj in list(emu.objects.items())
            if res.plural == plural and ns == NS and not obj.deleted}


def deployments(emu: Any) -> dict[str, dict[str, Any]]:
    return objects(emu, "deployments")


def desired(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Objects without their status (what Fluidity sent, not what the cluster reports)."""
    return {name: {k: v for k, v in obj.items() if k != "status"} for name, obj in objs.items()}


def services(emu: Any) -> dict[str, dict[str, Any]]:
    return objects(emu, "services")


def placement(emu: Any) -> dict[str, list[str]]:
    """component -> sorted hosts of its live Deployments."""
    out: dict[str, list[str]] = {}
    for dep in deployments(emu).values():
        notes = dep["metadata"]["annotations"]
        out.setdefault(notes["mlsysops.eu/component"], []).append(notes["mlsysops.eu/host"])
    return {comp: sorted(hosts) for comp, hosts in sorted(out.items())}


def of_app(emu: Any, app: str) -> list[str]:
    """Names of the live Deployments and Services Fluidity made for ``app``."""
    return sorted(name for name, obj in [*deployments(emu).items(), *services(emu).items()]
                  if obj["metadata"]["annotations"]["mlsysops.eu/app"] == app)


def writes(emu: Any) -> list[tuple[str, str]]:
    """(method, object name) of every changing request the API received, in order."""
    out = []
    for request in list(emu):
        method = request.method.value
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            name = request.name or (request.data or {}).get("metadata", {}).get("name")
            out.append((method, name))
    return out


def validate_all(emu: Any) -> None:
    for obj in [*deployments(emu).values(), *services(emu).values()]:
        kubernetes_validate.validate(obj, "1.30", strict=True)


# --------------------------------------------------------------------------- loop helpers
async def publish_ok(url: str, kind: str, name: str, payload: bytes) -> dict[str, Any]:
    reply = await kit.publish_desc(url, kind, name, payload)
    assert reply["accepted"], reply
    return reply


async def publish_examples(url: str) -> None:
    await publish_ok(url, "cluster", "demo-cluster", example("cluster.yaml"))
    await publish_ok(url, "node", "node-a", example("node-a.yaml"))
    await publish_ok(url, "node", "node-b", example("node-b.yaml"))
    await publish_ok(url, "app", "demo-app", example("app.yaml"))


def of(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [e for e in list(events) if e["subject"].startswith(prefix)]


def results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of(events, "mlsysops.result.fluidity")


def settled(hosts: list[tuple[str, ...]]) -> list[str]:
    """The hosts a component settled on (one instance), in order."""
    return [h[0] for h in hosts if len(h) == 1]


def track(emu: Any, component: str, into: list[tuple[str, ...]]) -> asyncio.Task[None]:
    """Record every distinct set of hosts ``component`` runs on, as it changes."""

    async def watch() -> None:
        while True:
            hosts = tuple(placement(emu).get(component, []))
            if not into or into[-1] != hosts:
                into.append(hosts)
            await asyncio.sleep(0.02)

    return asyncio.ensure_future(watch())


# The project's example application (examples/app.yaml): "web" is pinned to node-a and has
# a port (so it gets a Service); "load" names no node (the relocation policy places it).
WEB, LOAD = "demo-app-web-node-a", "demo-app-load"


# --------------------------------------------------------------------------- deploy + move
@pytest.mark.slow
async def test_examples_are_deployed_then_relocated_back_and_forth(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs, "staticPlacement", "relocateComponents")
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    hosts: list[tuple[str, ...]] = []
    watcher = track(emu, "load", hosts)
    try:
        await publish_examples(cfg.nats_url)

        # Static placement runs web on its node, with one Service for its port. (If its
        # first plan met relocation's first plan executing, the scheduler discarded it and
        # the policy plans again at its next analysis, 10 s later.)
        await kit.wait_for(lambda: placement(emu).get("web") == ["node-a"], timeout=25,
                           what="web on node-a")
        await kit.wait_for(lambda: list(services(emu)) == ["demo-app-web"], what="Service")
        # Relocation moves load between the two nodes, back and forth.
        await kit.wait_for(lambda: len(settled(hosts)) >= 4, timeout=25,
                           what="load on one node, the other, and back twice")
    finally:
        watcher.cancel()
        await nc.close()

    # Each move starts the new instance before it stops the old one: once load runs, it
    # runs on one node or (briefly) on both, never on none.
    assert hosts[0] == () and () not in hosts[1:], hosts
    moves = settled(hosts)
    assert all(a != b for a, b in itertools.pairwise(moves)), hosts
    assert set(moves) == {"node-a", "node-b"}
    loads = [name for name in deployments(emu) if name.startswith(LOAD)]
    assert WEB in deployments(emu) and len(loads) in (1, 2), deployments(emu)  # 2: mid-move
    relocations = [e["commands"]["fluidity"]["deployment_plan"]
                   for e in of(events, "mlsysops.plan.demo-app.relocateComponents")]
    assert relocations[0] == {"load": [{"action": "deploy", "host": "node-a"}],
                              "initial_plan": True}
    assert relocations[1]["load"][0]["action"] == "move"

    web = deployments(emu)[WEB]
    pod = web["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    (container,) = pod["containers"]
    assert container["image"] == "docker.io/library/python:3.12-slim"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"cpu": "500m", "memory": "128Mi"}}
    service = services(emu)["demo-app-web"]
    assert service["spec"]["selector"] == {"mlsysops.eu/app": "demo-app",
                                           "mlsysops.eu/component": "web"}
    assert [p["port"] for p in service["spec"]["ports"]] == [8080]
    validate_all(emu)

    # The pinned component was created once and never touched again by the moves.
    assert [m for m, n in writes(emu) if n == WEB] == ["PATCH"]
    assert [m for m, n in writes(emu) if n == "demo-app-web"] == ["PATCH"]
    # Every Kubernetes object names the plan that made it.
    plans = {e["plan_id"]: e for e in of(events, "mlsysops.plan.demo-app.")}
    assert web["metadata"]["labels"]["mlsysops.eu/plan-id"] in plans
    assert plans[web["metadata"]["labels"]["mlsysops.eu/plan-id"]]["policy"] == "staticPlacement"
    for name in loads:
        plan_id = deployments(emu)[name]["metadata"]["labels"]["mlsysops.eu/plan-id"]
        assert plans[plan_id]["policy"] == "relocateComponents"
    # Everything the loop executed succeeded.
    assert results(events) and all(r["outcome"] == "applied" for r in results(events)), \
        [r for r in results(events) if r["outcome"] != "applied"]


# --------------------------------------------------------------------------- spec change
@pytest.mark.slow
async def test_spec_change_patches_the_running_component_in_place(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs, "staticPlacement", "changeCompSpec")
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    try:
        await publish_examples(cfg.nats_url)
        await kit.wait_for(lambda: placement(emu).get("web") == ["node-a"], timeout=25,
                           what="web on node-a")

        def pod() -> dict[str, Any]:
            return deployments(emu)[WEB]["spec"]["template"]["spec"]

        # The rotation: runtime class, then image, then resources, each change kept.
        await kit.wait_for(lambda: pod().get("runtimeClassName") == "crun", what="runtime class")
        await kit.wait_for(
            lambda: pod()["containers"][0]["image"] == "docker.io/library/python:latest",
            what="image change")
        await kit.wait_for(
            lambda: pod()["containers"][0]["resources"]["limits"]["cpu"] == "300m",
            what="resources change")
    finally:
        await nc.close()

    container = pod()["containers"][0]
    assert pod()["runtimeClassName"] == "crun"  # the earlier change is kept
    assert container["image"] == "docker.io/library/python:latest"
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"cpu": "300m", "memory": "128Mi"}}
    assert container["ports"][0]["containerPort"] == 8080  # the rest is the description's
    assert pod()["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    # In place: one Deployment, applied again and again, never deleted (a rolling update).
    assert set(deployments(emu)) == {WEB}
    web_writes = [m for m, n in writes(emu) if n == WEB]
    assert set(web_writes) == {"PATCH"}, web_writes
    assert len(web_writes) >= 3  # (a change planned before web ran fails; the next carries it)
    validate_all(emu)
    labels = deployments(emu)[WEB]["metadata"]["labels"]
    changes = {e["plan_id"] for e in of(events, "mlsysops.plan.demo-app.changeCompSpec")}
    assert labels["mlsysops.eu/plan-id"] in changes  # the last patch names its plan


# --------------------------------------------------------------------------- cleanup
CLEANUP_GRACE = 5.0  # the cleanup policy's shipped grace_period


def other_app(name: str = "shop", node: str = "node-a") -> bytes:
    """The example application under another name, its web component pinned to ``node``."""
    doc = yaml.safe_load(example("app.yaml"))
    doc["MLSysOpsApp"]["name"] = name
    doc["MLSysOpsApp"]["components"][0]["node_placement"]["node"] = node
    return yaml.safe_dump(doc).encode()


async def delete_and_wait_for_cleanup(emu: Any, url: str, events: list[dict[str, Any]],
                                      timeout: float) -> float:
    reply = await kit.publish_desc(url, "app", "demo-app", b"")
    deleted_at = time.time()
    assert reply["accepted"] and reply["deleted"], reply
    await kit.wait_for(lambda: not of_app(emu, "demo-app"), timeout=timeout,
                       what="demo-app's objects removed")
    print(f"\ndemo-app's objects removed {time.time() - deleted_at:.1f} s after its "
          "description was deleted")
    await kit.wait_for(lambda: any(r["policy"] == "appCleanup" for r in results(events)),
                       what="the cleanup result")
    return deleted_at


def check_cleanup(emu: Any, events: list[dict[str, Any]], deleted_at: float) -> None:
    (plan,) = of(events, "mlsysops.plan._global.appCleanup")  # an explicit, visible plan
    assert plan["commands"] == {"fluidity": {"name": "demo-app", "remove_app": True}}
    assert plan["created_at"] - deleted_at >= CLEANUP_GRACE  # not before the grace period
    (result,) = [r for r in results(events) if r["policy"] == "appCleanup"]
    assert result["plan_id"] == plan["plan_id"] and result["outcome"] == "applied", result
    assert of_app(emu, "demo-app") == []
    removed = [w for w in writes(emu) if w[0] == "DELETE"]
    assert sorted(removed) == [("DELETE", "demo-app-web"), ("DELETE", WEB)]


@pytest.mark.slow
async def test_deleting_a_description_removes_that_app_through_the_cleanup_policy(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs, "staticPlacement", "appCleanup")
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    try:
        await publish_examples(cfg.nats_url)
        await publish_ok(cfg.nats_url, "app", "shop", other_app())
        both = {"demo-app-web-node-a", "shop-web-node-a"}
        await kit.wait_for(lambda: set(deployments(emu)) == both, what="both apps deployed")
        await asyncio.sleep(1)  # the cleanup policy sees Fluidity report both running
        assert not of(events, "mlsysops.plan._global.appCleanup")  # described: left alone

        deleted_at = await delete_and_wait_for_cleanup(emu, cfg.nats_url, events, 20)
    finally:
        await nc.close()
    check_cleanup(emu, events, deleted_at)
    assert set(deployments(emu)) == {"shop-web-node-a"}  # the other app is untouched
    assert set(services(emu)) == {"shop-web"}


@pytest.mark.slow
async def test_applications_deleted_together_are_all_removed_one_per_second(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs, "staticPlacement", "appCleanup")
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    shops = [f"shop-{i}" for i in range(4)]
    try:
        await publish_examples(cfg.nats_url)
        for name in shops:
            await publish_ok(cfg.nats_url, "app", name, other_app(name))
        everything = {WEB} | {f"{name}-web-node-a" for name in shops}
        await kit.wait_for(lambda: set(deployments(emu)) == everything, what="all deployed")
        for name in shops:
            await kit.publish_desc(cfg.nats_url, "app", name, b"")
        deleted_at = time.time()
        await kit.wait_for(lambda: set(deployments(emu)) == {WEB}, timeout=20,
                           what="the deleted applications' objects removed")
        took = time.time() - deleted_at
    finally:
        await nc.close()
    plans = of(events, "mlsysops.plan._global.appCleanup")
    assert sorted(p["commands"]["fluidity"]["name"] for p in plans) == shops  # each once
    assert set(services(emu)) == {"demo-app-web"}
    print(f"\n{len(shops)} applications deleted together: all removed {took:.1f} s later")


async def test_deleting_the_last_description_removes_the_app_through_the_cleanup_policy(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs, "staticPlacement", "appCleanup")
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    try:
        await publish_examples(cfg.nats_url)
        await kit.wait_for(lambda: set(deployments(emu)) == {WEB}, what="web deployed")
        deleted_at = await delete_and_wait_for_cleanup(emu, cfg.nats_url, events, 8)
    finally:
        await nc.close()
    check_cleanup(emu, events, deleted_at)
    assert deployments(emu) == {} and services(emu) == {}


# --------------------------------------------------------------------------- upstream
UPSTREAM_KINDS = {"MLSysOpsApp": ("app", "name"), "MLSysOpsCluster": ("cluster", "cluster_id"),
                  "MLSysOpsNode": ("node", "name"), "MLSysOpsContinuum": ("continuum",
                                                                          "continuum_id")}


def repaired(app_yaml: bytes) -> bytes:
    """The upstream example application with the three values its own schema refuses
    written as the schema wants them (the rest, unknown fields included, as it is)."""
    text = app_yaml.decode()
    assert text.count("restart_policy: on_failure") == 2 and text.count('memory: "2"') == 1
    text = text.replace("restart_policy: on_failure", "restart_policy: OnFailure")
    return text.replace('memory: "2"', "memory: 2").encode()


@pytest.mark.slow
async def test_upstream_examples_are_deployed_and_not_relocated_to_another_architecture(
        emu, plugin_dirs, cfg, loop_) -> None:
    examples = need_upstream() / "examples"
    install(plugin_dirs, "staticPlacement", "relocateComponents")
    loop_.start()
    url = cfg.nats_url
    events: list[dict[str, Any]] = []
    nc = await kit.collect(url, events)
    hosts: list[tuple[str, ...]] = []
    watcher = track(emu, "server-app", hosts)
    try:
        # Every upstream example, as it is: the valid ones are accepted, the others are
        # refused with the reasons.
        replies, names = {}, {}
        for path in sorted(examples.glob("*.yaml")):
            doc = yaml.safe_load(path.read_text())
            ((top, body),) = doc.items()
            kind, field = UPSTREAM_KINDS[top]
            names[path.name] = body[field]
            replies[path.name] = await kit.publish_desc(url, kind, body[field], path.read_bytes())
        accepted = sorted(f for f, r in replies.items() if r["accepted"])
        assert accepted == ["cluster.yaml", "node1.yaml", "node2.yaml"], replies
        problems = {e["path"]: e["message"] for e in replies["app.yaml"]["errors"]}
        assert problems == {
            "$.components[0].restart_policy": "must be one of Always, OnFailure, Never; got "
                                              "'on_failure'",
            "$.components[1].restart_policy": "must be one of Always, OnFailure, Never; got "
                                              "'on_failure'",
            "$.components[1].containers[0].platform_requirements.gpu.memory":
                "must be an integer; got the string '2'",
        }
        assert "unknown description kind 'continuum'" in (
            replies["continuum.yaml"]["errors"][0]["message"])

        # The upstream cluster lists four nodes, of which one is described: the cluster
        # the application runs on is the two described nodes.
        cluster = names["cluster.yaml"]
        two = yaml.safe_dump({"MLSysOpsCluster": {"cluster_id": cluster,
                                                  "nodes": ["node-1", "node-2"]}}).encode()
        await publish_ok(url, "cluster", cluster, two)
        app = names["app.yaml"]
        reply = await publish_ok(url, "app", app, repaired((examples / "app.yaml").read_bytes()))
        assert reply["warnings"]  # unknown fields are ignored, and said so

        # Neither component names its node: relocation places the first on the first node
        # and then tries to move it to the second, an arm64 node (its description and its
        # Node say so) while server-app needs amd64: Fluidity refuses each move, saying
        # why, and server-app keeps running where it is. Static placement has nothing to do.
        def refused() -> list[dict[str, Any]]:
            return [r for r in results(events) if r["outcome"] == "failed"]

        await kit.wait_for(lambda: len(refused()) >= 2, timeout=25,
                           what="two relocations refused")
    finally:
        watcher.cancel()
        await nc.close()

    assert settled(hosts) == ["node-1"], hosts  # deployed once, never moved, never gone
    for result in refused():
        assert ("node 'node-2' refused for component 'server-app': the component needs cpu "
                "architecture ['amd64'], the node is 'arm64'") in result["error"], result
        assert "nothing was changed" in result["error"]
    assert not of(events, f"mlsysops.plan.{app}.staticPlacement")  # an empty plan: none sent
    assert set(placement(emu)) == {"server-app"}  # relocation moves only the first component
    deployment = deployments(emu)[f"{app}-server-app-{settled(hosts)[-1]}"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.mlsysops.eu/agent/agents/test_app:0.0.0"
    assert container["command"] == ["python", "TcpServer.py"]
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in (
        container["env"])
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"},
                                      "limits": {"cpu": "500m", "memory": "128Mi"}}
    (service,) = services(emu).values()
    assert service["metadata"]["name"] == f"{app}-server-app"
    assert service["spec"]["ports"] == [
        {"name": "p10000-tcp", "port": 10000, "targetPort": 10000, "protocol": "TCP"}]
    validate_all(emu)
    applied = [r for r in results(events) if r["outcome"] == "applied"]
    assert len(applied) == 1 and len(results(events)) == len(applied) + len(refused())


# --------------------------------------------------------------------------- commands
async def send_plan(js: Any, plan_id: str, command: Any, *, msg_id: bool = True) -> Any:
    """Publish a plan for Fluidity as the planner does (``msg_id``: with its Nats-Msg-Id)."""
    plan = wire.Plan(plan_id=plan_id, app="demo-app", policy="manual", created_at=wire.now(),
                     commands={"fluidity": command})
    headers = {"Nats-Msg-Id": plan_id} if msg_id else None
    return await js.publish("mlsysops.plan.demo-app.manual", wire.encode(plan), headers=headers)


def deploy(**placements: str) -> dict[str, Any]:
    return {"name": "demo-app", "deployment_plan": {
        comp: [{"action": "deploy", "host": host}] for comp, host in placements.items()}}


def of_plan(events: list[dict[str, Any]], prefix: str, plan_id: str) -> list[dict[str, Any]]:
    return [e for e in of(events, prefix) if e.get("plan_id") == plan_id
            or e.get("details", {}).get("plan_id") == plan_id]


async def test_redelivered_and_repeated_commands_change_nothing_and_bad_ones_say_why(
        emu, plugin_dirs, cfg, loop_) -> None:
    install(plugin_dirs)  # Fluidity, and no policy: the test is the planner
    loop_.start()
    url = cfg.nats_url
    events: list[dict[str, Any]] = []
    nc = await kit.collect(url, events)
    js = nc.jetstream()

    async def result_of(plan_id: str, count: int = 1) -> dict[str, Any]:
        found = await kit.wait_for(
            lambda: len(of_plan(events, "mlsysops.result.", plan_id)) >= count and
            of_plan(events, "mlsysops.result.", plan_id), what=f"result of {plan_id}")
        return found[-1]  # type: ignore[no-any-return]

    try:
        await publish_examples(url)
        await asyncio.sleep(1)  # every service has read the descriptions

        command = deploy(web="node-a", load="node-b")
        await send_plan(js, "p-first", command)
        assert (await result_of("p-first"))["outcome"] == "applied"
        before, count = {"d": desired(deployments(emu)), "s": services(emu)}, len(writes(emu))
        assert set(before["d"]) == {WEB, f"{LOAD}-node-b"} and set(before["s"]) == {
            "demo-app-web"}

        # The planner publishes the same plan again (its outbox after a crash): JetStream
        # drops it as a duplicate.
        ack = await send_plan(js, "p-first", command)
        assert ack.duplicate
        # The plans stream delivers it again anyway (no message id): the scheduler repeats
        # its stored decision, and the execution request is a duplicate in turn.
        await send_plan(js, "p-first", command, msg_id=False)
        await kit.wait_for(lambda: len(of_plan(events, "mlsysops.decision.", "p-first")) == 2,
                           what="the decision repeated")
        assert await kit.stored(js, "EXEC", "mlsysops.exec.fluidity") == 1
        # The exec stream delivers the request again (a lost ack): the executor's ledger
        # knows it, reports the recorded result again, and does not apply it.
        request = wire.ExecRequest(exec_id="p-first.fluidity", plan_id="p-first",
                                   mechanism="fluidity", command=command, app="demo-app",
                                   policy="manual", conflict_key="demo-app")
        await js.publish("mlsysops.exec.fluidity", wire.encode(request))
        again = await result_of("p-first", 2)
        assert again["outcome"] == "applied" and again["error"] == ""
        assert await kit.stored(js, "EXEC", "mlsysops.exec.fluidity") == 2  # first + ours

        # The same command in a new plan: applied, and nothing to change.
        await send_plan(js, "p-repeat", command)
        assert (await result_of("p-repeat"))["outcome"] == "applied"
        assert len(writes(emu)) == count
        assert {"d": desired(deployments(emu)), "s": services(emu)} == before

        # Bad commands fail with the mechanism's message, and change nothing either.
        bad = {
            "p-host": (deploy(web="node-z"), "host 'node-z' is not a node of the cluster"),
            "p-component": (deploy(ghost="node-a"), "unknown component(s) 'ghost'"),
            "p-action": ({"name": "demo-app", "deployment_plan": {
                "web": [{"action": "teleport", "host": "node-b"}]}}, "unknown action 'teleport'"),
            "p-app": ({**deploy(web="node-a"), "name": "nope"}, "unknown application 'nope'"),
            "p-shape": ("deploy everything", "a Fluidity command is a dict"),
        }
        for plan_id, (bad_command, message) in bad.items():
            await send_plan(js, plan_id, bad_command)
            result = await result_of(plan_id)
            assert result["outcome"] == "failed" and message in result["error"], result
            (error,) = await kit.wait_for(
                lambda pid=plan_id: of_plan(events, "mlsysops.error.mechanism.fluidity", pid),
                what=f"the error event of {plan_id}")
            assert message in error["message"] and error["app"] == "demo-app"
    finally:
        await nc.close()

    assert len(writes(emu)) == count
    assert {"d": desired(deployments(emu)), "s": services(emu)} == before
    applied = [r for r in results(events) if r["outcome"] == "applied"]
    assert sorted({r["plan_id"] for r in applied}) == ["p-first", "p-repeat"]


# --------------------------------------------------------------------------- seed policies
@pytest.mark.slow
async def test_the_seed_placement_and_relocation_policies_together_deploy_every_component(
        emu, plugin_dirs, cfg, loop_) -> None:
    """The specification's static placement and relocation policies, word for word, side
    by side: their first plans are for different components of one application, so both
    are applied: the pinned component on its node and the free one on the first node."""
    from tests.seedpolicies import seed_policy

    policy_dir, mechanism_dir = plugin_dirs
    shutil.copy(FLUIDITY, mechanism_dir / FLUIDITY.name)
    for name in ("staticPlacement", "relocateComponents"):
        (policy_dir / f"policy-{name}.py").write_text(seed_policy(name))
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events)
    try:
        await publish_examples(cfg.nats_url)
        await kit.wait_for(lambda: placement(emu) == {"load": ["node-a"], "web": ["node-a"]},
                           timeout=25, what="web on its node and load on the first node")
    finally:
        await nc.close()
    firsts = {e["policy"]: e for e in of(events, "mlsysops.decision.fluidity")}
    assert firsts["staticPlacement"]["outcome"] == "scheduled", firsts
    assert firsts["relocateComponents"]["outcome"] == "scheduled", firsts
    assert all(r["outcome"] == "applied" for r in results(events)), results(events)
