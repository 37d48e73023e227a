"""The loop as an operator runs it: five separate processes, driven through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import loopkit as kit

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def cli(cfg, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLSYSOPS_NATS_URL": cfg.nats_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlsysops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


async def acli(cfg, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, cfg, *args, timeout=timeout)


async def test_five_processes_from_description_to_apply(process_loop, cfg, plugin_dirs,
                                                        tmp_path) -> None:
    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    kit.once_policy(policies)
    process_loop.start()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_bytes(kit.cluster_doc("edge"))
    app = tmp_path / "app.yaml"
    app.write_bytes(kit.app_doc("shop", components=2))
    try:
        for kind, path in (("cluster", cluster), ("app", app)):
            for _ in range(100):
                out = await acli(cfg, "publish", kind, str(path), "--json")
                if out.returncode != 3:  # 3: no monitor listening yet
                    break
                await asyncio.sleep(0.2)
            assert out.returncode == 0, out.stderr + out.stdout
            assert json.loads(out.stdout)["accepted"] is True
        waited = await acli(cfg, "plans", "--app", "shop", "--wait", "30", "--json", timeout=60)
        assert waited.returncode == 0, waited.stdout + waited.stderr + process_loop.logs()
        await kit.wait_for(lambda: kit.applied(log), timeout=30, what="apply")
        await asyncio.sleep(1.5)
        assert [r["command"]["app"] for r in kit.applied(log)] == ["shop"]
        trace = json.loads((await acli(cfg, "plans", "--json")).stdout)
        assert len(trace) == 1
        assert trace[0]["app"] == "shop" and trace[0]["policy"] == "once"
        assert trace[0]["decisions"]["recorder"]["outcome"] == "scheduled"
        assert trace[0]["results"]["recorder"]["outcome"] == "applied"
        assert trace[0]["verdict_at"] <= trace[0]["plan_at"]
        status = json.loads((await acli(cfg, "status", "--json")).stdout)
        assert status["apps"] == ["shop"] and status["clusters"] == ["edge"]
        assert {s["service"] for s in status["services"]} == {
            "monitor", "analyzer", "planner", "scheduler", "executor"}
        assert status["mechanisms"]["recorder"]["state"] == {"applied": 1}
        pair = next(p for p in status["pairs"] if p["policy"] == "once")
        assert pair["last_plan_id"] == trace[0]["plan_id"] and pair["in_flight"] is None
        text = await acli(cfg, "status")
        assert "shop" in text.stdout and "recorder" in text.stdout
    finally:
        process_loop.stop()


async def test_publish_reports_rejections(process_loop, cfg, tmp_path) -> None:
    process_loop.start("monitor")
    bad = tmp_path / "bad.yaml"
    bad.write_text("MLSysOpsApp:\n  name: shop\n  components:\n"
                   "    - metadata: {name: c}\n      restart_policy: sometimes\n"
                   "      containers: [{image: x}]\n")
    for _ in range(100):
        out = await acli(cfg, "publish", "app", str(bad))
        if out.returncode != 3:
            break
        await asyncio.sleep(0.2)
    assert out.returncode == 1
    assert "REJECTED" in out.stdout
    assert "$.components[0].restart_policy" in out.stdout
    missing = await acli(cfg, "publish", "app", str(tmp_path / "nope.yaml"))
    assert missing.returncode != 0
