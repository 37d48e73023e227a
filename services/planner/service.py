"""Planner: runs the policy's ``plan`` once for each positive verdict.

Verdicts are consumed from a durable consumer shared by all planner replicas. The pair's
context record says whether a verdict still needs its plan (``inflight`` equals the
verdict id); a redelivered verdict finds it cleared and is simply acked. The new context
and the plan are stored in the record (the outbox) before the plan is published with its
id as ``Nats-Msg-Id``: a crash at any point either replays the stored plan (de-duplicated
by JetStream) or makes it for the first time, never twice. The record is released once
the scheduler has decided the plan: with plan()'s context if some command was scheduled,
with the context from before plan() if all were discarded (so a discarded plan changes
nothing), and with the decisions in ``context["_last_decision"]``.

A verdict names the version of the policy that made it (``policy_digest``). It is
planned by that version, or by a newer one: analyzer and planner pods see a ConfigMap
update at different times, and ``plan()`` of an older version may not understand a
context made by a newer ``analyze()``. A verdict made by a version this planner has not
loaded is nak'ed with a short delay (the pair stays in flight), for at most
``VERSION_WAIT`` seconds after the verdict was made; then it is planned with the version
loaded here, and that is reported. A verdict made by a version served here before (the
analyzer is the one behind) is planned at once by the loaded version. See
docs/policies.md, "Hot reload".
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import inbound, logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.consumer import consume
from mlsysops.errors import PluginError
from mlsysops.policies import check_context, check_plan, check_result, mechanisms_argument
from mlsysops.policyhost import PolicyHost
from mlsysops.state import StateView

log = logs.get(__name__)
ACK_WAIT = 5.0  # a verdict whose planner died comes back this soon (consume() keeps it alive)
DECISION_WAIT = 30.0  # how long a plan waits for its decisions before the verdict is naked
LAST_DECISION = "_last_decision"  # the context key where a policy finds it
VERSION_WAIT = 60.0  # how long after it was made a verdict may wait for its policy version
VERSION_RETRY = 1.0  # nak delay while it waits (policy files are rescanned every second)


class Planner:
    name = "planner"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.state = StateView(bus)
        self.host = PolicyHost(bus)
        self._waiting: dict[str, asyncio.Event] = {}  # plan id -> woken by its decisions

    def tasks(self) -> list[Any]:
        return [*self.state.tasks(), self.host.watch(), self._follow_decisions(),
                self._consume()]

    def ready(self) -> bool:
        return self.host.loaded.is_set()

    def close(self) -> None:
        self.host.directory.close()

    def role(self) -> str:
        return ""

    async def _consume(self) -> None:
        await self.host.loaded.wait()
        await self.state.wait_ready()
        await consume(self.bus, "verdicts", "planner", self.handle, ack_wait=ACK_WAIT)

    async def handle(self, msg: Msg) -> None:
        try:
            verdict = inbound.verdict(msg.subject, msg.data, self.bus.subjects)
        except inbound.Refused as exc:
            await self.bus.drop(msg, exc.message)
            return
        log_ = log.bind(policy=verdict.policy, app=verdict.app, verdict_id=verdict.verdict_id)
        kv = self.bus.kv(subjects.BUCKET_CONTEXT)
        key = wire.context_key(verdict.policy, verdict.app)
        try:
            entry = await kv.get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            await msg.ack()  # the application (and its context) is gone
            return
        revision, record = entry.revision or 0, wire.CONTEXT_RECORD.decode(entry.value or b"")
        if record.inflight != verdict.verdict_id:
            log_.debug("verdict already handled")
            await msg.ack()
            return
        plan = record.outbox_plan
        if plan is None or plan.verdict_id != verdict.verdict_id:
            if self._awaits_version(verdict):
                say = log_.info if _first_delivery(msg) else log_.debug
                say("verdict made by a version of the policy not loaded here yet; waiting "
                    "for it", verdict_digest=verdict.policy_digest)
                await msg.nak(delay=VERSION_RETRY)
                return
            made = await self._make_plan(verdict)
            if made is None:
                await self._release(key, revision, record, record.context, None)
                await msg.ack()
                return
            plan, context = made
            if not plan.commands:
                log_.info("plan is empty; nothing published")
                await self._release(key, revision, record, context, None)
                await msg.ack()
                return
            record = msgspec.structs.replace(record, context=context, outbox_plan=plan,
                                             prior_context=record.context)
            revision = await kv.update(key, wire.encode(record), last=revision)
        await self.bus.publish(self.bus.subjects.plan(plan.app, plan.policy), plan,
                               msg_id=plan.plan_id)
        log_.info("plan", plan_id=plan.plan_id, mechanisms=sorted(plan.commands))
        decided = await self._decisions(plan)
        if decided is None:  # no scheduler decided in time: keep it all and ask again later
            log_.warning("no decision on the plan yet; the verdict comes back",
                         plan_id=plan.plan_id)
            await msg.nak(delay=DECISION_WAIT)
            return
        context, last = _after_decision(record, plan, decided)
        await self._release(key, revision, record, {**context, LAST_DECISION: last},
                            plan.plan_id)
        await msg.ack()

    async def _decisions(self, plan: wire.Plan) -> wire.PlanDecisions | None:
        """The scheduler's stored decisions on ``plan``, once it has made them.

        Woken by the decision events; the stored record is what counts (the scheduler
        stores it before publishing anything). None after ``DECISION_WAIT`` seconds.
        """
        waiter = self._waiting.setdefault(plan.plan_id, asyncio.Event())
        deadline = asyncio.get_running_loop().time() + DECISION_WAIT
        try:
            while True:
                found = await self._stored_decisions(plan.plan_id)
                remaining = deadline - asyncio.get_running_loop().time()
                if found is not None or remaining <= 0:
                    return found
                waiter.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), min(1.0, remaining))
        finally:
            self._waiting.pop(plan.plan_id, None)

    async def _stored_decisions(self, plan_id: str) -> wire.PlanDecisions | None:
        try:
            entry = await self.bus.kv(subjects.BUCKET_SCHED).get(f"plan.{plan_id}")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return None
        return wire.PLAN_DECISIONS.decode(entry.value or b"")

    async def _follow_decisions(self) -> None:
        """Wake the plans waiting for their decisions as the scheduler announces them."""
        sub = await self.bus.nc.subscribe(  # type: ignore[union-attr]
            self.bus.subjects.wildcard("decision"))
        async for msg in sub.messages:
            try:
                plan_id = wire.EVENT.decode(msg.data).plan_id  # type: ignore[union-attr]
            except Exception:
                continue
            waiter = self._waiting.get(plan_id)
            if waiter is not None:
                waiter.set()

    def _awaits_version(self, verdict: wire.Verdict) -> bool:
        """Whether ``verdict`` should wait for the policy version that made it.

        Only for a version never served here (an older one will not come back), and for
        ``VERSION_WAIT`` seconds after the verdict was made; a verdict of an older
        analyzer names no version and never waits.
        """
        made_by = verdict.policy_digest
        policy = self.host.get(verdict.policy)
        if not made_by or (policy is not None and policy.plugin.digest == made_by):
            return False
        if self.host.served(verdict.policy, made_by):
            return False
        return wire.now() - verdict.created_at < VERSION_WAIT

    async def _version_mismatch(self, verdict: wire.Verdict, planned_by: str) -> None:
        """Record that ``verdict`` is planned by another version than the one that made it."""
        made_by = verdict.policy_digest
        log_ = log.bind(policy=verdict.policy, app=verdict.app, verdict_id=verdict.verdict_id,
                        verdict_digest=made_by, plan_digest=planned_by)
        if self.host.served(verdict.policy, made_by):
            log_.info("verdict made by an earlier version of the policy; planned by the "
                      "version loaded here")
            return
        message = (f"plan made by version {planned_by} of the policy for a verdict made by "
                   f"version {made_by}, which this planner did not load within "
                   f"{VERSION_WAIT:g}s of the verdict")
        log_.warning(message)
        await self.bus.report(wire.ErrorEvent(
            kind="policy", name=verdict.policy, app=verdict.app, message=message,
            details={"verdict_id": verdict.verdict_id, "verdict_digest": made_by,
                     "plan_digest": planned_by}))

    async def _make_plan(self, verdict: wire.Verdict) -> tuple[wire.Plan, dict[str, Any]] | None:
        policy = self.host.get(verdict.policy)
        if policy is not None and policy.quarantined:
            return None  # reported when it was quarantined; runs again when its file changes
        if policy is None:
            await self.bus.report(wire.ErrorEvent(
                kind="policy", name=verdict.policy, app=verdict.app,
                message="verdict dropped: the policy is not loaded in the planner"))
            return None
        apps = self.state.app_description(verdict.app)
        if not apps and verdict.app != subjects.GLOBAL_APP:
            return None  # the application was deleted since the verdict
        if verdict.policy_digest and verdict.policy_digest != policy.plugin.digest:
            await self._version_mismatch(verdict, policy.plugin.digest)
        mechanisms = mechanisms_argument(self.state.mechanisms(verdict.app), policy.settings)
        args = (verdict.context, apps, self.state.system_description(), mechanisms,
                self.state.telemetry(), self.bus.settings.ml_connector_url or None)
        try:
            result = await policy.plugin.call("plan", *args,
                                              timeout=self.bus.settings.call_timeout)
            commands, context = check_result(policy.name, "plan", result)
            commands = check_plan(policy.name, commands)
            check_context(policy.name, context, what="plan()")
        except PluginError as exc:
            await self.host.failed(policy, verdict.app, "plan", exc)
            return None
        await self.host.succeeded(policy)
        plan = wire.Plan(plan_id="p-" + verdict.verdict_id.partition("-")[2], app=verdict.app,
                         policy=verdict.policy, created_at=wire.now(), commands=commands,
                         core=policy.settings.core, verdict_id=verdict.verdict_id)
        return plan, context

    async def _release(self, key: str, revision: int, record: wire.ContextRecord,
                       context: dict[str, Any], plan_id: str | None) -> None:
        released = msgspec.structs.replace(
            record, context=context, inflight=None, inflight_since=0.0, outbox_plan=None,
            outbox_verdict=None, prior_context=None, last_plan_id=plan_id or record.last_plan_id,
            noops=record.noops + (plan_id is None))
        try:
            await self.bus.kv(subjects.BUCKET_CONTEXT).update(key, wire.encode(released),
                                                              last=revision)
        except jserr.KeyWrongLastSequenceError:
            log.warning("context changed while planning; release skipped", key=key)


def _first_delivery(msg: Msg) -> bool:
    try:
        return (msg.metadata.num_delivered or 1) <= 1
    except Exception:  # not a JetStream message (a test's): say it
        return True


def _after_decision(record: wire.ContextRecord, plan: wire.Plan,
                    decided: wire.PlanDecisions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The context to keep and what the policy is told of the decisions on its plan.

    plan()'s context is committed if at least one command was scheduled; if every one
    was discarded, the context from before plan() is kept, so the pair is analysed again
    as if the plan had not been made.
    """
    by_mechanism = {d.mechanism: {"outcome": d.outcome, "reason": d.reason,
                                  "holder": d.holder} for d in decided.decisions}
    outcomes = {d["outcome"] for d in by_mechanism.values()}
    outcome = ("scheduled" if outcomes == {"scheduled"} else
               "discarded" if "scheduled" not in outcomes else "partial")
    committed = outcome != "discarded" or record.prior_context is None
    context = record.context if committed else record.prior_context
    last = {"plan_id": plan.plan_id, "outcome": outcome, "committed": committed,
            "mechanisms": by_mechanism}
    return dict(context or {}), last
