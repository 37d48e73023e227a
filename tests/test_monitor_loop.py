"""The Monitor inside the loop: policies get the telemetry they ask for.

With a real Prometheus scraping a real node exporter, and with the built-in host source
that ``mlsysops up`` uses on a laptop.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nats
import pytest

from tests import loopkit as kit

ROOT = Path(__file__).resolve().parent.parent

# Records what telemetry analyze() received into its context, never plans.
WATCHER = '''
def initialize():
    return {"configuration": {"analyze_interval": "500ms"},
            "telemetry": {"metrics": ["node_load1", "node_memory_MemAvailable_bytes"],
                          "system_scrape_interval": "1s"}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    latest = telemetry["latest"]
    context["seen"] = {name: latest[name][0] for name in sorted(latest) if latest[name]}
    context["history"] = len(telemetry["history"])
    context["mechanisms"] = sorted(mechanisms)
    return False, context

def plan(*args):
    return {}, args[0]
'''


async def _context(url: str, key: str) -> dict:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-context")
        try:
            entry = await kv.get(key)
        except Exception:
            return {}
        import json

        return json.loads(entry.value or b"{}")["context"]  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def _run_watcher(loop_, cfg, plugin_dirs) -> dict:
    policies, mechanisms = plugin_dirs
    (policies / "policy-watcher.py").write_text(WATCHER)
    kit.recorder(mechanisms)
    loop_.cfg = cfg
    loop_.start("monitor", "analyzer", "executor")
    await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop"))

    async def seen() -> dict:
        ctx = await _context(cfg.nats_url, "watcher.shop")
        return ctx if ctx.get("seen", {}).keys() >= {
            "node_load1", "node_memory_MemAvailable_bytes"} and ctx.get("history", 0) >= 2 \
            else {}

    return await kit.wait_for(seen, timeout=40, what="telemetry in the policy context")


@pytest.mark.slow
async def test_policies_see_prometheus_telemetry(loop_, cfg, plugin_dirs, prometheus) -> None:
    cfg = dataclasses.replace(cfg, prometheus_url=prometheus.url)
    ctx = await _run_watcher(loop_, cfg, plugin_dirs)
    sample = ctx["seen"]["node_load1"]
    assert "instance" in sample["labels"]
    assert sample["labels"].get("job")  # set by Prometheus, not by the host source
    assert ctx["mechanisms"] == ["recorder"]  # mechanism status reaches policies too


async def test_policies_see_host_telemetry_without_prometheus(loop_, cfg, plugin_dirs) -> None:
    ctx = await _run_watcher(loop_, cfg, plugin_dirs)
    sample = ctx["seen"]["node_load1"]
    assert sample["value"] >= 0 and "node" in sample["labels"]
    assert ctx["seen"]["node_memory_MemAvailable_bytes"]["value"] > 0


@pytest.mark.slow
async def test_example_policies_run_on_prometheus_telemetry(loop_, cfg, plugin_dirs,
                                                            prometheus) -> None:
    """The shipped relocation policy asks for node_load1; the monitor collects it for it."""
    policies, mechanisms = plugin_dirs
    shutil.copy(ROOT / "plugins/policies/policy-relocateComponents.py", policies)
    log = kit.recorder(mechanisms, name="fluidity")
    cfg = dataclasses.replace(cfg, prometheus_url=prometheus.url)
    loop_.cfg = cfg
    loop_.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
    assert (await kit.publish_desc(url, "app", "free", kit.app_doc("free")))["accepted"]
    await kit.wait_for(lambda: kit.applied(log), timeout=40, what="the initial placement")
    command = kit.applied(log)[0]["command"]
    assert command["deployment_plan"]["c0"] == [{"action": "deploy", "host": "node-a"}]
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")

        async def status() -> dict:
            import json

            try:  # written by the collecting monitor once it holds the lease
                data = json.loads((await kv.get("telemetry")).value or b"{}")
            except nats.js.errors.KeyNotFoundError:
                return {}
            return data if "node_load1" in data.get("queries", {}) else {}

        found = await kit.wait_for(status, timeout=20, what="telemetry status")
        assert found["source"] == "prometheus" and found["state"] == "up"
        assert found["queries"]["node_load1"] == ["relocateComponents"]
    finally:
        await nc.close()
