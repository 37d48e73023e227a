"""The Fluidity mechanism against kmock's Kubernetes emulator, through the real client.

The emulator serves HTTP in the test's event loop while the kubernetes client blocks, so
every call into the plugin goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

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
    "node_placement": {"node": "node-a"},
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


@pytest.fixture
async def emu(monkeypatch):
    emulator = kmock.KubernetesEmulator()
    emulator.resources["apps/v1/deployments"] = {}
    emulator.resources["v1/services"] = {}
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        try:
            yield emulator
        finally:
            fluidity._reset_client()


async def apply(command: Any) -> Any:
    return await asyncio.to_thread(fluidity.apply, command)


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
        "app.kubernetes.io/managed-by": "mlsysops-fluidity",
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


async def test_every_manifest_sent_is_valid_kubernetes(emu):
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
    bodies = [r.data for r in emu if r.method.value == "POST"]
    assert len(bodies) == 4  # two deployments, one service, the moved deployment
    for body in bodies:
        validate(body)
    # patched objects as they end up (the emulator applies the JSON patches we sent)
    for obj in [*objects(emu, "deployments").values(), *objects(emu, "services").values()]:
        validate(obj)
    assert any(r.method.value == "PATCH" for r in emu)


# --------------------------------------------------------------------------- idempotence
async def test_applying_a_command_twice_changes_nothing_the_second_time(emu):
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
    assert [m for m, n in writes(emu) if n == name] == ["POST", "PATCH", "PATCH"]


# --------------------------------------------------------------------------- move
async def test_move_creates_the_new_instance_before_deleting_the_old_one(emu):
    await apply(DEPLOY_SERVER)
    before = len(writes(emu))
    move = {
        "name": APP,
        "deployment_plan": {
            "server-app": [{"action": "move", "src_host": "node-a", "target_host": "node-b"}],
            "initial_plan": False,
        },
    }
    await apply(move)
    assert writes(emu)[before:] == [
        ("POST", "demo-app-server-app-node-b"),
        ("DELETE", "demo-app-server-app-node-a"),
    ]  # the Service (selecting the component on any host) is left alone
    deployments = objects(emu, "deployments")
    assert list(deployments) == ["demo-app-server-app-node-b"]
    pod = deployments["demo-app-server-app-node-b"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "node-b"}
    assert list(objects(emu, "services")) == ["demo-app-server-app"]

    after = len(writes(emu))
    await apply(move)  # already moved: nothing to do
    assert len(writes(emu)) == after


async def test_move_carries_the_spec_the_instance_runs(emu):
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

    assert [m for m, n in writes(emu) if n == name] == ["POST", "PATCH"]  # never deleted
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
    with pytest.raises(MechanismError, match="already exists and does not belong") as caught:
        await apply(DEPLOY_SERVER)
    assert "nothing was changed" in str(caught.value)
    assert objects(emu, "deployments")["demo-app-server-app-node-a"]["spec"] == {"replicas": 5}


async def test_an_unlabelled_object_of_the_same_instance_is_taken_over(emu):
    """A create that meets the same instance (say, made by a replica that crashed before
    labelling) patches it instead of failing."""
    name = "demo-app-server-app-node-a"
    notes = {"mlsysops.eu/app": APP, "mlsysops.eu/component": "server-app",
             "mlsysops.eu/host": "node-a"}
    emu.objects["apps/v1/deployments", NS, name] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "annotations": notes},
        "spec": {"replicas": 1, "template": {"spec": {"containers": []}}},
    }
    await apply(DEPLOY_SERVER)
    assert [m for m, n in writes(emu) if n == name] == ["POST", "PATCH"]
    dep = objects(emu, "deployments")[name]
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mlsysops-fluidity"
    assert dep["spec"]["template"]["spec"]["containers"][0]["name"] == "server-app"
    count = len(writes(emu))
    await apply(DEPLOY_SERVER)  # now it is known: nothing to do
    assert len(writes(emu)) == count


async def test_a_node_gone_from_the_cluster_can_still_be_emptied(emu):
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
        fluidity._reset_client()


# --------------------------------------------------------------------------- status
async def test_status_options_and_conflict_key(emu):
    await apply(DEPLOY_SERVER)
    await apply(cmd("client-app", deploy("node-b")))
    status = await asyncio.to_thread(fluidity.get_status)
    assert status == {
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
    emu.objects["apps/v1/deployments", NS, "demo-app-server-app-node-a"]["status"] = {
        "readyReplicas": 1
    }
    status = await asyncio.to_thread(fluidity.get_status)
    assert status["applications"][APP]["server-app"][0]["ready"] is True

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
    status = await asyncio.to_thread(fluidity.get_status)
    assert list(status["applications"]) == [app]
    await apply({"name": app, "remove_app": True})
    assert state(emu) == {"deployments": {}, "services": {}}
