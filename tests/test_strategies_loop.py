"""Placement and scaling strategies through the whole loop, against the Kubernetes emulator.

The five services run in the test's event loop on a real nats-server; the shipped
placement and scaling policies (analysis intervals shortened in their copies) plan for
the shipped Fluidity mechanism, which talks to kmock's emulator over HTTP. Energy
profiles are published on ``desc.energy.<node>``, strategies switched per application
with ``trigger.<policy>.<app>``, request rates published as telemetry snapshots.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import msgspec
import nats
import pytest
import yaml

from mlsysops import wire
from tests import loopkit as kit
from tests.test_fluidity import make_emulator, node

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "plugins" / "optional"
FLUIDITY = ROOT / "plugins" / "mechanisms" / "fluidity.py"
NS = "apps"
APP = "shop"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

FAST = {
    "placement": {'"analyze_interval": "10s"': '"analyze_interval": "300ms"'},
    "scaling": {'"analyze_interval": "5s"': '"analyze_interval": "300ms"'},
}


def install(plugin_dirs: tuple[Path, Path], *policies: str) -> None:
    policy_dir, mechanism_dir = plugin_dirs
    shutil.copy(FLUIDITY, mechanism_dir / FLUIDITY.name)
    for name in policies:
        text = (POLICIES / f"policy-{name}.py").read_text()
        for old, new in FAST[name].items():
            assert text.count(old) == 1, f"policy-{name}.py no longer contains {old}"
            text = text.replace(old, new)
        # The copies live outside the repository: point them at the shipped drop-ins.
        text = text.replace('"strategy_dirs": [],',
                            f'"strategy_dirs": [{str(ROOT / "plugins" / "strategies")!r}],')
        (policy_dir / f"policy-{name}.py").write_text(text)


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    # The Nodes of setup_cluster (Fluidity checks a node before placing on it), and
    # Deployments that report ready shortly after each write (a move waits for it).
    emulator = make_emulator(node("n1", cpu="8", memory="16Gi"),
                             node("n2", cpu="8", memory="16Gi"))
    emulator.auto_ready = True
    async with emulator, kmock.Server(emulator) as server:
        monkeypatch.setenv("MLSYSOPS_KUBE_API_URL", str(server.url))
        monkeypatch.setenv("MLSYSOPS_FLUIDITY_NAMESPACE", NS)
        try:
            yield emulator
        finally:
            await emulator.stop()


def deployments(emu: Any) -> dict[str, dict[str, Any]]:
    return {name: obj.raw for (res, ns, name), obj in list(emu.objects.items())
            if res.plural == "deployments" and ns == NS and not obj.deleted}


def placement(emu: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for dep in deployments(emu).values():
        notes = dep["metadata"]["annotations"]
        out.setdefault(notes["mlsysops.eu/component"], []).append(notes["mlsysops.eu/host"])
    return {c: sorted(h) for c, h in sorted(out.items())}


def replicas(emu: Any) -> dict[str, int]:
    return {dep["metadata"]["annotations"]["mlsysops.eu/component"]: dep["spec"]["replicas"]
            for dep in deployments(emu).values()}


def node_doc(name: str, cores: int, memory: int) -> bytes:
    return yaml.safe_dump({"MLSysOpsNode": {
        "name": name, "cluster_id": "c1", "continuum_layer": "edge",
        "environment": {"node_type": "native", "os": "ubuntu"},
        "hardware": {"cpu": {"cores": cores, "architecture": "amd64"}, "memory": memory}}}
    ).encode()


def app_doc(*components: tuple[str, str, str]) -> bytes:
    return yaml.safe_dump({"MLSysOpsApp": {"name": APP, "components": [
        {"metadata": {"name": name}, "containers": [{
            "image": "registry.local/demo:1",
            "platform_requirements": {"cpu": {"requests": cpu}, "memory": {"requests": mem}}}]}
        for name, cpu, mem in components]}}).encode()


DIRTY = {"pue": 1.9, "carbon_intensity": 750, "energy_source": "fossil", "idle_watts": 90,
         "watts_per_cpu": 12}
CLEAN = {"pue": 1.1, "carbon_intensity": 40, "energy_source": "renewable", "idle_watts": 90,
         "watts_per_cpu": 12}


async def publish_ok(url: str, kind: str, name: str, payload: bytes) -> None:
    reply = await kit.publish_desc(url, kind, name, payload)
    assert reply["accepted"], reply


async def setup_cluster(url: str, energy: dict[str, dict[str, Any]]) -> None:
    await publish_ok(url, "cluster", "c1", kit.cluster_doc("c1", ("n1", "n2")))
    await publish_ok(url, "node", "n1", node_doc("n1", 8, 16))
    await publish_ok(url, "node", "n2", node_doc("n2", 8, 16))
    for name, profile in energy.items():
        await publish_ok(url, "energy", name, json.dumps(profile).encode())


async def trigger(url: str, policy: str, params: dict[str, Any]) -> dict[str, Any]:
    """Trigger (retrying while a plan of the pair is in flight)."""
    nc = await nats.connect(url)
    try:
        for _ in range(100):
            try:
                msg = await nc.request(f"mlsysops.trigger.{policy}.{APP}",
                                       json.dumps({"params": params}).encode(), timeout=5)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
                continue
            reply = json.loads(msg.data)
            error = reply.get("error", "")
            if reply.get("accepted") or ("in flight" not in error
                                         and "changed meanwhile" not in error):
                return reply  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)
        raise AssertionError("trigger never accepted")
    finally:
        await nc.close()


async def context_of(url: str, policy: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-context")
        try:
            entry = await kv.get(wire.context_key(policy, APP))
        except Exception:
            return {}
        return wire.CONTEXT_RECORD.decode(entry.value or b"").context
    finally:
        await nc.close()


async def publish_rate(url: str, rates: dict[str, float], at: float | None = None) -> None:
    at = time.time() if at is None else at
    snap = wire.Telemetry(
        id=f"t-{at}", source="loadgen", collected_at=at,
        samples=[wire.Sample(metric="app_request_rate", value=v, ts=at,
                             labels={"app": APP, "component": c}) for c, v in rates.items()])
    nc = await nats.connect(url)
    try:
        await nc.publish("mlsysops.telemetry.loadgen", msgspec.json.encode(snap))
        await nc.flush()
    finally:
        await nc.close()


# --------------------------------------------------------------------------- placement
async def test_energy_aware_milp_then_greedy_place_through_the_loop(emu, plugin_dirs, cfg,
                                                                    loop_) -> None:
    install(plugin_dirs, "placement")
    loop_.start()
    url = cfg.nats_url
    await setup_cluster(url, {"n1": DIRTY, "n2": CLEAN})
    await publish_ok(url, "app", APP, app_doc(("web", "1", "1Gi"), ("api", "2", "2Gi")))

    # The default strategy (milp) consolidates on the clean node.
    await kit.wait_for(lambda: placement(emu) == {"api": ["n2"], "web": ["n2"]}, timeout=20,
                       what=f"both on the clean node (now {placement(emu)})")
    status = (await context_of(url, "placement"))["status"]
    assert status["active"] == {"placement": "milp"} and status["feasible"]
    assert status["energy"]["targets_used"] == 1 and status["solve_ms"] > 0

    # The grid changes: n1 becomes the clean one. Re-evaluated now (a trigger), the
    # placement moves both there: two moves are worth far less than the energy saved.
    await publish_ok(url, "energy", "n1", json.dumps(CLEAN).encode())
    await publish_ok(url, "energy", "n2", json.dumps(DIRTY).encode())
    await asyncio.sleep(0.5)  # the analyzer and planner see the new profiles
    assert (await trigger(url, "placement", {}))["accepted"]
    await kit.wait_for(lambda: placement(emu) == {"api": ["n1"], "web": ["n1"]}, timeout=20,
                       what=f"both moved to n1 (now {placement(emu)})")
    status = (await context_of(url, "placement"))["status"]
    assert {(m["service"], m["from"], m["to"]) for m in status["moves"]} == {
        ("web", "n2", "n1"), ("api", "n2", "n1")}

    # The alternative strategy for this application: it places a new component next to
    # the running ones, on the clean node already in use.
    assert (await trigger(url, "placement", {"strategy": "greedy"}))["accepted"]
    await kit.wait_for(lambda: context_of_strategy(url), timeout=10, what="greedy active")
    await publish_ok(url, "app", APP, app_doc(("web", "1", "1Gi"), ("api", "2", "2Gi"),
                                              ("worker", "1", "1Gi")))
    await kit.wait_for(lambda: placement(emu).get("worker") == ["n1"], timeout=20,
                       what=f"worker placed on n1 (now {placement(emu)})")
    context = await context_of(url, "placement")
    assert context["overrides"] == {"strategy": "greedy"}
    assert context["status"]["active"] == {"placement": "greedy"}
    assert placement(emu) == {"api": ["n1"], "web": ["n1"], "worker": ["n1"]}


async def context_of_strategy(url: str) -> bool:
    status = (await context_of(url, "placement")).get("status") or {}
    return status.get("active") == {"placement": "greedy"}


async def test_an_infeasible_application_is_explained_in_the_status(emu, plugin_dirs, cfg,
                                                                     loop_) -> None:
    install(plugin_dirs, "placement")
    loop_.start()
    url = cfg.nats_url
    await setup_cluster(url, {})
    await publish_ok(url, "app", APP, app_doc(("huge", "4", "40Gi")))

    async def reason() -> str:
        return ((await context_of(url, "placement")).get("status") or {}).get("reason", "")

    text = await kit.wait_for(reason, timeout=20, what="an infeasibility reason")
    assert text.startswith("infeasible: memory short on any eligible target for huge")
    assert deployments(emu) == {}


# --------------------------------------------------------------------------- scaling
async def test_scaling_follows_the_rate_then_predicts_a_ramp(emu, plugin_dirs, cfg,
                                                             loop_) -> None:
    install(plugin_dirs, "placement", "scaling")
    loop_.start()
    url = cfg.nats_url
    await setup_cluster(url, {"n1": CLEAN, "n2": DIRTY})
    await publish_ok(url, "app", APP, app_doc(("web", "250m", "128Mi")))
    await kit.wait_for(lambda: placement(emu) == {"web": ["n1"]}, timeout=20,
                       what="web placed")

    # A step in the request rate: the default strategy (capacity, alpha 10) scales to 6.
    stepped = time.monotonic()
    await publish_rate(url, {"web": 55})
    await kit.wait_for(lambda: replicas(emu) == {"web": 6}, timeout=15,
                       what=f"6 replicas (now {replicas(emu)})")
    reacted = time.monotonic() - stepped
    status = (await context_of(url, "scaling"))["status"]
    assert status["active"] == {"scaling": "capacity"}
    assert status["details"]["web"]["rate"] == 55 and status["replicas"] == {"web": 6}

    # The predictive variant for this application: on a ramp it allocates ahead.
    reply = await trigger(url, "scaling", {"strategy": "predictive",
                                           "options": {"horizon": "4s", "window": "6s",
                                                       "margin": 0},
                                           "profiles": {"web": {"max_replicas": 30}}})
    assert reply["accepted"], reply
    start = time.time()
    for i in range(8):  # +10 req/s per second: 60, 70, ... 130
        await publish_rate(url, {"web": 60 + 10 * i}, at=start + i)
        await asyncio.sleep(1.0)
    status = (await context_of(url, "scaling"))["status"]
    assert status["active"] == {"scaling": "predictive"}
    assert status["details"]["web"]["prediction"] == "forecast"
    # At 130 req/s with a +10/s trend, 4 s ahead is about 170: more than the 13 now.
    await kit.wait_for(lambda: replicas(emu)["web"] > math.ceil(130 / 10), timeout=10,
                       what=f"replicas ahead of the rate (now {replicas(emu)})")
    print(f"step to applied: {reacted:.2f} s")
