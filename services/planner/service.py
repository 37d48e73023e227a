"""Planner: runs the policy's ``plan`` once for each positive verdict.

Verdicts are consumed from a durable consumer shared by all planner replicas. The pair's
context record says whether a verdict still needs its plan (``inflight`` equals the
verdict id); a redelivered verdict finds it cleared and is simply acked. The new context
and the plan are stored in the record (the outbox) before the plan is published with its
id as ``Nats-Msg-Id``, then the record is released: a crash at any point either replays
the stored plan (de-duplicated by JetStream) or makes it for the first time, never twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import inbound, logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.consumer import consume, keep_alive
from mlsysops.errors import PluginError
from mlsysops.policies import check_context, check_plan, check_result
from mlsysops.policyhost import PolicyHost
from mlsysops.state import StateView

log = logs.get(__name__)
ACK_WAIT = 5.0  # a verdict whose planner died comes back this soon (kept alive meanwhile)


class Planner:
    name = "planner"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.state = StateView(bus)
        self.host = PolicyHost(bus)

    def tasks(self) -> list[Any]:
        return [*self.state.tasks(), self.host.watch(), self._consume()]

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
            made = await self._make_plan(verdict, msg)
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
            record = msgspec.structs.replace(record, context=context, outbox_plan=plan)
            revision = await kv.update(key, wire.encode(record), last=revision)
        await self.bus.publish(self.bus.subjects.plan(plan.app, plan.policy), plan,
                               msg_id=plan.plan_id)
        log_.info("plan", plan_id=plan.plan_id, mechanisms=sorted(plan.commands))
        await self._release(key, revision, record, record.context, plan.plan_id)
        await msg.ack()

    async def _make_plan(self, verdict: wire.Verdict,
                         msg: Msg) -> tuple[wire.Plan, dict[str, Any]] | None:
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
        args = (verdict.context, apps, self.state.system_description(), self.state.mechanisms(),
                self.state.telemetry(), self.bus.settings.ml_connector_url or None)
        try:
            keepalive = asyncio.ensure_future(keep_alive(msg, ACK_WAIT / 3))
            try:
                result = await policy.plugin.call("plan", *args,
                                                  timeout=self.bus.settings.call_timeout)
            finally:
                keepalive.cancel()
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
            outbox_verdict=None, last_plan_id=plan_id or record.last_plan_id,
            noops=record.noops + (plan_id is None))
        try:
            await self.bus.kv(subjects.BUCKET_CONTEXT).update(key, wire.encode(released),
                                                              last=revision)
        except jserr.KeyWrongLastSequenceError:
            log.warning("context changed while planning; release skipped", key=key)
