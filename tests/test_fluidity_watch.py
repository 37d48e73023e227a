"""Fluidity's watched caches: what the executors' status reports cost the API server.

Every executor asks Fluidity for its status at each status interval. Fluidity answers
from caches it fills once (a LIST per resource) and keeps current with watches, so the
API server sees no LIST per interval, however many applications there are; a watch that
expires (410 Gone) costs one LIST again. And applies to different applications run
concurrently on the plugin's event loop instead of queueing behind one another.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import kmock
import pytest

from mlsysops.plugin_api import descriptions
from tests.test_fluidity import (
    APP,
    APP_SPEC,
    CLIENT,
    CLUSTER,
    DEPLOY_SERVER,
    NS,
    SERVER,
    cmd,
    deploy,
    fluidity,
    make_emulator,
    node,
    objects,
    until,
)

APPS = 1000
FLUIDITY = Path(__file__).resolve().parent.parent / "plugins" / "mechanisms" / "fluidity.py"


@pytest.fixture(autouse=True)
def described():
    descriptions.set("app", APP, copy.deepcopy(APP_SPEC))
    descriptions.set("cluster", "test-cluster", CLUSTER)
    yield
    descriptions.clear()


@pytest.fixture
async def emu(monkeypatch):
    emulator = make_emulator(node("node-a", cpu="2000", memory="4000Gi"),
                             node("node-b", cpu="2000", memory="4000Gi"))
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        try:
            yield emulator
        finally:
            await fluidity._reset_client()
            await emulator.stop()


def lists(emu: Any, plural: str) -> int:
    """How many LIST requests of ``plural`` the API server received."""
    return sum(1 for r in list(emu) if r.action is not None and r.action.value == "LIST"
               and r.resource is not None and r.resource.plural == plural)


def instance(app: str, host: str) -> dict[str, Any]:
    """A Deployment as Fluidity makes it for ``app``'s client-app on ``host``."""
    name = f"{app}-client-app-{host}"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "mlsysops", "mlsysops.eu/app": app,
                       "mlsysops.eu/component": "client-app", "mlsysops.eu/host": host},
            "annotations": {"mlsysops.eu/app": app, "mlsysops.eu/component": "client-app",
                            "mlsysops.eu/host": host},
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "client-app", "image": "registry.example/demo/client:1.0"}]}}},
    }


async def status_until(check: Any, what: str) -> dict[str, Any]:
    """get_status() until ``check(status)`` holds (the watch delivers changes shortly)."""
    for _ in range(500):
        status = await fluidity.get_status()
        if check(status):
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"get_status() never showed {what}")


async def test_status_of_1000_applications_costs_one_list_then_none_per_interval(emu):
    for i in range(APPS):
        app = f"app-{i:04d}"
        emu.objects["apps/v1/deployments", NS, f"{app}-client-app-node-a"] = instance(
            app, "node-a")
    started = time.perf_counter()
    status = await fluidity.get_status()
    first = time.perf_counter() - started
    assert len(status["applications"]) == APPS
    assert status["applications"]["app-0007"] == {"client-app": [{
        "host": "node-a", "deployment": "app-0007-client-app-node-a", "replicas": 1,
        "ready_replicas": None, "ready": None}]}
    assert lists(emu, "deployments") == 1

    # Several status intervals, with the cluster changing in between: each change is seen,
    # and the API server is never asked for the whole list again.
    await emu.mark_ready("app-0042-client-app-node-a")
    await status_until(lambda s: s["applications"]["app-0042"]["client-app"][0]["ready"],
                       "app-0042 ready")
    await fluidity.apply(cmd("client-app", deploy("node-b")))
    await status_until(lambda s: APP in s["applications"], "the new application")
    descriptions.set("app", "app-0500", {"name": "app-0500", "components": [CLIENT]})
    await fluidity.apply({"name": "app-0500", "remove_app": True})
    status = await status_until(lambda s: "app-0500" not in s["applications"],
                                "app-0500 removed")
    assert len(status["applications"]) == APPS  # one added, one removed
    for _ in range(5):
        started = time.perf_counter()
        await fluidity.get_status()
        cached = time.perf_counter() - started
    assert lists(emu, "deployments") == 1
    assert lists(emu, "services") == 1 and lists(emu, "nodes") == 1
    print(f"\nget_status at {APPS} applications: first {first * 1000:.0f} ms (one LIST), "
          f"then {cached * 1000:.1f} ms from the cache; LISTs after 8 calls: "
          f"{lists(emu, 'deployments')}")


async def test_a_watch_that_expires_lists_once_more_and_catches_up(emu):
    emu.auto_ready = True
    await fluidity.apply(DEPLOY_SERVER)
    await fluidity.apply(cmd("client-app", deploy("node-b")))
    assert lists(emu, "deployments") == 1
    # While the watch is away, a Deployment goes without the watch saying so...
    emu.objects["apps/v1/deployments", NS, "demo-app-client-app-node-b"].delete()
    # ...and the API server then ends the watch: its resourceVersion is too old.
    await emu.expire_watches("deployments")
    status = await status_until(lambda s: "client-app" not in s["applications"][APP],
                                "the deletion caught up by listing again")
    assert list(status["applications"][APP]) == ["server-app"]
    assert lists(emu, "deployments") == 2
    # and the new watch carries on
    await fluidity.apply(cmd("client-app", deploy("node-a")))
    await emu.mark_ready("demo-app-server-app-node-a")
    await status_until(lambda s: s["applications"][APP]["server-app"][0]["ready"],
                       "a change after the new list")
    assert lists(emu, "deployments") == 2


async def test_applies_to_different_applications_run_concurrently(emu):
    """Two moves waiting for their new instances at the same time: neither application
    waits for the other's move to finish."""
    descriptions.set("app", "shop", {"name": "shop", "components": [SERVER]})
    for app in (APP, "shop"):
        await fluidity.apply(cmd("server-app", deploy("node-a"), app=app))
    move = {"action": "move", "src_host": "node-a", "target_host": "node-b"}
    moves = [asyncio.ensure_future(fluidity.apply(cmd("server-app", move, app=app)))
             for app in (APP, "shop")]
    new = {"demo-app-server-app-node-b", "shop-server-app-node-b"}
    await until(lambda: new <= set(objects(emu, "deployments")), "both new instances")
    assert not any(m.done() for m in moves)  # both wait for readiness, side by side
    for name in sorted(new):
        await emu.mark_ready(name)
    await asyncio.gather(*moves)
    assert set(objects(emu, "deployments")) == new


async def test_commands_for_one_application_run_one_after_the_other(emu):
    """A second command for an application waits until the first (here a move waiting for
    its new instance) has finished, so it plans on what the first left."""
    await fluidity.apply(DEPLOY_SERVER)
    moving = asyncio.ensure_future(fluidity.apply(cmd("server-app", {
        "action": "move", "src_host": "node-a", "target_host": "node-b"})))
    await until(lambda: "demo-app-server-app-node-b" in objects(emu, "deployments"),
                "the new instance")
    scaling = asyncio.ensure_future(fluidity.apply(cmd("server-app", {
        "action": "scale", "replicas": 3, "host": "node-b"})))
    await asyncio.sleep(0.2)
    assert not scaling.done()
    await emu.mark_ready("demo-app-server-app-node-b")
    await moving
    await scaling
    (dep,) = objects(emu, "deployments").values()
    assert dep["metadata"]["name"] == "demo-app-server-app-node-b"
    assert dep["spec"]["replicas"] == 3


async def test_an_executor_reporting_1000_applications_each_interval_lists_them_once(
        emu, plugin_dirs, cfg, loop_):
    """The executor itself, publishing Fluidity's status every 0.5 s (the tests' status
    interval): over many intervals the API server receives one LIST of Deployments."""
    from tests import loopkit as kit

    for i in range(APPS):
        app = f"app-{i:04d}"
        emu.objects["apps/v1/deployments", NS, f"{app}-client-app-node-a"] = instance(
            app, "node-a")
    shutil.copy(FLUIDITY, plugin_dirs[1] / FLUIDITY.name)
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events, families=("status",))
    loop_.start("executor")
    try:
        def reports() -> list[dict[str, Any]]:
            return [e for e in list(events) if e["subject"] == "mlsysops.status.fluidity"
                    and e.get("state") is not None]

        await kit.wait_for(lambda: len(reports()) >= 6, timeout=30,
                           what="six status reports of Fluidity")
    finally:
        await nc.close()
    for report in reports():  # (how the executor stores the applications is its business)
        assert report["error"] == "" and report["state"]["namespace"] == NS
    assert lists(emu, "deployments") == 1
    print(f"\n{len(reports())} status reports by the executor with {APPS} applications: "
          f"{lists(emu, 'deployments')} LIST of Deployments")
