"""The Fluidity mechanism against kmock's Kubernetes emulator, through the real client.

The emulator serves HTTP in the test's event loop, and Fluidity's ``apply`` and
``get_status`` are coroutines of lightkube's async client: the tests await them directly.
The emulator is kmock's, extended (``Emulator``) with server-side apply, a stand-in for
the Deployment controller's readiness, and watches that expire (410 Gone).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import kubernetes_validate
import pytest

from mlsysops.plugin_api import MechanismError, descriptions, get_logger

ROOT = Path(__file__).resolve().parent.parent
NS = "apps"
APP = "demo-app"


def _load_plugin(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_plugin_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.logger = get_logger(path.stem)  # type: ignore[attr-defined]
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fluidity = _load_plugin(ROOT / "plugins" / "mechanisms" / "fluidity.py")

SERVER = {
    "metadata": {"name": "server-app"},
    "runtime_class_name": "crun",
    "restart_policy": "Always",
    "containers": [
        {
            "image": "registry.example/demo/server:1.0",
            "image_pull_policy": "IfNotPresent",
            "command": ["python", "server.py"],
            "env": [
                {"name": "MODE", "value": "demo"},
                {"name": "NODE_IP", "value_from": {"field_ref": {"field_path": "status.hostIP"}}},
            ],
            "ports": [{"container_port": 8080, "protocol": "TCP"}],
            "platform_requirements": {
                "cpu": {"requests": "250m", "limits": "500m", "architecture": ["amd64"]},
                "memory": {"requests": "64Mi", "limits": "128Mi"},
            },
        }
    ],
}
CLIENT = {
    "metadata": {"name": "client-app"},
    "containers": [{"image": "registry.example/demo/client:1.0"}],
}
APP_SPEC = {"name": APP, "components": [SERVER, CLIENT]}
CLUSTER = {"cluster_id": "test-cluster", "nodes": ["node-a", "node-b"]}



def cmd(component: str, *actions: dict[str, Any], app: str = APP) -> dict[str, Any]:
    """A command with ``actions`` for one component."""
    return {"name": app, "deployment_plan": {component: list(actions)}}


def deploy(host: str) -> dict[str, Any]:
    return {"action": "deploy", "host": host}


DEPLOY_SERVER = {
    "name": APP,
    "plan_id": "plan-1",
    "deployment_plan": {"server-app": [deploy("node-a")], "initial_plan": True},
}


@pytest.fixture(autouse=True)
def described():
    descriptions.set("app", APP, copy.deepcopy(APP_SPEC))
    descriptions.set("cluster", "test-cluster", CLUSTER)
    yield
    descriptions.clear()


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the parts of the API server Fluidity relies on that it lacks.

    - Server-side apply (a PATCH of type ``application/apply-patch+yaml``) creates a
      missing object, and drops the fields its last apply set that this one leaves out
      (one field manager: what it applies is what it owns). kmock only merges dicts.
    - ``mark_ready(name)``: a Deployment reports its replicas ready, as the Deployment
      controller would (a watch event follows); ``auto_ready`` does that for every
      Deployment shortly after each write.
    - ``expire_watches(plural)``: the open watch ends with 410 Gone, as when its
      resourceVersion is too old.
    """

    auto_ready: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.expiring: set[str] = set()
        self.pending: set[asyncio.Task[None]] = set()

    async def _handle(self, request: Any) -> Any:
        content_type = {k.lower(): v for k, v in request.headers.items()}.get("content-type", "")
        writes = request.resource is not None and request.name and not request.subresource and (
            request.method.value == "PATCH")
        response: Any = None
        if writes and "apply-patch" in content_type:
            created = await self._server_side_apply(request)
            if created is not None:
                response = aiohttp.web.json_response(created, status=201)
        if response is None:
            response = await super()._handle(request)
        if writes and self.auto_ready and request.resource.plural == "deployments":
            task = asyncio.ensure_future(self._ready_soon(request.name))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        return response

    async def _server_side_apply(self, request: Any) -> dict[str, Any] | None:
        """Create the object if it is missing (returned); else drop what it no longer sets
        (kmock then merges the rest in)."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                if key in self._objects:
                    self._objects[key].create(request.data)
                else:
                    self._objects[key] = request.data
                raw = self._objects[key].last.raw
                await self._buses[request.resource].put({"type": "ADDED", "object": raw})
                return raw
            old, new = self._objects[key].raw, request.data
            dropped = _dropped({"spec": old.get("spec"), "metadata": {
                part: (old.get("metadata") or {}).get(part) for part in ("labels", "annotations")
            }}, {"spec": new.get("spec"), "metadata": {
                part: (new.get("metadata") or {}).get(part) for part in ("labels", "annotations")
            }})
            if dropped:
                self._objects[key].patch(dropped)
            return None

    async def _ready_soon(self, name: str) -> None:
        await asyncio.sleep(0.05)
        await self.mark_ready(name)

    async def mark_ready(self, name: str, ready: int | None = None) -> None:
        async with self._lock:
            for (resource, _ns, obj_name), obj in list(self._objects.items()):
                if resource.plural == "deployments" and obj_name == name and not obj.deleted:
                    want = (obj.raw.get("spec") or {}).get("replicas", 1)
                    obj.patch({"status": {"readyReplicas": want if ready is None else ready,
                                          "replicas": want}})
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})

    async def expire_watches(self, plural: str) -> None:
        """End the open watch of ``plural`` with 410 Gone (woken by a harmless event)."""
        self.expiring.add(plural)
        for (resource, _, _), _obj in list(self._objects.items()):
            if resource.plural == plural:
                await self._buses[resource].put({"type": "BOOKMARK", "object": {}})
                return

    async def _serve_watch(self, request: Any) -> Any:
        async for item in super()._serve_watch(request):
            if item != b"" and request.resource.plural in self.expiring:
                self.expiring.discard(request.resource.plural)
                yield {"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                    "code": 410, "reason": "Expired", "message": "too old resource version"}}
                return
            if isinstance(item, dict) and item.get("type") == "BOOKMARK":
                continue
            yield item

    async def stop(self) -> None:
        for task in list(self.pending):
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)


def _dropped(old: Any, new: Any) -> Any:
    """``None`` (kmock: remove) for each key of ``old`` that ``new`` no longer has."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in old.items():
        if key not in new:
            out[key] = None
        elif isinstance(value, dict) and isinstance(new[key], dict):
            inner = _dropped(value, new[key])
            if inner:
                out[key] = inner
    return out


def node(name: str, *, ready: str = "True", arch: str = "amd64", cpu: str = "4",
         memory: str = "8Gi", **labels: str) -> dict[str, Any]:
    """A Node as the kubelet reports it (name, labels, Ready condition, allocatable)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              "kubernetes.io/arch": arch, **labels}},
        "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady"
                                   if ready == "True" else "KubeletNotReady"}],
                   "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"}},
    }


def make_emulator(*nodes: dict[str, Any]) -> Emulator:
    emulator = Emulator()
    emulator.resources["apps/v1/deployments"] = {}
    emulator.resources["v1/services"] = {}
    emulator.resources["v1/nodes"] = {}
    for spec in nodes:
        emulator.objects["v1/nodes", None, spec["metadata"]["name"]] = spec
    return emulator


@pytest.fixture
async def emu(monkeypatch):
    emulator = make_emulator(node("node-a"), node("node-b"))
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        try:
            yield emulator
        finally:
            await fluidity._reset_client()
            await emulator.stop()


async def apply(command: Any) -> Any:
    return await fluidity.apply(command)


async def status() -> Any:
    return await fluidity.get_status()


def objects(emu: Any, plural: str) -> dict[str, dict[str, Any]]:
    """Live objects of one resource in the test namespace, by name."""
    return {
        name: obj.raw
        for (res, ns, name), obj in emu.objects.items()
        if res.plural == plural and ns == NS and not obj.deleted
    }


def state(emu: Any) -> dict[str, Any]:
    return {"deployments": objects(emu, "deployments"), "services": objects(emu, "services")}


def writes(emu: Any) -> list[tuple[str, str]]:
    """(method, object name) of every changing request, in order."""
    out = []
    for request in emu:
        method = request.method.value
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            name = request.name or (request.data or {}).get("metadata", {}).get("name")
            out.append((method, name))
    return out


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, "1.30", strict=True)


# --------------------------------------------------------------------------- deploy
async def test_deploy_creates_a_pinned_deployment_and_a_service(emu):
    result = await apply(DEPLOY_SERVER)

    deployments = objects(emu, "deployments")
    assert list(deployments) == ["demo-app-server-app-node-a"]
    dep = deployments["demo-app-server-app-node-a"]
    labels = {
        "app.kubernetes.io/managed-by": "mlsysops",
        "mlsysops.eu/app": APP,
        "mlsysops.eu/component": "server-app",
        "mlsysops.eu/host": "node-a",
    }
    assert dep["metadata"]["labels"] == {**labels, "mlsysops.eu/plan-id": "plan-1"}
    assert dep["metadata"]["namespace"] == NS
    assert dep["spec"]["replicas"] == 1
    selector = dep["spec"]["selector"]["matchLabels"]
    template = dep["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert "mlsysops.eu/plan-id" not in template["metadata"]["labels"]  # no restart per plan
    pod = template["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    assert pod["runtimeClassName"] == "crun"
    assert pod["restartPolicy"] == "Always"
    assert pod["containers"] == [
        {
            "name": "server-app",
            "image": "registry.example/demo/server:1.0",
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "server.py"],
            "env": [
                {"name": "MODE", "value": "demo"},
                {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            ],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "resources": {
                "requests": {"cpu": "250m", "memory": "64Mi"},
                "limits": {"cpu": "500m", "memory": "128Mi"},
            },
        }
    ]

    services = objects(emu, "services")
    assert list(services) == ["demo-app-server-app"]
    svc = services["demo-app-server-app"]
    assert svc["spec"]["selector"] == {
        "mlsysops.eu/app": APP,
        "mlsysops.eu/component": "server-app",
    }
    assert svc["spec"]["ports"] == [
        {"name": "p8080-tcp", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
    ]
    assert svc["metadata"]["labels"]["mlsysops.eu/plan-id"] == "plan-1"
    assert result == {
        "app": APP,
        "changed": True,
        "steps": [
            "create Deployment demo-app-server-app-node-a",
            "create Service demo-app-server-app",
        ],
    }


async def test_a_component_without_ports_gets_no_service(emu):
    await apply(cmd("client-app", deploy("node-b")))
    assert list(objects(emu, "deployments")) == ["demo-app-client-app-node-b"]
    assert objects(emu, "services") == {}
    dep = objects(emu, "deployments")["demo-app-client-app-node-b"]
    assert "mlsysops.eu/plan-id" not in dep["metadata"]["labels"]  # the command named no plan


def applied(emu: Any) -> list[Any]:
    """The server-side apply requests the API received, in order."""
    return [r for r in emu if r.method.value == "PATCH" and "apply-patch" in
            {k.lower(): v for k, v in r.headers.items()}.get("content-type", "")]


async def test_everything_is_sent_by_server_side_apply_as_mlsysops_fluidity(emu):
    await apply(DEPLOY_SERVER)
    requests = applied(emu)
    assert [r.name for r in requests] == ["demo-app-server-app-node-a", "demo-app-server-app"]
    assert {r.params.get("fieldManager") for r in requests} == {"mlsysops-fluidity"}
    assert {r.params.get("force") for r in requests} == {"true"}
    assert [m for m, _ in writes(emu)] == ["PATCH", "PATCH"]  # no create, no JSON patch


async def test_every_manifest_sent_is_valid_kubernetes(emu):
    emu.auto_ready = True
    await apply(DEPLOY_SERVER)
    await apply(cmd("client-app", deploy("node-b")))
    new_spec = copy.deepcopy(SERVER)
    new_spec["containers"][0]["image"] = "registry.example/demo/server:2.0"
    new_spec["containers"][0]["ports"].append({"container_port": 9090, "protocol": "UDP"})
    await apply(
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [
                    {"action": "change_spec", "new_spec": new_spec, "host": "node-a"},
                    {"action": "scale", "replicas": 2, "host": "node-a"},
                ],
                "client-app": [{"action": "move", "src_host": "node-b", "target_host": "node-a"}],
            },
        }
    )
    bodies = [r.data for r in applied(emu)]
    # two deployments and a service, then the changed deployment, the moved one, and the
    # service with the new port
    assert len(bodies) == 6
    for body in bodies:
        validate(body)
    # objects as they end up (the emulator merged what we applied)
    for obj in [*objects(emu, "deployments").values(), *objects(emu, "services").values()]:
        validate({k: v for k, v in obj.items() if k != "status"})


# --------------------------------------------------------------------------- idempotence
async def test_applying_a_command_twice_changes_nothing_the_second_time(emu):
    emu.auto_ready = True
    command = {
        "name": APP,
        "deployment_plan": {
            "server-app": [{"action": "deploy", "host": "node-a"}],
            "client-app": [
                {"action": "deploy", "host": "node-a"},
                {"action": "move", "src_host": "node-a", "target_host": "node-b"},
                {"action": "scale", "replicas": 3, "host": "node-b"},
            ],
        },
    }
    first = await apply(command)
    after_first = state(emu)
    count = len(writes(emu))
    second = await apply(command)
    assert state(emu) == after_first
    assert len(writes(emu)) == count
    assert first["changed"] and second == {"app": APP, "changed": False, "steps": []}
    assert set(after_first["deployments"]) == {
        "demo-app-server-app-node-a",
        "demo-app-client-app-node-b",
    }
    assert after_first["deployments"]["demo-app-client-app-node-b"]["spec"]["replicas"] == 3


async def test_deploy_over_a_differing_instance_patches_it_back_to_the_description(emu):
    await apply(DEPLOY_SERVER)
    name = "demo-app-server-app-node-a"
    new_spec = copy.deepcopy(SERVER)
    new_spec["containers"][0]["image"] = "registry.example/demo/server:2.0"
    await apply(cmd("server-app", {"action": "change_spec", "new_spec": new_spec}))
    await apply(DEPLOY_SERVER)
    pod = objects(emu, "deployments")[name]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/demo/server:1.0"
    assert [m for m, n in writes(emu) if n == name] == ["PATCH", "PATCH", "PATCH"]


# --------------------------------------------------------------------------- move
MOVE_SERVER = {
    "name": APP,
    "deployment_plan": {
        "server-app": [{"action": "move", "src_host": "node-a", "target_host": "node-b"}],
        "initial_plan": False,
    },
}


async def until(check: Any, what: str, timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds (the test fails naming ``what`` if it never does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_move_keeps_the_old_instance_until_the_new_one_is_ready(emu):
    await apply(DEPLOY_SERVER)
    before = len(writes(emu))
    moving = asyncio.ensure_future(apply(MOVE_SERVER))
    await until(lambda: "demo-app-server-app-node-b" in objects(emu, "deployments"),
                "the new instance")
    await asyncio.sleep(0.2)
    # The new instance runs but is not ready yet: the old one is still there.
    assert not moving.done()
    assert set(objects(emu, "deployments")) == {"demo-app-server-app-node-a",
                                                "demo-app-server-app-node-b"}
    await emu.mark_ready("demo-app-server-app-node-b")
    result = await moving
    assert writes(emu)[before:] == [
        ("PATCH", "demo-app-server-app-node-b"),
        ("DELETE", "demo-app-server-app-node-a"),
    ]  # the Service (selecting the component on any host) is left alone
    assert result["steps"] == ["create Deployment demo-app-server-app-node-b",
                               "delete Deployment demo-app-server-app-node-a"]
    deployments = objects(emu, "deployments")
    assert list(deployments) == ["demo-app-server-app-node-b"]
    pod = deployments["demo-app-server-app-node-b"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "node-b"}
    assert list(objects(emu, "services")) == ["demo-app-server-app"]

    after = len(writes(emu))
    await apply(MOVE_SERVER)  # already moved: nothing to do
    assert len(writes(emu)) == after


async def test_a_move_whose_new_instance_never_gets_ready_is_undone_and_fails(
        emu, monkeypatch):
    monkeypatch.setenv("MLSYSOPS_FLUIDITY_READY_TIMEOUT", "0.5")
    await apply(DEPLOY_SERVER)
    with pytest.raises(MechanismError) as caught:
        await apply(MOVE_SERVER)
    message = str(caught.value)
    assert "never became ready" in message
    assert "demo-app-server-app-node-b had no status yet (0 of 1 replicas ready)" in message
    assert "after 0.5s" in message and "the old instance keeps running" in message
    assert "removed again: demo-app-server-app-node-b" in message
    assert list(objects(emu, "deployments")) == ["demo-app-server-app-node-a"]
    assert [m for m, n in writes(emu) if n == "demo-app-server-app-node-b"] == [
        "PATCH", "DELETE"]
    assert list((await status())["applications"][APP]) == ["server-app"]


async def test_a_move_waits_for_every_replica_of_the_new_instance(emu, monkeypatch):
    monkeypatch.setenv("MLSYSOPS_FLUIDITY_READY_TIMEOUT", "5")
    await apply(DEPLOY_SERVER)
    await apply(cmd("server-app", {"action": "scale", "replicas": 2, "host": "node-a"}))
    moving = asyncio.ensure_future(apply(MOVE_SERVER))
    await until(lambda: "demo-app-server-app-node-b" in objects(emu, "deployments"),
                "the new instance")
    await emu.mark_ready("demo-app-server-app-node-b", ready=1)  # one of two
    await asyncio.sleep(0.2)
    assert not moving.done()
    assert "demo-app-server-app-node-a" in objects(emu, "deployments")
    await emu.mark_ready("demo-app-server-app-node-b")
    await moving
    assert list(objects(emu, "deployments")) == ["demo-app-server-app-node-b"]
    assert objects(emu, "deployments")["demo-app-server-app-node-b"]["spec"]["replicas"] == 2


async def test_a_move_abandoned_while_it_waits_removes_the_new_instance(emu):
    """The executor cancels an apply that overruns its deadline: the old instance is the
    one left running."""
    await apply(DEPLOY_SERVER)
    moving = asyncio.ensure_future(apply(MOVE_SERVER))
    await until(lambda: "demo-app-server-app-node-b" in objects(emu, "deployments"),
                "the new instance")
    moving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await moving
    assert list(objects(emu, "deployments")) == ["demo-app-server-app-node-a"]


async def test_move_carries_the_spec_the_instance_runs(emu):
    emu.auto_ready = True
    await apply(DEPLOY_SERVER)
    new_spec = copy.deepcopy(SERVER)
    new_spec["runtime_class_name"] = "nvidia"
    await apply(
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [
                    {"action": "change_spec", "new_spec": new_spec, "host": "node-a"},
                    {"action": "move", "src_host": "node-a", "target_host": "node-b"},
                ]
            },
        }
    )
    pod = objects(emu, "deployments")["demo-app-server-app-node-b"]["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"


# --------------------------------------------------------------------------- change_spec
async def test_change_spec_patches_the_deployment_in_place(emu):
    await apply(DEPLOY_SERVER)
    name = "demo-app-server-app-node-a"
    new_spec = copy.deepcopy(SERVER)
    new_spec["runtime_class_name"] = "nvidia"
    new_spec["containers"][0]["image"] = "registry.example/demo/server:2.0"
    new_spec["containers"][0]["platform_requirements"] = {
        "cpu": {"requests": "100m", "limits": "350m"},
        "memory": {"requests": "200Mi", "limits": "380Mi"},
    }
    command = {
        "name": APP,
        "plan_id": "plan-2",
        "deployment_plan": {
            "server-app": [{"action": "change_spec", "new_spec": new_spec, "host": "node-a"}],
            "initial_plan": False,
        },
    }
    await apply(command)

    assert [m for m, n in writes(emu) if n == name] == ["PATCH", "PATCH"]  # never deleted
    history = emu.objects["apps/v1/deployments", NS, name].history
    assert len(history) == 2 and None not in list(history)  # one object, two versions
    dep = objects(emu, "deployments")[name]
    assert dep["metadata"]["labels"]["mlsysops.eu/plan-id"] == "plan-2"
    pod = dep["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["containers"][0]["image"] == "registry.example/demo/server:2.0"
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "200Mi"},
        "limits": {"cpu": "350m", "memory": "380Mi"},
    }
    assert dep["spec"]["selector"] == history[0]["spec"]["selector"]

    count = len(writes(emu))
    await apply(command)
    assert len(writes(emu)) == count


async def test_change_spec_of_ports_updates_the_service(emu):
    await apply(DEPLOY_SERVER)
    new_spec = copy.deepcopy(SERVER)
    new_spec["containers"][0]["ports"] = [{"container_port": 9000, "protocol": "TCP"}]
    await apply(cmd("server-app", {"action": "change_spec", "new_spec": new_spec}))
    ports = objects(emu, "services")["demo-app-server-app"]["spec"]["ports"]
    assert [p["port"] for p in ports] == [9000]


# --------------------------------------------------------------------------- remove
async def test_remove_deletes_the_instance_and_the_unused_service(emu):
    await apply(DEPLOY_SERVER)
    remove = cmd("server-app", {"action": "remove", "host": "node-a"})
    await apply(remove)
    assert state(emu) == {"deployments": {}, "services": {}}
    count = len(writes(emu))
    assert (await apply(remove))["changed"] is False  # removing what is gone is fine
    assert len(writes(emu)) == count


async def test_remove_app_deletes_everything_of_the_app_and_nothing_else(emu):
    await apply(
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [
                    {"action": "deploy", "host": "node-a"},
                    {"action": "deploy", "host": "node-b"},
                ],
                "client-app": [{"action": "deploy", "host": "node-b"}],
            },
        }
    )
    descriptions.set("app", "other-app", {"name": "other-app", "components": [CLIENT]})
    await apply(cmd("client-app", deploy("node-a"), app="other-app"))
    assert len(objects(emu, "deployments")) == 4

    descriptions.set("app", APP, None)  # the description is gone: removal still works
    result = await apply({"name": APP, "remove_app": True})
    assert len(result["steps"]) == 4
    assert list(objects(emu, "deployments")) == ["other-app-client-app-node-a"]
    assert objects(emu, "services") == {}
    count = len(writes(emu))
    assert (await apply({"name": APP, "remove_app": True}))["changed"] is False
    assert len(writes(emu)) == count


# --------------------------------------------------------------------------- no-ops
@pytest.mark.parametrize(
    "command",
    [
        {"deployment_plan": {}},
        {"name": APP, "deployment_plan": {"initial_plan": True}},
        {"name": APP, "deployment_plan": {}},
        {"name": APP},
        {},
        {"name": APP, "deployment_plan": {"server-app": [], "initial_plan": False}},
    ],
)
async def test_a_command_without_actions_is_a_successful_noop(emu, command):
    result = await apply(command)
    assert result["changed"] is False and result["steps"] == []
    assert list(emu) == []  # not even a read


# --------------------------------------------------------------------------- refusals
REFUSED = {
    "unknown component": (
        {"name": APP, "deployment_plan": {"ghost": [{"action": "deploy", "host": "node-a"}]}},
        "unknown component(s) 'ghost'",
    ),
    "unknown host": (
        {"name": APP, "deployment_plan": {"server-app": [{"action": "deploy", "host": "node-z"}]}},
        "host 'node-z' is not a node of the cluster",
    ),
    "unknown move target": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [{"action": "move", "src_host": "node-a", "target_host": "node-z"}]
            },
        },
        "host 'node-z'",
    ),
    "unknown app": (
        cmd("server-app", deploy("node-a"), app="nope-app"),
        "unknown application 'nope-app'",
    ),
    "unknown action": (
        cmd("server-app", {"action": "teleport", "host": "node-a"}),
        "unknown action 'teleport'",
    ),
    "action not a dict": (
        {"name": APP, "deployment_plan": {"server-app": ["deploy"]}},
        "deployment_plan['server-app'][0] must be an action dict",
    ),
    "actions not a list": (
        {"name": APP, "deployment_plan": {"server-app": {"action": "deploy", "host": "node-a"}}},
        "deployment_plan['server-app'] must be a list of actions",
    ),
    "missing host": (
        {"name": APP, "deployment_plan": {"server-app": [{"action": "deploy"}]}},
        "deploy needs 'host'",
    ),
    "move in place": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [{"action": "move", "src_host": "node-a", "target_host": "node-a"}]
            },
        },
        "move from 'node-a' to the same host",
    ),
    "bad replicas": (
        {"name": APP, "deployment_plan": {"server-app": [{"action": "scale", "replicas": True}]}},
        "scale needs 'replicas'",
    ),
    "new_spec missing": (
        cmd("server-app", {"action": "change_spec", "host": "node-a"}),
        "change_spec needs 'new_spec'",
    ),
    "new_spec without containers": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [
                    {"action": "deploy", "host": "node-a"},
                    {"action": "change_spec", "new_spec": {"containers": []}, "host": "node-a"},
                ]
            },
        },
        "component 'server-app' has no containers",
    ),
    "env not a list": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [
                    {"action": "deploy", "host": "node-a"},
                    {
                        "action": "change_spec",
                        "new_spec": {"containers": [{"image": "x", "env": {"A": "1"}}]},
                    },
                ]
            },
        },
        "component 'server-app' container 0: env must be a list",
    ),
    "new_spec for another component": (
        {
            "name": APP,
            "deployment_plan": {"server-app": [{"action": "change_spec", "new_spec": CLIENT}]},
        },
        "new_spec is for 'client-app', not 'server-app'",
    ),
    "change_spec where nothing runs": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [{"action": "change_spec", "new_spec": SERVER, "host": "node-b"}]
            },
        },
        "has no instance on host 'node-b'",
    ),
    "no name": (
        {"deployment_plan": {"server-app": [{"action": "deploy", "host": "node-a"}]}},
        "needs the application 'name'",
    ),
    "plan not a dict": ({"name": APP, "deployment_plan": ["x"]}, "deployment_plan must be a dict"),
    "not a dict": ("deploy everything", "a Fluidity command is a dict"),
    "remove_app not true": ({"name": APP, "remove_app": "yes"}, "remove_app must be true"),
    "second component bad": (
        {
            "name": APP,
            "deployment_plan": {
                "server-app": [{"action": "deploy", "host": "node-a"}],
                "client-app": [{"action": "deploy", "host": "node-q"}],
            },
        },
        "deployment_plan['client-app'][0]: host 'node-q'",
    ),
}


@pytest.mark.parametrize(("command", "culprit"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_bad_command_is_refused_and_changes_nothing(emu, command, culprit):
    with pytest.raises(MechanismError) as caught:
        await apply(command)
    assert culprit in str(caught.value)
    assert writes(emu) == []
    assert state(emu) == {"deployments": {}, "services": {}}


async def test_a_name_held_by_a_foreign_object_is_refused(emu):
    emu.objects["apps/v1/deployments", NS, "demo-app-server-app-node-a"] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "demo-app-server-app-node-a", "namespace": NS},
        "spec": {"replicas": 5},
    }
    with pytest.raises(MechanismError) as caught:
        await apply(DEPLOY_SERVER)
    assert ("Deployment demo-app-server-app-node-a already exists and is not managed by "
            "mlsysops (no label app.kubernetes.io/managed-by=mlsysops); it is left alone"
            ) in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert objects(emu, "deployments")["demo-app-server-app-node-a"]["spec"] == {"replicas": 5}
    assert writes(emu) == []
    assert (await status())["applications"] == {}  # not reported as ours either


async def test_an_unlabelled_deployment_of_the_same_name_is_left_alone_and_the_apply_fails(emu):
    """Even one that names our application, component and host in its annotations (as
    an earlier version wrote them): without the ownership label it is not ours."""
    name = "demo-app-server-app-node-a"
    notes = {"mlsysops.eu/app": APP, "mlsysops.eu/component": "server-app",
             "mlsysops.eu/host": "node-a"}
    original = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "annotations": notes},
        "spec": {"replicas": 1, "template": {"spec": {"containers": []}}},
    }
    emu.objects["apps/v1/deployments", NS, name] = copy.deepcopy(original)
    with pytest.raises(MechanismError, match="is not managed by mlsysops") as caught:
        await apply(DEPLOY_SERVER)
    assert "it is left alone" in str(caught.value)
    assert writes(emu) == []
    assert objects(emu, "deployments")[name] == original
    with pytest.raises(MechanismError, match="is not managed by mlsysops"):
        await apply({"name": APP, "deployment_plan": {"server-app": [
            {"action": "move", "src_host": "node-b", "target_host": "node-a"}]}})
    await apply({"name": APP, "remove_app": True})  # removing the app leaves it alone too
    assert objects(emu, "deployments")[name] == original


async def test_a_deployment_of_another_component_under_our_label_is_refused(emu):
    name = "demo-app-server-app-node-a"
    emu.objects["apps/v1/deployments", NS, name] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"app.kubernetes.io/managed-by": "mlsysops"},
                     "annotations": {"mlsysops.eu/app": "shop", "mlsysops.eu/component": "web",
                                     "mlsysops.eu/host": "node-a"}},
        "spec": {"replicas": 1},
    }
    with pytest.raises(MechanismError, match="already exists and does not belong to this "
                                             r"component \(it belongs to shop/web/node-a\)"):
        await apply(DEPLOY_SERVER)
    assert writes(emu) == []


async def test_objects_labelled_by_an_earlier_version_are_recognised_and_relabelled(emu):
    await apply(DEPLOY_SERVER)
    name = "demo-app-server-app-node-a"
    for plural, obj_name in (("deployments", name), ("services", "demo-app-server-app")):
        raw = objects(emu, plural)[obj_name]
        raw["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "mlsysops-fluidity"
    await fluidity._reset_client()  # a new executor: it lists what is there
    assert list((await status())["applications"][APP]) == ["server-app"]
    await apply(DEPLOY_SERVER)
    for plural, obj_name in (("deployments", name), ("services", "demo-app-server-app")):
        labels = objects(emu, plural)[obj_name]["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "mlsysops"
    count = len(writes(emu))
    await apply(DEPLOY_SERVER)
    assert len(writes(emu)) == count


async def test_a_node_gone_from_the_cluster_can_still_be_emptied(emu):
    emu.auto_ready = True
    await apply(cmd("client-app", deploy("node-b")))
    descriptions.set("cluster", "test-cluster", {**CLUSTER, "nodes": ["node-a"]})
    with pytest.raises(MechanismError, match="host 'node-b' is not a node of the cluster"):
        await apply(cmd("server-app", deploy("node-b")))
    evacuate = {"action": "move", "src_host": "node-b", "target_host": "node-a"}
    await apply(cmd("client-app", evacuate))
    assert list(objects(emu, "deployments")) == ["demo-app-client-app-node-a"]


async def test_an_unreachable_api_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MLSYSOPS_FLUIDITY_REQUEST_TIMEOUT", "2")
    try:
        with pytest.raises(MechanismError, match="listing Deployments in namespace"):
            await apply(DEPLOY_SERVER)
    finally:
        await fluidity._reset_client()


# --------------------------------------------------------------------------- eligibility
def described_node(name: str, **facts: Any) -> None:
    descriptions.set("node", name, {"name": name, "cluster_id": "test-cluster", **facts})


def with_placement(component: dict[str, Any], **placement: Any) -> dict[str, Any]:
    out = copy.deepcopy(component)
    out["node_placement"] = placement
    return out


ELIGIBILITY = {
    "no such Node": (
        {"cluster_nodes": ["node-a", "node-b", "node-c"]},
        cmd("client-app", deploy("node-c")),
        "node 'node-c' refused for component 'client-app': no such Node in the cluster",
    ),
    "not Ready": (
        {"node": node("node-b", ready="False")},
        cmd("client-app", deploy("node-b")),
        "node 'node-b' refused for component 'client-app': it is not Ready "
        "(Ready=False: KubeletNotReady)",
    ),
    "no Ready condition": (
        {"node": {**node("node-b"), "status": {"allocatable": {"cpu": "4"}}}},
        cmd("client-app", deploy("node-b")),
        "node 'node-b' refused for component 'client-app': it reports no Ready condition",
    ),
    "another architecture": (
        {"node": node("node-b", arch="arm64")},
        cmd("server-app", deploy("node-b")),
        "node 'node-b' refused for component 'server-app': the component needs cpu "
        "architecture ['amd64'], the node is 'arm64'",
    ),
    "pinned elsewhere": (
        {"component": with_placement(CLIENT, node="node-a")},
        cmd("client-app", deploy("node-b")),
        "node 'node-b' refused for component 'client-app': the component is pinned to node "
        "'node-a' by its description",
    ),
    "another continuum layer": (
        {"component": with_placement(CLIENT, continuum_layer=["edge"]),
         "described": {"node-b": {"continuum_layer": "far_edge"}}},
        cmd("client-app", deploy("node-b")),
        "the component needs continuum_layer ['edge'], the node is 'far_edge'",
    ),
    "a layer nobody described": (
        {"component": with_placement(CLIENT, continuum_layer=["edge"])},
        cmd("client-app", deploy("node-b")),
        "the component needs continuum_layer ['edge'] and the node has no description "
        "saying its layer",
    ),
    "not mobile": (
        {"component": with_placement(CLIENT, mobile=True),
         "described": {"node-b": {"mobile": False}}},
        cmd("client-app", deploy("node-b")),
        "the component needs a mobile node, the node is not described as mobile",
    ),
    "a missing label": (
        {"component": with_placement(CLIENT, labels=["site:lab", "tier:edge"]),
         "described": {"node-b": {"labels": ["tier:edge"]}}},
        cmd("client-app", deploy("node-b")),
        "the node lacks the label(s) site:lab the component needs",
    ),
    "no room for the requests": (
        {"node": node("node-b", cpu="200m")},
        cmd("server-app", deploy("node-b")),
        "node 'node-b' refused for component 'server-app': not enough room (cpu: 0.25 cores "
        "requested, 0.2 cores free of 0.2 cores allocatable)",
    ),
    "a move to a node without room": (
        {"node": node("node-b", memory="32Mi"), "first": DEPLOY_SERVER},
        {"name": APP, "deployment_plan": {"server-app": [
            {"action": "move", "src_host": "node-a", "target_host": "node-b"}]}},
        "node 'node-b' refused for component 'server-app': not enough room (memory: 64Mi "
        "requested, 32Mi free of 32Mi allocatable)",
    ),
}


@pytest.mark.parametrize(("setup", "command", "reason"), ELIGIBILITY.values(),
                         ids=ELIGIBILITY.keys())
async def test_a_placement_on_an_ineligible_node_is_refused_naming_the_node_and_why(
        emu, setup, command, reason):
    if "node" in setup:
        emu.objects["v1/nodes", None, setup["node"]["metadata"]["name"]] = setup["node"]
    if "cluster_nodes" in setup:
        descriptions.set("cluster", "test-cluster", {**CLUSTER, "nodes": setup["cluster_nodes"]})
    if "component" in setup:
        others = [c for c in APP_SPEC["components"]
                  if c["metadata"]["name"] != setup["component"]["metadata"]["name"]]
        descriptions.set("app", APP, {"name": APP, "components": [*others, setup["component"]]})
    for name, facts in setup.get("described", {}).items():
        described_node(name, **facts)
    if "first" in setup:
        await apply(setup["first"])
    before, count = state(emu), len(writes(emu))
    with pytest.raises(MechanismError) as caught:
        await apply(command)
    assert reason in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert len(writes(emu)) == count and state(emu) == before


async def test_a_node_that_matches_every_requirement_is_accepted(emu):
    component = with_placement(CLIENT, continuum_layer=["edge", "far_edge"], mobile=True,
                               labels=["site:lab", "tier:edge"])
    descriptions.set("app", APP, {"name": APP, "components": [SERVER, component]})
    described_node("node-b", continuum_layer="far_edge", mobile=True, labels=["tier:edge"])
    emu.objects["v1/nodes", None, "node-b"] = node("node-b", site="lab")  # a Kubernetes label
    await apply(cmd("client-app", deploy("node-b")))
    assert list(objects(emu, "deployments")) == ["demo-app-client-app-node-b"]


async def test_room_counts_what_other_applications_already_run_on_the_node(emu):
    emu.objects["v1/nodes", None, "node-b"] = node("node-b", cpu="600m")
    descriptions.set("app", "shop", {"name": "shop", "components": [SERVER]})
    descriptions.set("app", "blog", {"name": "blog", "components": [SERVER]})
    await apply(cmd("server-app", deploy("node-b")))  # 250m of 600m
    await apply(cmd("server-app", deploy("node-b"), app="shop"))  # 500m of 600m
    with pytest.raises(MechanismError, match=r"cpu: 0.25 cores requested, 0.1 cores free "
                                             r"of 0.6 cores allocatable"):
        await apply(cmd("server-app", deploy("node-b"), app="blog"))
    await apply({"name": "shop", "remove_app": True})
    await apply(cmd("server-app", deploy("node-b"), app="blog"))  # room again
    assert sorted(objects(emu, "deployments")) == ["blog-server-app-node-b",
                                                   "demo-app-server-app-node-b"]


async def test_a_node_that_stops_being_ready_takes_no_new_instances(emu):
    await apply(cmd("client-app", deploy("node-b")))
    emu.objects["v1/nodes", None, "node-b"] = node("node-b", ready="Unknown")
    emu.objects["v1/nodes", None, "node-a"] = node("node-a")
    await emu.expire_watches("nodes")  # the watch ends; the Nodes are listed again
    for _ in range(500):
        try:
            await apply(cmd("server-app", deploy("node-b")))
        except MechanismError as exc:
            assert "node 'node-b' refused for component 'server-app': it is not Ready" in str(exc)
            break
        await apply(cmd("server-app", {"action": "remove", "host": "node-b"}))
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the Node that is not Ready was never noticed")
    # what already runs there is not touched, and can be moved away
    emu.auto_ready = True
    await apply({"name": APP, "deployment_plan": {"client-app": [
        {"action": "move", "src_host": "node-b", "target_host": "node-a"}]}})
    assert "demo-app-client-app-node-a" in objects(emu, "deployments")


async def test_without_any_configuration_the_error_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("MLSYSOPS_KUBE_API_URL", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(MechanismError, match="no Kubernetes API: not running in a cluster, "
                                             "no usable kubeconfig"):
        await apply(DEPLOY_SERVER)


async def test_the_files_of_kubeconfig_are_merged_as_kubectl_merges_them(emu, monkeypatch,
                                                                         tmp_path):
    """The current context from the first file, its cluster and user from the second."""
    url = str(emu.servers[0].url)
    monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", "")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    first = {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
             "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}}]}
    second = {"apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
              "clusters": [{"name": "lab", "cluster": {"server": url}}],
              "users": [{"name": "me", "user": {"token": "t0ken"}}]}
    paths = [tmp_path / "first", tmp_path / "second"]
    for path, doc in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(doc))
    monkeypatch.setenv("KUBECONFIG", ":".join(map(str, paths)))
    await fluidity._reset_client()
    await apply(DEPLOY_SERVER)
    assert list(objects(emu, "deployments")) == ["demo-app-server-app-node-a"]
    assert {r.headers.get("Authorization") for r in applied(emu)} == {"Bearer t0ken"}


async def test_without_access_to_nodes_placements_fail_saying_so_and_the_rest_works(
        monkeypatch):
    emulator = Emulator()
    emulator.resources["apps/v1/deployments"] = {}
    emulator.resources["v1/services"] = {}  # and no Nodes to be read
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_REQUEST_TIMEOUT", "1")
        try:
            with pytest.raises(MechanismError) as caught:
                await apply(DEPLOY_SERVER)
            message = str(caught.value)
            assert "refused, nothing was changed: the nodes cannot be checked: listing " \
                   "Nodes failed: HTTP 404" in message
            assert message.count("nothing was changed") == 1
            assert (await status())["applications"] == {}
            assert (await apply({"name": APP, "remove_app": True}))["changed"] is False
        finally:
            await fluidity._reset_client()
            await emulator.stop()


# --------------------------------------------------------------------------- status
async def test_status_options_and_conflict_key(emu):
    await apply(DEPLOY_SERVER)
    await apply(cmd("client-app", deploy("node-b")))
    assert await status() == {
        "namespace": NS,
        "applications": {
            APP: {
                "server-app": [
                    {
                        "host": "node-a",
                        "deployment": "demo-app-server-app-node-a",
                        "replicas": 1,
                        "ready_replicas": None,  # the emulator runs no controller
                        "ready": None,
                    }
                ],
                "client-app": [
                    {
                        "host": "node-b",
                        "deployment": "demo-app-client-app-node-b",
                        "replicas": 1,
                        "ready_replicas": None,
                        "ready": None,
                    }
                ],
            }
        },
    }
    await emu.mark_ready("demo-app-server-app-node-a")  # the watch brings the change
    for _ in range(500):
        (server,) = (await status())["applications"][APP]["server-app"]
        if server["ready"]:
            break
        await asyncio.sleep(0.01)
    assert server["ready"] is True and server["ready_replicas"] == 1

    options = fluidity.get_options()
    assert options["actions"] == ["deploy", "remove", "move", "change_spec", "scale"]
    assert options["application_commands"] == ["remove_app"]
    assert options["nodes"] == ["node-a", "node-b"]

    # per component: plans for different components of one application do not conflict
    assert fluidity.conflict_key(DEPLOY_SERVER) == [f"{APP}/server-app"]
    both = {"name": APP, "deployment_plan": {"server-app": [], "client-app": [],
                                             "initial_plan": True}}
    assert fluidity.conflict_key(both) == [f"{APP}/server-app", f"{APP}/client-app"]
    assert fluidity.conflict_key({"name": APP, "remove_app": True}) == [APP]
    assert fluidity.conflict_key({"name": APP, "deployment_plan": {"initial_plan": True}}) == []
    assert fluidity.conflict_key({"deployment_plan": {}}) == ""


# --------------------------------------------------------------------------- names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_names_are_readable_when_possible_and_always_valid_and_distinct():
    assert fluidity.dns_name("demo-app", "server-app", "node-a") == "demo-app-server-app-node-a"
    long = fluidity.dns_name("a" * 80, "server-app", "node-a")
    other = fluidity.dns_name("a" * 80, "server-app", "node-b")
    odd = fluidity.dns_name("Demo_App", "Server.App", "node-a")
    for name in (long, other, odd):
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert long != other
    assert odd != fluidity.dns_name("demo-app", "server-app", "node-a")
    assert long == fluidity.dns_name("a" * 80, "server-app", "node-a")  # deterministic
    service = fluidity.dns_name("1st-app", "web", letter_first=True)
    assert service[0].isalpha() and DNS_LABEL.match(service)
    assert fluidity.label_value("x" * 70) != fluidity.label_value("x" * 71)
    assert len(fluidity.label_value("x" * 70)) <= 63


async def test_long_application_names_work_end_to_end(emu):
    app = "an-application-with-a-rather-long-name-that-goes-on-and-on-and-on"
    descriptions.set("app", app, {"name": app, "components": [SERVER]})
    await apply(cmd("server-app", deploy("node-a"), app=app))
    (name, dep), = objects(emu, "deployments").items()
    assert len(name) <= 63 and DNS_LABEL.match(name)
    assert dep["metadata"]["annotations"]["mlsysops.eu/app"] == app
    assert len(dep["metadata"]["labels"]["mlsysops.eu/app"]) <= 63
    validate(dep)
    assert list((await status())["applications"]) == [app]
    await apply({"name": app, "remove_app": True})
    assert state(emu) == {"deployments": {}, "services": {}}
