"""The loop as a user's own tooling sees it: documented commands, subjects and CLI only.

Each service is started by its documented command (``mlsysops-<service>``, settings from
``MLSYSOPS_*`` variables, instance names left to their default, as pods get them), and
the test drives it only through the NATS subjects of the README (descriptions published
with a reply, results followed on ``mlsysops.result.<mechanism>``) and reads what it
did with ``mlsysops status --json``. Nothing of the project is imported but the test
kit's plugin sources and NATS helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from tests import loopkit as kit

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

# Says no, every 500 ms: each evaluation shows as the pair's last_eval in `mlsysops status`.
TICK = '''
def initialize():
    return {"configuration": {"analyze_interval": "500ms"}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    return False, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    return {}, context
'''


class Services:
    """Service processes started as an operator starts them."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir = env, logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{service}-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen([str(BIN / f"mlsysops-{service}")], env=self.env,
                                stdout=log, stderr=log)
        log.close()
        self.procs.append((service, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def services(nats_server: Any, plugin_dirs: tuple[Path, Path],
             tmp_path: Path) -> Iterator[Services]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSYSOPS_")}
    env.update(MLSYSOPS_NATS_URL=nats_server.url, MLSYSOPS_POLICY_DIR=str(plugin_dirs[0]),
               MLSYSOPS_MECHANISM_DIR=str(plugin_dirs[1]), MLSYSOPS_HTTP_PORT="0")
    running = Services(env, tmp_path)
    yield running
    running.stop_all()


def status(url: str) -> dict[str, Any]:
    out = subprocess.run([str(BIN / "mlsysops"), "status", "--json", "--nats-url", url],
                         capture_output=True, text=True, timeout=30, check=True, cwd=ROOT)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def all_evaluated_since(url: str, apps: list[str], since: float) -> bool:
    data = await asyncio.to_thread(status, url)
    seen = {p["app"]: p["last_eval"] for p in data["pairs"] if p["policy"] == "tick"}
    return all(seen.get(app, 0) > since for app in apps)


async def test_analyzers_leaving_and_joining_never_strand_an_application(
        services: Services, nats_server: Any, plugin_dirs: tuple[Path, Path]) -> None:
    (plugin_dirs[0] / "policy-tick.py").write_text(TICK)
    services.start("monitor")
    first = services.start("analyzer")
    services.start("analyzer")
    url = nats_server.url
    apps = [f"app-{i:02d}" for i in range(12)]
    for app in apps:
        assert (await kit.publish_desc(url, "app", app, kit.app_doc(app)))["accepted"]
    start = time.time()
    await kit.wait_for(lambda: all_evaluated_since(url, apps, start), timeout=20,
                       what="every application analysed by two analyzers")

    # kill -9: the dead replica's pairs come back within its membership TTL (10 s) and an
    # interval, with or without a replacement
    first.kill()
    first.wait(10)
    killed = time.time()
    await kit.wait_for(lambda: all_evaluated_since(url, apps, killed + 1.0), timeout=25,
                       what="every application analysed again after a kill -9")

    # scale 1 -> 3, then 3 -> 1 with a graceful stop (SIGTERM, as Kubernetes does)
    joined = [services.start("analyzer"), services.start("analyzer")]
    await asyncio.sleep(3)
    grown = time.time()
    await kit.wait_for(lambda: all_evaluated_since(url, apps, grown), timeout=15,
                       what="every application analysed by three analyzers")
    for proc in joined:
        proc.send_signal(signal.SIGTERM)
    for proc in joined:
        await asyncio.to_thread(proc.wait, 15)
    shrunk = time.time()
    await kit.wait_for(lambda: all_evaluated_since(url, apps, shrunk + 0.5), timeout=8,
                       what="every application analysed again at once after a graceful stop")


async def test_an_application_deleted_and_published_again_is_deployed_again(
        services: Services, nats_server: Any, plugin_dirs: tuple[Path, Path]) -> None:
    from tests.seedpolicies import seed_policy

    (plugin_dirs[0] / "policy-staticPlacement.py").write_text(seed_policy("staticPlacement"))
    log = kit.recorder(plugin_dirs[1], name="fluidity")  # records what it is asked to apply
    for service in ("monitor", "analyzer", "planner", "scheduler", "executor"):
        services.start(service)
    url = nats_server.url
    nc = await nats.connect(url)
    results: list[dict[str, Any]] = []

    async def on_result(msg: Any) -> None:
        results.append(json.loads(msg.data))

    await nc.subscribe("mlsysops.result.fluidity", cb=on_result)
    try:
        assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
        doc = kit.app_doc("shop", node="node-a")
        assert (await kit.publish_desc(url, "app", "shop", doc))["accepted"]
        await kit.wait_for(lambda: len(results) == 1, timeout=30, what="the first deployment")
        assert (await kit.publish_desc(url, "app", "shop", b""))["deleted"]
        await asyncio.sleep(1.0)
        assert (await kit.publish_desc(url, "app", "shop", doc))["accepted"]
        await kit.wait_for(lambda: len(results) == 2, timeout=30,
                           what="the deployment of the application published again")
    finally:
        await nc.close()
    assert [r["outcome"] for r in results] == ["applied", "applied"]
    assert results[0]["plan_id"] != results[1]["plan_id"]
    applied = kit.applied(log)
    assert len(applied) == 2  # the result says applied, and it really was, twice
    assert all(a["command"]["deployment_plan"]["c0"] == [{"action": "deploy",
                                                          "host": "node-a"}] for a in applied)
