"""Least privilege: the sample server configuration, with a real nats-server.

``deploy/nats/permissions.conf`` gives each service its own user with only the subjects it
needs (docs/security.md has the table). These tests run nats-server with that very file
and show that

- the loop works end to end with each service on its own user, errors included, and
  ``mlsysops publish/status/plans`` work as the operator user, without one permission
  violation in any service's output;
- each service is refused what it does not need: the monitor cannot publish plans, the
  executor cannot publish descriptions, nobody can forge another service's messages,
  write another service's state, or create, change or read streams it does not own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from tests import loopkit as kit
from tests.conftest import NatsServer
from tests.security.procs import ROOT, SERVICES, Services, base_env, configured_server

pytestmark = pytest.mark.slow

CONFIG = ROOT / "deploy" / "nats" / "permissions.conf"
USERS = (*SERVICES, "operator")
PROBE = {"Nats-Expected-Stream": "mlsysops-permission-probe"}  # never stored by a stream


def _passwords() -> dict[str, str]:
    return {f"MLSYSOPS_{u.upper()}_PASSWORD": f"{u}-" + secrets.token_urlsafe(12) for u in USERS}


def _server(tmp_path: Path, passwords: dict[str, str]) -> NatsServer:
    return configured_server(tmp_path, CONFIG.read_text(), passwords)


def _login(user: str, passwords: dict[str, str]) -> dict[str, str]:
    return {"user": f"mlsysops-{user}", "password": passwords[f"MLSYSOPS_{user.upper()}_PASSWORD"]}


class Probe:
    """One user's connection that tells whether the server allows a publish or subscribe."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, url: str, login: dict[str, str]) -> Probe:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0, **login)
        return self

    async def allowed(self, op: str, subject: str) -> bool:
        before = len(self.errors)
        if op == "sub":
            sub = await self.nc.subscribe(subject)
            await self.nc.flush()
            await sub.unsubscribe()
        else:
            await self.nc.publish(subject, b"", headers=PROBE)
        await self.nc.flush()
        await asyncio.sleep(0.02)  # the -ERR comes before the PONG; let its callback run
        what = "subscription to" if op == "sub" else "publish to"
        return not any(f'permissions violation for {what} "{subject.lower()}"' in e
                       for e in self.errors[before:])

    async def close(self) -> None:
        await self.nc.close()


# (user, "pub"/"sub", subject, allowed)
MATRIX = [
    # the monitor takes descriptions and publishes telemetry, nothing of the loop
    ("monitor", "sub", "mlsysops.desc.*.*", True),
    ("monitor", "pub", "$SYS.REQ.USER.INFO", True),
    ("monitor", "pub", "mlsysops.telemetry.host", True),
    ("monitor", "pub", "$KV.mlsysops-desc.app.shop", True),
    ("monitor", "pub", "mlsysops.plan.shop.once", False),
    ("monitor", "pub", "mlsysops.verdict.shop.once", False),
    ("monitor", "pub", "mlsysops.exec.recorder", False),
    ("monitor", "pub", "mlsysops.result.recorder", False),
    ("monitor", "pub", "$KV.mlsysops-ledger.p-1.recorder", False),
    ("monitor", "pub", "$KV.mlsysops-context.once.shop", False),
    ("monitor", "pub", "mlsysops.error.service.executor", False),
    ("monitor", "sub", "mlsysops.exec.>", False),
    ("monitor", "sub", "mlsysops.>", False),
    ("monitor", "pub", "$JS.API.STREAM.CREATE.SPY", False),
    ("monitor", "pub", "$JS.API.STREAM.UPDATE.MLSYSOPS_PLANS", False),
    ("monitor", "pub", "$JS.API.STREAM.DELETE.MLSYSOPS_PLANS", False),
    ("monitor", "pub", "$JS.API.STREAM.PURGE.KV_mlsysops-desc", False),
    ("monitor", "pub", "$JS.API.CONSUMER.CREATE.MLSYSOPS_EXEC.spy", False),
    # the analyzer: verdicts and contexts
    ("analyzer", "pub", "mlsysops.verdict.shop.once", True),
    ("analyzer", "pub", "$KV.mlsysops-context.once.shop", True),
    ("analyzer", "sub", "mlsysops.trigger.*.*", True),
    ("analyzer", "sub", "mlsysops.telemetry.>", True),
    ("analyzer", "pub", "mlsysops.plan.shop.once", False),
    ("analyzer", "pub", "mlsysops.exec.recorder", False),
    ("analyzer", "pub", "mlsysops.desc.app.shop", False),
    ("analyzer", "pub", "$KV.mlsysops-desc.app.shop", False),
    ("analyzer", "pub", "$KV.mlsysops-leases.leader.scheduler", False),
    ("analyzer", "sub", "mlsysops.desc.*.*", False),
    # the planner: plans only
    ("planner", "pub", "mlsysops.plan.shop.once", True),
    ("planner", "pub", "$JS.ACK.MLSYSOPS_VERDICTS.planner.1.1.1.1.1", True),
    ("planner", "pub", "mlsysops.verdict.shop.once", False),
    ("planner", "pub", "mlsysops.exec.recorder", False),
    ("planner", "pub", "mlsysops.decision.recorder", False),
    ("planner", "pub", "$KV.mlsysops-sched.claim.recorder._all", False),
    ("planner", "pub", "$JS.API.CONSUMER.MSG.NEXT.MLSYSOPS_EXEC.executor", False),
    ("planner", "sub", "mlsysops.desc.*.*", False),
    # the scheduler: decisions, execution requests, claims
    ("scheduler", "pub", "mlsysops.exec.recorder", True),
    ("scheduler", "pub", "mlsysops.decision.recorder", True),
    ("scheduler", "pub", "$KV.mlsysops-sched.plan.p-1", True),
    ("scheduler", "pub", "mlsysops.plan.shop.once", False),
    ("scheduler", "pub", "mlsysops.result.recorder", False),
    ("scheduler", "pub", "mlsysops.desc.app.shop", False),
    ("scheduler", "pub", "$KV.mlsysops-ledger.p-1.recorder", False),
    ("scheduler", "sub", "mlsysops.telemetry.>", False),
    # the executor: results, status and its ledger, never an input
    ("executor", "pub", "mlsysops.result.recorder", True),
    ("executor", "pub", "mlsysops.status.recorder", True),
    ("executor", "pub", "$KV.mlsysops-ledger.p-1.recorder", True),
    ("executor", "pub", "mlsysops.desc.app.shop", False),
    ("executor", "pub", "mlsysops.trigger.once.shop", False),
    ("executor", "pub", "mlsysops.plan.shop.once", False),
    ("executor", "pub", "mlsysops.exec.recorder", False),
    ("executor", "pub", "mlsysops.verdict.shop.once", False),
    ("executor", "pub", "$KV.mlsysops-desc.app.shop", False),
    ("executor", "pub", "$KV.mlsysops-sched.claim.recorder._all", False),
    ("executor", "sub", "mlsysops.desc.*.*", False),
    ("executor", "sub", "mlsysops.trigger.*.*", False),
    # the operator: inputs through the monitor and the analyzer only; reads everything
    ("operator", "pub", "mlsysops.desc.app.shop", True),
    ("operator", "pub", "mlsysops.trigger.once.shop", True),
    ("operator", "sub", "mlsysops.error.>", True),
    ("operator", "pub", "$KV.mlsysops-desc.app.shop", False),
    ("operator", "pub", "$KV.mlsysops-context.once.shop", False),
    ("operator", "pub", "mlsysops.plan.shop.once", False),
    ("operator", "pub", "mlsysops.exec.recorder", False),
    ("operator", "pub", "$JS.API.STREAM.DELETE.MLSYSOPS_EVENTS", False),
]


def test_sample_config_is_valid_and_takes_passwords_from_the_environment(
        tmp_path: Path) -> None:
    from mlsysops.local import nats_server_binary

    passwords = _passwords()
    ok = subprocess.run([nats_server_binary(), "-t", "-c", str(CONFIG)], capture_output=True,
                        text=True, env=passwords, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    without = subprocess.run([nats_server_binary(), "-t", "-c", str(CONFIG)],
                             capture_output=True, text=True, env={}, timeout=30, check=False)
    assert without.returncode != 0 and "MLSYSOPS_MONITOR_PASSWORD" in without.stderr + \
        without.stdout
    assert not any(p in CONFIG.read_text() for p in passwords.values())


async def test_each_user_may_do_only_what_its_service_needs(tmp_path: Path) -> None:
    passwords = _passwords()
    server = _server(tmp_path, passwords)
    probes: dict[str, Probe] = {}
    try:
        for user in USERS:
            probes[user] = await Probe().open(server.url, _login(user, passwords))
        wrong = []
        for user, op, subject, allowed in MATRIX:
            if await probes[user].allowed(op, subject) != allowed:
                wrong.append(f"{user} {'may' if not allowed else 'may not'} {op} {subject}")
        assert not wrong, "\n".join(wrong)
    finally:
        for probe in probes.values():
            await probe.close()
        server.stop()


BROKEN_POLICY = "def analyze(:\n"  # a syntax error: analyzer and planner report it
BROKEN_MECHANISM = "raise RuntimeError('broken on purpose')\n"  # scheduler and executor too


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlsysops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False, cwd=str(ROOT))


async def test_loop_runs_end_to_end_with_one_least_privileged_user_per_service(
        tmp_path: Path, plugin_dirs: tuple[Path, Path]) -> None:
    policies, mechanisms = plugin_dirs
    applied = kit.recorder(mechanisms)
    kit.once_policy(policies)
    (policies / "policy-broken.py").write_text(BROKEN_POLICY)
    (mechanisms / "broken.py").write_text(BROKEN_MECHANISM)
    passwords = _passwords()
    server = _server(tmp_path, passwords)
    services = Services(tmp_path)
    common = {"MLSYSOPS_NATS_URL": server.url, "MLSYSOPS_POLICY_DIR": str(policies),
              "MLSYSOPS_MECHANISM_DIR": str(mechanisms), "MLSYSOPS_CALL_TIMEOUT": "3"}
    operator = base_env(**common, MLSYSOPS_NATS_USER="mlsysops-operator",
                        MLSYSOPS_NATS_PASSWORD=passwords["MLSYSOPS_OPERATOR_PASSWORD"])
    events: list[dict[str, Any]] = []
    watcher = await nats.connect(server.url, **_login("operator", passwords))
    probes: list[Probe] = []
    try:
        async def on_event(msg: Any) -> None:
            events.append({"subject": msg.subject, **json.loads(msg.data)})

        await watcher.subscribe("mlsysops.error.>", cb=on_event)
        for name in SERVICES:
            login = _login(name, passwords)
            services.start(name, base_env(**common, MLSYSOPS_NATS_USER=login["user"],
                                          MLSYSOPS_NATS_PASSWORD=login["password"]))
        # the operator publishes; the loop plans and applies, every hop on its own user
        cluster, app = tmp_path / "cluster.yaml", tmp_path / "app.yaml"
        cluster.write_bytes(kit.cluster_doc("edge"))
        app.write_bytes(kit.app_doc("shop"))
        for kind, path in (("cluster", cluster), ("app", app)):
            for _ in range(150):
                out = await asyncio.to_thread(_cli, operator, "publish", kind, str(path))
                if out.returncode != 3:  # 3: no monitor listening yet
                    break
                await asyncio.sleep(0.2)
            assert out.returncode == 0, out.stdout + out.stderr + services.logs()
        await kit.wait_for(lambda: kit.applied(applied), timeout=45,
                           what="the apply\n" + services.logs())
        # each consumer reports what it cannot read (with the publisher's own rights)
        for user, subject in (("analyzer", "mlsysops.verdict.shop.once"),
                              ("planner", "mlsysops.plan.shop.once"),
                              ("scheduler", "mlsysops.exec.recorder")):
            probe = await Probe().open(server.url, _login(user, passwords))
            probes.append(probe)
            await probe.nc.jetstream().publish(subject, b"{not json")
        # the examples of the issue: refused by the server, never seen by the loop
        monitor, executor = (await Probe().open(server.url, _login("monitor", passwords)),
                             await Probe().open(server.url, _login("executor", passwords)))
        probes += [monitor, executor]
        assert not await monitor.allowed("pub", "mlsysops.plan.shop.forged")
        assert not await executor.allowed("pub", "mlsysops.desc.app.forged")
        expected = {"mlsysops.error.service.planner", "mlsysops.error.service.scheduler",
                    "mlsysops.error.service.executor", "mlsysops.error.policy.broken",
                    "mlsysops.error.mechanism.broken"}
        await kit.wait_for(lambda: expected <= {e["subject"] for e in events}, timeout=20,
                           what=f"error events {expected}")
        for _ in range(3):  # status reads the buckets once; a busy machine may miss a key
            status = await asyncio.to_thread(_cli, operator, "status", "--json")
            assert status.returncode == 0, status.stderr
            state = json.loads(status.stdout)
            if {s["service"] for s in state["services"]} == set(SERVICES):
                break
        assert state["apps"] == ["shop"] and "forged" not in state["apps"]
        assert {s["service"] for s in state["services"]} == set(SERVICES), status.stdout
        plans = await asyncio.to_thread(_cli, operator, "plans", "--json")
        assert plans.returncode == 0, plans.stderr
        [trace] = json.loads(plans.stdout)
        assert trace["results"]["recorder"]["outcome"] == "applied"
        assert "forged" not in plans.stdout
    finally:
        for probe in probes:
            await probe.close()
        await watcher.close()
        services.stop()
        server.stop()
    assert len(kit.applied(applied)) == 1
    for name in SERVICES:
        log = services.log(name)
        assert "permissions violation" not in log.lower(), f"{name}:\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"
        assert not any(p in log for p in passwords.values()), f"a password in {name}'s output"
    printed = status.stdout + status.stderr + plans.stdout + plans.stderr
    assert not any(p in printed for p in passwords.values())


# ---------------------------------------------------------------- not yet (xfail)
LACKING = """
jetstream {}
authorization { users: [
  { user: no-desc, password: pw, permissions: {
      publish: ">", subscribe: { allow: ">", deny: ["mlsysops.desc.*.*"] } } }
  { user: no-consumer, password: pw, permissions: {
      publish: { allow: ">", deny: ["$JS.API.CONSUMER.CREATE.MLSYSOPS_EXEC.>",
                                    "$JS.API.CONSUMER.DURABLE.CREATE.MLSYSOPS_EXEC.>"] },
      subscribe: ">" } }
  { user: no-layout, password: pw, permissions: {
      publish: { allow: ">", deny: ["$JS.API.STREAM.CREATE.MLSYSOPS_TELEMETRY"] },
      subscribe: ">" } }
] }
"""


def test_a_service_lacking_a_permission_says_which_at_start(tmp_path: Path) -> None:
    server = configured_server(tmp_path, LACKING)
    services = Services(tmp_path)
    cases = {"monitor": ("no-desc", "mlsysops.desc.*.*"),
             "executor": ("no-consumer", "$JS.API.CONSUMER.CREATE.MLSYSOPS_EXEC"),
             "analyzer": ("no-layout", "$JS.API.STREAM.CREATE.MLSYSOPS_TELEMETRY")}
    try:
        for name, (user, _) in cases.items():
            services.start(name, base_env(MLSYSOPS_NATS_URL=server.url, MLSYSOPS_NATS_USER=user,
                                          MLSYSOPS_NATS_PASSWORD="pw"))
        deadline = time.monotonic() + 15  # they start together: one deadline for all
        codes = {name: services.wait_exit(name, max(0.0, deadline - time.monotonic()))
                 for name in cases}
    finally:
        services.stop(grace=2)
        server.stop()
    for name, (user, subject) in cases.items():
        out = services.log(name)
        assert codes[name] not in (None, 0), f"{name} still running:\n{out[-2000:]}"
        assert "permission" in out.lower() and subject in out and user in out, out[-2000:]
        assert "Traceback" not in out, out[-2000:]
