"""``mlsysops status`` and ``mlsysops plans``: read the State back for an operator.

Status comes from the KV buckets (descriptions, policy contexts, plugin load state,
mechanism status, claims, service heartbeats, telemetry source). Plan traces are joined
from the streams: verdict -> plan -> decision per mechanism -> result per mechanism.
Secrets never appear: nothing here reads settings beyond the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.api as api

from mlsysops import subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import BadInput
from mlsysops.settings import Settings, redact_url


async def _connect(cfg: Settings) -> Bus:
    bus = Bus(cfg, "cli")
    try:
        await asyncio.wait_for(bus.connect(mode="read"), 10)
    except TimeoutError:
        url = redact_url(cfg.nats_url)
        raise BadInput(f"cannot connect to NATS at {url} within 10 s") from None
    return bus


async def _bucket(bus: Bus, role: str, skip: str = "\0") -> dict[str, bytes]:
    """Every key of a bucket but those starting with ``skip``, with its value."""
    kv = bus.kv(role)
    out: dict[str, bytes] = {}
    try:
        keys = await kv.keys()
    except Exception:
        return out
    for key in (k for k in keys if not k.startswith(skip)):
        try:
            entry = await kv.get(key)
        except Exception:
            continue
        if entry.value:
            out[key] = entry.value
    return out


# ---------------------------------------------------------------- status
async def collect_status(bus: Bus) -> dict[str, Any]:
    desc, ctx, status, sched, leases, ledger = await asyncio.gather(
        _bucket(bus, subjects.BUCKET_DESC), _bucket(bus, subjects.BUCKET_CONTEXT),
        _bucket(bus, subjects.BUCKET_STATUS, skip="mechapp."),  # per-app parts: not shown
        _bucket(bus, subjects.BUCKET_SCHED), _bucket(bus, subjects.BUCKET_LEASES),
        _bucket(bus, subjects.BUCKET_LEDGER))
    out: dict[str, Any] = {"apps": [], "clusters": [], "nodes": [], "policies": {},
                           "pairs": [], "mechanisms": {}, "claims": [], "services": [],
                           "telemetry": None, "leader": None, "set_aside": []}
    for key in sorted(desc):
        kind, _, name = key.partition(".")
        out.setdefault({"app": "apps", "cluster": "clusters", "node": "nodes"}.get(
            kind, "energy_profiles"), []).append(name)
    for key, raw in sorted(ctx.items()):
        rec = wire.CONTEXT_RECORD.decode(raw)
        policy, _, app = key.partition(".")
        out["pairs"].append({"policy": policy, "app": app, "last_verdict": rec.last_verdict,
                             "last_eval": rec.last_eval, "evaluations": rec.evaluations,
                             "in_flight": rec.inflight, "last_plan_id": rec.last_plan_id,
                             "noops": rec.noops, "status": rec.context.get("status")})
    for key, raw in sorted(status.items()):
        _status_entry(out, key, raw)
    for key, raw in sorted(sched.items()):
        _sched_entry(out, key, raw, ledger, bus.settings.exec_timeout)
    for key, raw in sorted(leases.items()):
        if key.startswith("svc."):
            out["services"].append(msgspec.to_builtins(wire.HEARTBEAT.decode(raw)))
        elif key == "leader.scheduler":
            out["leader"] = json.loads(raw).get("instance")
    return out


def _sched_entry(out: dict[str, Any], key: str, raw: bytes, ledger: dict[str, bytes],
                 exec_timeout: float) -> None:
    """A claim (held as the scheduler judges it) or a plan set aside."""
    try:
        if key.startswith("claim."):
            claim = wire.CLAIM.decode(raw)
            done = ledger.get(f"{claim.plan_id}.{claim.mechanism}")
            execution = wire.LEDGER.decode(done) if done is not None else None
            held = execution is None or (execution.state == "started" and
                                         execution.started_at + exec_timeout >= wire.now())
            out["claims"].append({**msgspec.to_builtins(claim), "held": held})
        elif key.startswith("aside."):
            out["set_aside"].append(msgspec.to_builtins(wire.SET_ASIDE.decode(raw)))
    except (msgspec.DecodeError, msgspec.ValidationError):
        out.setdefault("undecodable", []).append(f"{subjects.BUCKET_SCHED}:{key}")


def _status_entry(out: dict[str, Any], key: str, raw: bytes) -> None:
    if key.startswith("mech."):
        out["mechanisms"][key[5:]] = msgspec.to_builtins(wire.MECH_STATUS.decode(raw))
    elif key.startswith("plugin."):
        plugin = wire.PLUGIN_STATUS.decode(raw)
        entry = {"service": plugin.service, "loaded": plugin.loaded, "error": plugin.error}
        bucket = "policies" if plugin.kind == "policy" else "mechanism_plugins"
        out.setdefault(bucket, {}).setdefault(plugin.name, []).append(entry)
    elif key == "telemetry":
        out["telemetry"] = json.loads(raw)


async def status(args: argparse.Namespace, cfg: Settings) -> int:
    bus = await _connect(cfg)
    try:
        data = await collect_status(bus)
    finally:
        await bus.close()
    print(json.dumps(data, indent=2, default=str) if args.json else render_status(data))
    return 0


def render_status(d: dict[str, Any]) -> str:
    now = wire.now()
    lines = [f"applications: {', '.join(d['apps']) or '-'}",
             f"clusters:     {', '.join(d['clusters']) or '-'}",
             f"nodes:        {', '.join(d['nodes']) or '-'}", "services:"]
    for s in d["services"]:
        role = f" ({s['role']})" if s.get("role") else ""
        lines.append(f"  {s['service']:<10} {s['instance']}{role}")
    lines.append("policies:")
    for name, entries in sorted(d["policies"].items()):
        errors = {e["error"] for e in entries if e["error"]}
        state = "error: " + "; ".join(sorted(errors)) if errors else "loaded"
        lines.append(f"  {name:<24} {state}")
    for p in d["pairs"]:
        ago = f"{now - p['last_eval']:.0f}s ago" if p["last_eval"] else "never"
        flight = " plan in flight" if p["in_flight"] else ""
        lines.append(f"    {p['policy']} / {p['app']}: last verdict {p['last_verdict']} "
                     f"({ago}, {p['evaluations']} evaluations, {p['noops']} empty plans){flight}")
    lines.append("mechanisms:")
    for name, m in sorted(d["mechanisms"].items()):
        err = f" error: {m['error']}" if m.get("error") else ""
        err += f" not stored: {m['store_error']}" if m.get("store_error") else ""
        lines.append(f"  {name:<24} state={json.dumps(m['state'])[:100]}{err}")
    lines.append("claims:")
    for c in d["claims"]:
        if c["held"]:
            lines.append(f"  {c['mechanism']}[{c['conflict_key'] or '*'}] held by {c['plan_id']}")
    if d.get("set_aside"):
        lines.append("plans set aside (the scheduler could not handle them):")
        for a in d["set_aside"]:
            lines.append(f"  {a['plan_id']} ({a['policy']} / {a['app']}) after "
                         f"{a['attempts']} attempts: {a['reason']}")
    if d.get("undecodable"):
        lines.append(f"undecodable records: {', '.join(d['undecodable'])}")
    if d["telemetry"]:
        t = d["telemetry"]
        lines.append(f"telemetry: {json.dumps(t, default=str)[:300]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- plans
@dataclass
class Trace:
    plan_id: str
    app: str = ""
    policy: str = ""
    verdict_at: float | None = None
    plan_at: float | None = None
    commands: dict[str, Any] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"plan_id": self.plan_id, "app": self.app, "policy": self.policy,
                "verdict_at": self.verdict_at, "plan_at": self.plan_at,
                "mechanisms": sorted(self.commands), "decisions": self.decisions,
                "results": self.results}

    def render(self) -> str:
        def t(x: float | None) -> str:
            return time.strftime("%H:%M:%S", time.localtime(x)) + f".{int(x % 1 * 1000):03d}" \
                if x else "-"

        parts = [f"{self.plan_id} {self.app}/{self.policy} verdict {t(self.verdict_at)} "
                 f"plan {t(self.plan_at)}"]
        for mech in sorted(set(self.commands) | set(self.decisions)):
            d, r = self.decisions.get(mech), self.results.get(mech)
            line = f"  {mech}: " + (f"{d['outcome']} {t(d['decided_at'])}" if d else "pending")
            if d and d.get("reason"):
                line += f" ({d['reason']})"
            if r:
                line += f" -> {r['outcome']} {t(r['finished_at'])} in {r['duration'] * 1000:.0f} ms"
                if r.get("error"):
                    line += f": {r['error']}"
            parts.append(line)
        return "\n".join(parts)


class TraceBook:
    def __init__(self, app: str | None) -> None:
        self.app = app
        self.traces: dict[str, Trace] = {}
        self.verdicts: dict[str, float] = {}

    def add(self, subject: str, data: bytes, prefix: str) -> Trace | None:
        family = subject[len(prefix) + 1:].split(".", 1)[0]
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if family == "verdict":
            self.verdicts[obj.get("verdict_id", "")] = obj.get("created_at")
            return None
        plan_id = obj.get("plan_id")
        if not plan_id or family not in ("plan", "decision", "result"):
            return None
        trace = self.traces.setdefault(plan_id, Trace(plan_id))
        if family == "plan":
            trace.app, trace.policy = obj["app"], obj["policy"]
            trace.plan_at, trace.commands = obj["created_at"], obj.get("commands", {})
            trace.verdict_at = self.verdicts.get(obj.get("verdict_id", ""))
        elif family == "decision":
            trace.decisions[obj["mechanism"]] = obj
            trace.app = trace.app or obj.get("app", "")
        else:
            trace.results[obj["mechanism"]] = obj
        if self.app and trace.app and trace.app != self.app:
            return None
        return trace


async def plans(args: argparse.Namespace, cfg: Settings) -> int:
    bus = await _connect(cfg)
    book = TraceBook(args.app)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    subs = []
    try:
        for family, subject in (("verdicts", "verdict"), ("plans", "plan"),
                                ("events", "decision"), ("events", "result")):
            subs.append(await bus.js.subscribe(
                bus.subjects.wildcard(subject), stream=bus.subjects.stream(family),
                ordered_consumer=True, cb=queue.put,
                config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)))
        return await _follow(args, bus, book, queue)
    finally:
        await bus.close()


async def _follow(args: argparse.Namespace, bus: Bus, book: TraceBook,
                  queue: asyncio.Queue[Any]) -> int:
    deadline = time.monotonic() + args.wait if args.wait else None
    quiet_for = 0.5
    while True:
        timeout = quiet_for if deadline is None else max(0.05, min(quiet_for,
                                                                   deadline - time.monotonic()))
        try:
            msg = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            if args.wait:
                if any(t.plan_at for t in book.traces.values()
                       if not args.app or t.app == args.app):
                    _print_all(args, book)
                    return 0
                if time.monotonic() >= (deadline or 0):
                    print(f"mlsysops: no plan{' for ' + args.app if args.app else ''} "
                          f"within {args.wait:g}s")
                    return 1
                continue
            if not args.follow:
                _print_all(args, book)
                return 0
            continue
        trace = book.add(msg.subject, msg.data, bus.subjects.prefix)
        if args.follow and trace is not None:
            print(json.dumps(trace.as_dict()) if args.json else trace.render(), flush=True)


def _print_all(args: argparse.Namespace, book: TraceBook) -> None:
    traces = [t for t in book.traces.values() if not args.app or t.app == args.app]
    traces.sort(key=lambda t: t.plan_at or 0)
    if args.json:
        print(json.dumps([t.as_dict() for t in traces], indent=2))
    else:
        print("\n".join(t.render() for t in traces) or "no plans yet")


__all__ = ["collect_status", "plans", "status"]
