"""Figure 5: encode plus decode cost per message of the wire types (mlsysops/wire.py).

Each type is measured with a representative instance: ``wire.encode`` then the type's
``Codec.decode``, best of several repeats. Baselines in the same run: the standard
library's ``json.dumps``/``json.loads`` of the same data (what the bytes would cost
without msgspec), and the raw JetStream hop of the reaction figure, to put the codec cost
in proportion with one message on the wire.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from mlsysops import wire


def samples() -> dict[str, tuple[Any, wire.Codec[Any]]]:
    now = 1_732_280_000.0
    telemetry = wire.Telemetry(
        id="t-0123456789abcdef", source="prometheus", collected_at=now,
        samples=[wire.Sample(metric="node_load1", value=0.42 + i, ts=now,
                             labels={"instance": f"node{i}:9100", "job": "node"})
                 for i in range(10)])
    context = {"configuration": {"analyze_interval": "10s"}, "mechanisms": ["fluidity"],
               "telemetry": {"metrics": ["node_load1"], "system_scrape_interval": "5s"},
               "placements": {"web": "node-a", "load": "node-b"}, "moves": 3}
    verdict = wire.Verdict(verdict_id="v-0123456789abcdef0123", app="shop",
                           policy="relocateComponents", created_at=now, context=context)
    command = {"name": "shop", "component": "load", "node": "node-b", "key": "shop"}
    plan = wire.Plan(plan_id="p-0123456789abcdef0123", app="shop",
                     policy="relocateComponents", created_at=now,
                     commands={"fluidity": command}, verdict_id=verdict.verdict_id)
    decision = wire.Decision(plan_id=plan.plan_id, mechanism="fluidity", outcome="scheduled",
                             app="shop", policy="relocateComponents", conflict_key="shop",
                             decided_at=now)
    request = wire.ExecRequest(exec_id=f"{plan.plan_id}.fluidity", plan_id=plan.plan_id,
                               mechanism="fluidity", command=command, app="shop",
                               policy="relocateComponents", conflict_key="shop",
                               scheduled_at=now)
    result = wire.ExecResult(plan_id=plan.plan_id, mechanism="fluidity", outcome="applied",
                             app="shop", policy="relocateComponents", duration=0.012,
                             finished_at=now, executor="executor-0")
    record = wire.ContextRecord(context=context, inflight=verdict.verdict_id,
                                inflight_since=now, outbox_verdict=verdict, last_eval=now,
                                last_verdict=True, evaluations=42, policy_digest="abc123")
    return {
        "Telemetry (10 samples)": (telemetry, wire.TELEMETRY),
        "Verdict": (verdict, wire.VERDICT),
        "Plan": (plan, wire.PLAN),
        "Decision (Event)": (decision, wire.EVENT),
        "ExecRequest": (request, wire.EXEC_REQUEST),
        "ExecResult (Event)": (result, wire.EVENT),
        "ContextRecord (with outbox)": (record, wire.CONTEXT_RECORD),
        "Claim": (wire.Claim(plan_id=plan.plan_id, mechanism="fluidity", conflict_key="shop",
                             since=now, expires_at=now + 30), wire.CLAIM),
        "PlanDecisions": (wire.PlanDecisions(plan_id=plan.plan_id, decisions=[decision],
                                             requests=[request]), wire.PLAN_DECISIONS),
        "LedgerEntry": (wire.LedgerEntry(state="applied", plan_id=plan.plan_id,
                                         mechanism="fluidity", executor="executor-0",
                                         started_at=now, finished_at=now), wire.LEDGER),
        "ServiceHeartbeat": (wire.ServiceHeartbeat(service="analyzer", instance="a-1",
                                                   started_at=now, updated_at=now),
                             wire.HEARTBEAT),
    }


def _best_ns(fn: Any, loops: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter_ns() - started) / loops)
    return best


def measure(*, loops: int, repeats: int = 5) -> list[dict[str, Any]]:
    rows = []
    for name, (obj, codec) in samples().items():
        data = wire.encode(obj)
        if codec.decode(data) != obj:
            raise AssertionError(f"{name} does not survive a round trip")
        plain = msgspec.to_builtins(obj)

        def ours(obj: Any = obj, codec: wire.Codec[Any] = codec) -> None:
            codec.decode(wire.encode(obj))

        def stdlib(plain: Any = plain) -> None:
            json.loads(json.dumps(plain))

        rows.append({"type": name, "bytes": len(data),
                     "ns": _best_ns(ours, loops, repeats),
                     "stdlib_ns": _best_ns(stdlib, loops, repeats)})
    return rows
