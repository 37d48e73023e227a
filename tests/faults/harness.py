"""Load, recording and checking for the fault tests.

A fault test runs the loop as real processes (``process_loop``) under a steady load:
several applications, an always-yes policy per application at a short interval whose
conflict key is the application, telemetry snapshots published on
``mlsysops.telemetry.test`` and new descriptions published during the run. The recording
mechanism ``rec`` writes one JSON line per finished ``apply`` (with the command's
``_plan_id`` and the start and end time) and one line per started ``apply`` to a second
file, so a test can check, across processes and kills, that every plan the scheduler
acked was applied exactly once.

The trace is read back from the streams (ordered consumers), never from core
subscriptions, which also see the copies that JetStream de-duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.api as api

from mlsysops import settings as settings_mod
from mlsysops import wire
from tests import loopkit as kit

# Short deadlines so that a fault shows within seconds (the suite runs on 2 cores).
FAST = {
    "call_timeout": 2.0,      # planner ack wait = 2 x 2 + 10 = 14 s
    "apply_timeout": 2.0,
    "exec_timeout": 8.0,      # a claim whose execution never ends is released after 8 s
    "quarantine_after": 3,
    "status_interval": 1.0,
}

INTERRUPTED = "interrupted"


def fast(cfg: settings_mod.Settings, **overrides: Any) -> settings_mod.Settings:
    return dataclasses.replace(cfg, **{**FAST, **overrides})


# --------------------------------------------------------------------------- plugins
REC = '''
import asyncio, json, os, time
LOG = {log!r}
STARTS = {starts!r}

def conflict_key(command):
    return command.get("key", "") if isinstance(command, dict) else ""

async def apply(command):
    t0 = time.time()
    with open(STARTS, "a") as f:
        f.write(json.dumps({{"plan_id": command.get("_plan_id"), "t0": t0,
                             "pid": os.getpid()}}) + "\\n")
    if command.get("sleep"):
        await asyncio.sleep(command["sleep"])
    with open(LOG, "a") as f:
        f.write(json.dumps({{"command": command, "t0": t0, "t": time.time(),
                             "pid": os.getpid()}}) + "\\n")

def get_status():
    return {{"ok": True}}
'''

# Says yes at every interval, for every application; the command's conflict key is the
# application, and it carries the newest value of the test telemetry it saw.
STEADY = '''
def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}}, "mechanisms": ["{mechanism}"]}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    context["n"] = context.get("n", 0) + 1
    return True, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]["name"]
    load = (telemetry.get("latest") or {{}}).get("test_load") or [{{}}]
    return {{"{mechanism}": {{"app": app, "key": app, "policy": "{name}", "n": context["n"],
                             "load": load[0].get("value"), "sleep": {sleep}}}}}, context
'''


@dataclass
class Recorder:
    log: Path
    starts: Path

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a SIGKILL
                out.append(json.loads(line))
        return out

    def lines(self) -> list[dict[str, Any]]:
        return self._read(self.log)

    def started(self) -> list[dict[str, Any]]:
        return self._read(self.starts)

    def counts(self) -> Counter[str]:
        return Counter(str(r["command"].get("_plan_id")) for r in self.lines())

    def first_after(self, since: float) -> float | None:
        times = [r["t"] for r in self.lines() if r["t"] > since]
        return min(times) - since if times else None

    def apps_after(self, since: float, *, started: bool = False) -> dict[str, float]:
        """Per application, seconds from ``since`` to its first apply finished after it
        (``started``: to the end of its first apply that started after it)."""
        out: dict[str, float] = {}
        for r in self.lines():
            if r["t0" if started else "t"] > since:
                app = r["command"].get("app")
                out[app] = min(out.get(app, float("inf")), r["t"] - since)
        return out


def recorder(mechanisms: Path, name: str = "rec") -> Recorder:
    rec = Recorder(mechanisms.parent / f"{name}.jsonl", mechanisms.parent / f"{name}.starts")
    (mechanisms / f"{name}.py").write_text(REC.format(log=str(rec.log), starts=str(rec.starts)))
    return rec


def steady_policy(policies: Path, name: str = "steady", *, mechanism: str = "rec",
                  interval: str = "300ms", sleep: float = 0.1) -> Path:
    path = policies / f"policy-{name}.py"
    path.write_text(STEADY.format(name=name, mechanism=mechanism, interval=interval,
                                  sleep=sleep))
    return path


# --------------------------------------------------------------------------- load
def servers(url: str) -> list[str]:
    """The URLs of a comma-separated list (``MLSYSOPS_NATS_URL`` of a cluster)."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(url: str) -> Any:
    """A test client that, like the services, reconnects for ever (to any listed server)."""
    return await nats.connect(servers(url), max_reconnect_attempts=-1,
                              reconnect_time_wait=0.2, connect_timeout=2)


class Load:
    """Telemetry snapshots and new descriptions, published for as long as it runs."""

    def __init__(self, url: str, *, telemetry_every: float = 0.25, app_every: float = 2.0,
                 new_apps: int = 6, prefix: str = "late") -> None:
        self.url = url
        self.telemetry_every, self.app_every = telemetry_every, app_every
        self.new_apps, self.prefix = new_apps, prefix
        self.accepted: dict[str, float] = {}   # application -> when the monitor accepted it
        self.refused: list[str] = []           # attempts without a reply (monitor or broker down)
        self.telemetry_sent = self.telemetry_failed = 0
        self.last_load = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.nc: Any = None

    async def start(self) -> None:
        self.nc = await connect(self.url)
        self._tasks = [asyncio.ensure_future(self._telemetry()),
                       asyncio.ensure_future(self._descriptions())]

    async def stop(self) -> None:
        """Stop publishing and disconnect (safe to call twice)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    async def _telemetry(self) -> None:
        js = self.nc.jetstream(timeout=1)
        i = 0
        while True:
            i += 1
            snap = wire.Telemetry(id=f"test-{time.time_ns()}", source="test",
                                  collected_at=wire.now(),
                                  samples=[wire.Sample("test_load", float(i))])
            try:
                await js.publish("mlsysops.telemetry.test", wire.encode(snap),
                                 headers={"Nats-Msg-Id": snap.id})
                self.telemetry_sent += 1
                self.last_load = float(i)
            except Exception:
                self.telemetry_failed += 1
            await asyncio.sleep(self.telemetry_every)

    async def _descriptions(self) -> None:
        k = 0
        while k < self.new_apps:
            await asyncio.sleep(self.app_every)
            name = f"{self.prefix}-{k}"
            if await self.publish(name):
                k += 1

    async def publish(self, name: str, timeout: float = 2.0) -> bool:
        """One attempt; True when the monitor answered that it accepted the description."""
        try:
            msg = await self.nc.request(f"mlsysops.desc.app.{name}", kit.app_doc(name),
                                        timeout=timeout)
            reply = json.loads(msg.data)
        except Exception:
            self.refused.append(name)
            return False
        if reply.get("accepted"):
            self.accepted[name] = time.time()
            return True
        raise AssertionError(f"description {name} rejected: {reply}")


# --------------------------------------------------------------------------- the trace
async def read_stream(js: Any, stream: str, subject: str,
                      timeout: float = 20) -> list[tuple[int, dict[str, Any]]]:
    """Every message the stream keeps on ``subject``: (stream sequence, JSON body)."""
    info = await js.stream_info(stream, subjects_filter=subject)
    if not sum((info.state.subjects or {}).values()):
        return []
    out: list[tuple[int, dict[str, Any]]] = []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                             deliver_policy=api.DeliverPolicy.ALL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            body = json.loads(msg.data)
            body["subject"] = msg.subject
            body["_stored_at"] = msg.metadata.timestamp.timestamp()  # when the stream took it
            out.append((msg.metadata.sequence.stream, body))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


@dataclass
class Trace:
    plans: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    decisions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def scheduled(self, mechanism: str = "rec") -> dict[str, dict[str, Any]]:
        return {d["plan_id"]: d for _, d in self.decisions
                if d["mechanism"] == mechanism and d["outcome"] == "scheduled"}

    def decided(self) -> set[str]:
        return {d["plan_id"] for _, d in self.decisions}


async def read_trace(url: str, mechanism: str = "rec", *, errors: bool = False) -> Trace:
    nc = await nats.connect(servers(url))
    try:
        js = nc.jetstream(timeout=5)
        trace = Trace()
        trace.plans = await read_stream(js, "MLSYSOPS_PLANS", "mlsysops.plan.>")
        trace.decisions = await read_stream(js, "MLSYSOPS_EVENTS", "mlsysops.decision.>")
        results = await read_stream(js, "MLSYSOPS_EVENTS", f"mlsysops.result.{mechanism}")
        for _, r in results:
            assert r["plan_id"] not in trace.results, f"two results for {r['plan_id']}"
            trace.results[r["plan_id"]] = r
        if errors:
            trace.errors = [e for _, e in await read_stream(js, "MLSYSOPS_EVENTS",
                                                            "mlsysops.error.>")]
        return trace
    finally:
        await nc.close()


def exactly_once(trace: Trace, rec: Recorder, mechanism: str = "rec") -> tuple[list[str], dict]:
    """Problems with "every acked plan applied exactly once", and a summary."""
    problems: list[str] = []
    scheduled = trace.scheduled(mechanism)
    counts = rec.counts()
    interrupted = applied_anyway = 0
    for plan_id in scheduled:
        result = trace.results.get(plan_id)
        n = counts.get(plan_id, 0)
        if result is None:
            problems.append(f"{plan_id}: scheduled but no result (lost)")
        elif result["outcome"] == "applied":
            if n != 1:
                problems.append(f"{plan_id}: result applied but recorded {n} times")
        elif result["outcome"] == "unknown":  # interrupted, or abandoned at its deadline
            interrupted += INTERRUPTED in result["error"]
            applied_anyway += n
            if n > 1:
                problems.append(f"{plan_id}: outcome unknown but recorded {n} times")
        elif n:
            problems.append(f"{plan_id}: failed ({result['error']}) but recorded {n} times")
    for plan_id in trace.results.keys() - scheduled.keys():
        problems.append(f"{plan_id}: a result without a scheduled decision")
    for plan_id, n in counts.items():
        if plan_id not in scheduled:
            problems.append(f"{plan_id}: applied {n} times without a scheduled decision")
        elif n > 1:
            problems.append(f"{plan_id}: applied {n} times")
    summary = {"plans": len(trace.plans), "scheduled": len(scheduled),
               "applied": sum(counts.values()), "interrupted": interrupted,
               "interrupted but applied": applied_anyway,
               "discarded": sum(d["outcome"] == "discarded" for _, d in trace.decisions)}
    return problems, summary


def decided_in_stream_order(trace: Trace) -> list[str]:
    """Problems: a plan with no decision, or decisions not in the plans' stream order."""
    problems = []
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for seq, d in trace.decisions:
        first.setdefault(d["plan_id"], (seq, d))
    missing = [p["plan_id"] for _, p in trace.plans if p["plan_id"] not in first]
    if missing:
        problems.append(f"{len(missing)} plans never decided: {missing[:5]}")
    decided = [(pseq, p, *first[p["plan_id"]]) for pseq, p in trace.plans
               if p["plan_id"] in first]
    for (pseq0, p0, dseq0, d0), (pseq1, p1, dseq1, d1) in itertools.pairwise(decided):
        if dseq1 < dseq0:
            problems.append(
                f"plan {p1['plan_id']} (plans seq {pseq1}, {p1['app']}) was decided at "
                f"{d1['decided_at']:.3f} (events seq {dseq1}) before plan {p0['plan_id']} "
                f"(plans seq {pseq0}, {p0['app']}) ahead of it, decided at "
                f"{d0['decided_at']:.3f} (events seq {dseq0})")
    return problems


def conflicts(trace: Trace, rec: Recorder, exec_timeout: float,
              mechanism: str = "rec") -> list[str]:
    """Problems with "first plan per conflict key wins until its execution ends".

    Per conflict key: a plan is scheduled only once the execution scheduled before it
    ended (or its claim expired: ``exec_timeout`` after that execution started), so two
    executions never overlap; a ``discarded``
    decision names as holder a plan scheduled on the same key, ahead of it in the plans
    stream or decided before it, whose claim had not expired and whose execution the
    executor had not yet recorded as ended (in the ledger, which the executor writes after
    the result's ``finished_at`` and before publishing the result: the result's stream
    timestamp bounds it).
    """
    problems: list[str] = []
    runs = {r["command"]["_plan_id"]: (r["t0"], r["t"]) for r in rec.lines()}
    position = {p["plan_id"]: seq for seq, p in trace.plans}
    inf = float("inf")

    def recorded_end(plan_id: str) -> float:  # as the scheduler can know it
        # the executor writes the ledger after finished_at and before it publishes the
        # result: the result's stream timestamp bounds it (a write retried across a
        # NATS node failure can come seconds after finished_at)
        result = trace.results.get(plan_id)
        if not result:
            return inf
        return float(result.get("_stored_at") or result["finished_at"])

    def started(plan_id: str) -> float:  # a claim runs out --exec-timeout after this
        if plan_id in runs:
            return runs[plan_id][0]
        result = trace.results.get(plan_id)  # ended without a line: interrupted or failed
        return float(result["finished_at"]) - float(result.get("duration") or 0) if result \
            else inf

    def actual_end(plan_id: str) -> float:  # when apply really returned
        return runs[plan_id][1] if plan_id in runs else recorded_end(plan_id)

    by_key: dict[str, list[dict[str, Any]]] = {}
    for _, d in trace.decisions:
        if d["mechanism"] == mechanism:
            by_key.setdefault(d["conflict_key"], []).append(d)
    slack = 1.0  # the scheduler reads the ledger just after stamping decided_at
    for key, decisions in by_key.items():
        scheduled = {d["plan_id"]: d for d in decisions if d["outcome"] == "scheduled"}
        last: dict[str, Any] | None = None
        for d in sorted(decisions, key=lambda d: d["decided_at"]):
            if d["outcome"] == "discarded":
                holder = scheduled.get(d["holder"] or "")
                if holder is None:
                    problems.append(f"{key}: {d['plan_id']} discarded naming {d['holder']}, "
                                    "which was not scheduled on that key")
                    continue
                ahead = (position.get(holder["plan_id"], 0) < position.get(d["plan_id"], 0)
                         or holder["decided_at"] < d["decided_at"])
                ended = recorded_end(holder["plan_id"])
                expired = d["decided_at"] > started(holder["plan_id"]) + exec_timeout + slack
                if not ahead or expired or ended < d["decided_at"] - slack:
                    problems.append(f"{key}: {d['plan_id']} discarded at {d['decided_at']:.3f} "
                                    f"naming {holder['plan_id']} (ahead: {ahead}, claim "
                                    f"expired: {expired}), whose execution was recorded "
                                    f"ended by {ended:.3f}")
                continue
            if last is not None:
                held_until = actual_end(last["plan_id"])
                expired = d["decided_at"] >= started(last["plan_id"]) + exec_timeout
                if not expired and held_until >= d["decided_at"] + slack:
                    problems.append(f"{key}: {d['plan_id']} scheduled at {d['decided_at']:.3f} "
                                    f"while {last['plan_id']} held it until {held_until:.3f}")
                mine = runs.get(d["plan_id"])
                if mine and not expired and mine[0] < held_until:
                    problems.append(f"{key}: executions of {last['plan_id']} and "
                                    f"{d['plan_id']} overlap")
            last = d
    return problems


async def drain(url: str, rec: Recorder, policy_files: list[Path],
                timeout: float = 50) -> Trace:
    """Stop the policies, then wait until every plan is decided and every acked one ended."""
    for path in policy_files:
        path.unlink(missing_ok=True)
    await asyncio.sleep(2.5)  # rescans (1 s) and what was in flight
    deadline = time.monotonic() + timeout
    last_plans = -1
    while True:
        trace = await read_trace(url)
        open_ = [p for p in trace.scheduled() if p not in trace.results]
        undecided = {p["plan_id"] for _, p in trace.plans} - trace.decided()
        if not open_ and not undecided and len(trace.plans) == last_plans:
            return trace
        last_plans = len(trace.plans)
        if time.monotonic() > deadline:
            return trace  # the checks name what is missing
        await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- processes
def spawn(process_loop: Any, key: str, service: str, instance: str) -> None:
    """One more replica of ``service``, stopped with the others at teardown."""
    env = process_loop.env(service)
    env["MLSYSOPS_INSTANCE"] = instance
    with open(process_loop.logdir / f"{key}.log", "ab") as log:
        process_loop.procs[key] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env, stdout=log, stderr=log)


def assert_alive(process_loop: Any) -> None:
    dead = {k: p.returncode for k, p in process_loop.procs.items() if p.poll() is not None}
    assert not dead, f"services exited by themselves: {dead}\n{process_loop.logs()}"


async def wait_apps(rec: Recorder, apps: set[str], since: float, timeout: float) -> None:
    await kit.wait_for(lambda: apps <= set(rec.apps_after(since)), timeout=timeout,
                       what=f"an apply for each of {sorted(apps)}")


def report(title: str, rows: dict[str, Any]) -> None:
    """Print the figures (pytest -s shows them) in one greppable block."""
    print(f"\n[faults] {title}")
    for key, value in rows.items():
        print(f"[faults]   {key}: {value}")
