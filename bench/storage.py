"""Figure 7: JetStream storage per 1,000 plans, to size the volume of a deployment.

The whole loop runs (the five services as processes, file storage) with a policy that
plans for every application at every evaluation and the recording mechanism, until
``plans`` plans are applied. Then the bytes every stream and bucket holds are read from
the server (``stream_info().state.bytes``): what one plan costs across the loop's
streams (verdict, plan, decision, request, result, status events) and its per-plan
records (decisions in ``sched``, the ledger), and what each application keeps whatever
the rate (description, context, status part).

Baseline, same run: the same number of plan messages, as the planner publishes them,
in one plain stream: what a plan costs on the wire alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench import plugins
from bench.common import Fleet, NatsServer, Workdir, connect, publish_apps, wait_for
from mlsysops import settings as settings_mod
from mlsysops import wire
from mlsysops.layout import buckets, streams

PLANNER = '''
def initialize():
    return {"configuration": {"analyze_interval": "200ms"}, "mechanisms": ["bench_recorder"]}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    return True, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    context["n"] = context.get("n", 0) + 1
    name = application_description[0]["name"]
    return {"bench_recorder": {"key": name, "seq": context["n"]}}, context
'''


def _applied(log: Path) -> int:
    return sum(1 for _ in log.open()) if log.exists() else 0


async def _bytes(js: Any, names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        info = await js.stream_info(name)
        out[name] = int(info.state.bytes)
    return out


async def _raw_baseline(js: Any, count: int) -> int:
    """Bytes of ``count`` plan messages in one plain stream."""
    await js.add_stream(name="RAW_PLANS", subjects=["raw.plan.>"])
    plan = wire.Plan(plan_id="p-0123456789abcdef0123", app="app-00001", policy="bench_always",
                     created_at=wire.now(), commands={"bench_recorder": {"key": "app-00001",
                                                                         "seq": 1}},
                     verdict_id="v-0123456789abcdef0123")
    data = wire.encode(plan)
    for start in range(0, count, 256):
        await asyncio.gather(*(js.publish(f"raw.plan.app-{i:05d}.bench_always", data)
                               for i in range(start, min(count, start + 256))))
    return int((await js.stream_info("RAW_PLANS")).state.bytes)


async def measure(apps: int, plans: int, *, keep: bool = False,
                  progress: Any = print) -> dict[str, Any]:
    with Workdir("storage", keep) as work:
        server = NatsServer(work)
        server.start()
        policies, mechanisms = work / "policies", work / "mechanisms"
        policies.mkdir()
        mechanisms.mkdir()
        log = work / "applied.jsonl"
        plugins.write_recorder(mechanisms, log)
        (policies / "policy-bench_always.py").write_text(PLANNER)
        fleet = Fleet(server, work, policies, mechanisms)
        nc = await connect(server.url)
        try:
            for service in ("monitor", "analyzer", "planner", "scheduler", "executor"):
                fleet.start(service)
            names = [f"app-{i:05d}" for i in range(apps)]
            await publish_apps(nc, names)
            await wait_for(lambda: _applied(log) >= plans, timeout=300,
                           what=f"{plans} plans applied", alive=fleet.check_alive)
            fleet.stop_all()
            applied = _applied(log)
            js = nc.jetstream()
            cfg = settings_mod.load(env={"MLSYSOPS_NATS_URL": server.url})
            stream_names = [s.name or "" for s in streams(cfg)]
            bucket_names = [f"KV_{b.bucket}" for _, b in buckets(cfg)]
            held = await _bytes(js, stream_names + bucket_names)
            raw = await _raw_baseline(js, applied)
        finally:
            await nc.close()
            fleet.stop_all()
            server.stop()
    per_app = sum(held[f"KV_mlsysops-{b}"] for b in ("desc", "context", "status")) / apps
    per_plan_names = [n for n in held if n not in (
        "KV_mlsysops-desc", "KV_mlsysops-context", "KV_mlsysops-status", "KV_mlsysops-leases",
        "MLSYSOPS_TELEMETRY", "MLSYSOPS_DESCRIPTIONS")]
    per_plan = sum(held[n] for n in per_plan_names) / applied
    progress(f"  storage: {per_plan * 1000 / 1e6:.2f} MB per 1,000 plans "
             f"(raw plan messages: {raw / applied * 1000 / 1e6:.2f} MB), "
             f"{per_app / 1000:.1f} kB per application")
    return {"apps": apps, "plans": applied, "bytes": held, "per_plan": per_plan,
            "raw_per_plan": raw / applied, "ratio": per_plan / (raw / applied),
            "per_app": per_app}
