"""Plan Scheduler: strictly ordered, first plan per mechanism wins.

One replica is active at a time: it holds a lease (a KV key with a TTL that it renews);
standbys retry to take the lease and the first to succeed becomes active when the holder
dies. The active replica consumes plans in stream order. For each (mechanism, command)
of a plan it computes the mechanism's conflict key; if no earlier plan holds that key
(a claim whose execution has no terminal result in the executor ledger and has not
expired), it claims it and publishes the execution request, else it discards the entry
naming the holder. Plans of ``core`` policies are never discarded: they take the claim.

Decisions are stored per plan before anything is published, so a redelivered plan is
decided the same way and its requests and decisions are re-published with the same
``Nats-Msg-Id`` (dropped as duplicates by JetStream).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.api as api
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import http, inbound, logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import PluginError
from mlsysops.mechhost import MechanismHost, claim_key

log = logs.get(__name__)

LEASE_KEY = "leader.scheduler"
LEASE_TTL = 5.0
RENEW_EVERY = 1.0
DECISIONS_TTL = 7 * 86400.0


class Scheduler:
    name = "scheduler"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.mechanisms = MechanismHost(bus)
        self.active = False

    def tasks(self) -> list[Any]:
        return [self.mechanisms.watch(), self._lead()]

    def ready(self) -> bool:
        return self.mechanisms.loaded.is_set()

    def close(self) -> None:
        self.mechanisms.directory.close()

    def role(self) -> str:
        return "active" if self.active else "standby"

    # ------------------------------------------------------------ leadership
    async def _lead(self) -> None:
        await self.mechanisms.loaded.wait()
        value = wire.encode({"instance": self.bus.instance})
        while True:
            try:
                revision = await self._take_lease(value)
            except Exception:
                await asyncio.sleep(RENEW_EVERY)
                continue
            log.info("scheduler is active")
            self.active = True
            worker = asyncio.ensure_future(self._consume())
            try:
                while True:
                    await asyncio.sleep(RENEW_EVERY)
                    revision = await self.bus.put_with_ttl(
                        subjects.BUCKET_LEASES, LEASE_KEY, value, LEASE_TTL, last=revision)
                    if worker.done():  # a transient error (broker away): start again, still
                        log.warning("scheduler worker stopped; restarting",  # holding the lease
                                    error=repr(worker.exception()) if not worker.cancelled()
                                    else "cancelled")
                        worker = asyncio.ensure_future(self._consume())
            except Exception as exc:
                log.warning("scheduler lease lost; standing by", error=repr(exc))
            finally:
                self.active = False
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)

    async def _take_lease(self, value: bytes) -> int:
        """Create the lease; also over a delete marker left by an operator's ``kv del``."""
        try:
            return await self.bus.put_with_ttl(subjects.BUCKET_LEASES, LEASE_KEY, value,
                                               LEASE_TTL, last=0)
        except jserr.KeyWrongLastSequenceError:
            try:
                await self.bus.kv(subjects.BUCKET_LEASES).get(LEASE_KEY)
            except (jserr.KeyDeletedError, jserr.KeyNotFoundError) as gone:
                entry = getattr(gone, "entry", None)
                if entry is None or not entry.revision:
                    raise
                return await self.bus.put_with_ttl(subjects.BUCKET_LEASES, LEASE_KEY, value,
                                                   LEASE_TTL, last=entry.revision)
            raise  # held by a live replica

    # ------------------------------------------------------------ ordered consumption
    async def _consume(self) -> None:
        config = api.ConsumerConfig(
            durable_name="scheduler", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=LEASE_TTL,
            # one plan at a time: a plan held by a replica that lost its lease must come
            # back before any later plan is decided, or order breaks on failover
            max_ack_pending=1, deliver_policy=api.DeliverPolicy.ALL)
        sub = await self.bus.js.pull_subscribe("", durable="scheduler",
                                               stream=self.bus.subjects.stream("plans"),
                                               config=config)
        while True:
            try:
                batch = await sub.fetch(1, timeout=2)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for i, msg in enumerate(batch):
                try:
                    await self.handle(msg)
                except Exception:
                    for rest in batch[i:]:  # keep the order: everything from here comes back
                        await rest.nak()
                    raise

    async def handle(self, msg: Msg) -> None:
        started = asyncio.get_running_loop().time()
        try:
            plan = inbound.plan(msg.subject, msg.data, self.bus.subjects)
        except inbound.Refused as exc:
            await self.bus.drop(msg, exc.message)
            return
        # only a redelivered plan can have been decided before (by us or a dead leader)
        redelivered = msg.metadata.num_delivered is None or msg.metadata.num_delivered > 1
        stored = await self._stored(plan.plan_id) if redelivered else None
        outcome = stored if stored is not None else await self.decide(plan)
        # claims are written by decide(); the decisions record, the requests and the
        # decisions go out together, and the plan is acked once all of them are stored.
        # Deciding a plan again (say, a copy published under another message id) gives
        # requests with the same ids, which JetStream drops, and the ledger applies once.
        record = () if stored is not None else (self.bus.put_with_ttl(
            subjects.BUCKET_SCHED, f"plan.{plan.plan_id}", wire.encode(outcome), DECISIONS_TTL),)
        await asyncio.gather(
            *record,
            *(self.bus.publish(self.bus.subjects.exec(r.mechanism), r, msg_id=r.exec_id)
              for r in outcome.requests),
            *(self.bus.publish(self.bus.subjects.decision(d.mechanism), d,
                               msg_id=f"d-{plan.plan_id}.{d.mechanism}")
              for d in outcome.decisions))
        if outcome.requests:
            await msg.ack()  # a lost ack only means a redelivery, decided the same way
        else:
            await msg.term()
        http.LATENCY.labels("scheduler", "plan").observe(
            asyncio.get_running_loop().time() - started)
        http.MESSAGES.labels("scheduler", "plan").inc()

    async def _stored(self, plan_id: str) -> wire.PlanDecisions | None:
        try:
            entry = await self.bus.kv(subjects.BUCKET_SCHED).get(f"plan.{plan_id}")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return None
        return wire.PLAN_DECISIONS.decode(entry.value or b"")

    # ------------------------------------------------------------ the rule
    async def decide(self, plan: wire.Plan) -> wire.PlanDecisions:
        out = wire.PlanDecisions(plan_id=plan.plan_id)
        for mechanism, command in plan.commands.items():
            decision = wire.Decision(plan_id=plan.plan_id, mechanism=mechanism,
                                     outcome="discarded", app=plan.app, policy=plan.policy,
                                     decided_at=wire.now())
            try:
                await self._decide_one(plan, mechanism, command, decision)
            except PluginError as exc:
                decision.reason = exc.message
            if decision.outcome == "scheduled":
                out.requests.append(wire.ExecRequest(
                    exec_id=f"{plan.plan_id}.{mechanism}", plan_id=plan.plan_id,
                    mechanism=mechanism, command=command, app=plan.app, policy=plan.policy,
                    conflict_key=decision.conflict_key, scheduled_at=decision.decided_at))
            log.info("decision", plan_id=plan.plan_id, mechanism=mechanism,
                     outcome=decision.outcome, reason=decision.reason)
            out.decisions.append(decision)
        return out

    async def _decide_one(self, plan: wire.Plan, mechanism: str, command: Any,
                          decision: wire.Decision) -> None:
        plugin = self.mechanisms.get(mechanism)
        if plugin is None:
            known = ", ".join(self.mechanisms.names()) or "none"
            decision.reason = f"mechanism {mechanism!r} is not loaded (loaded: {known})"
            return
        decision.conflict_key = await self.mechanisms.conflict_key(plugin, command)
        key = claim_key(mechanism, decision.conflict_key)
        revision, holder = await self._holder(key, mechanism)
        if holder is not None and holder.plan_id != plan.plan_id:
            decision.holder = holder.plan_id
            if not plan.core:
                decision.reason = (f"{mechanism} is held by plan {holder.plan_id} until its "
                                   "execution ends")
                return
            decision.reason = f"core plan preempted plan {holder.plan_id}"
        now = wire.now()
        claim = wire.Claim(plan_id=plan.plan_id, mechanism=mechanism,
                           conflict_key=decision.conflict_key, since=now,
                           expires_at=now + self.bus.settings.exec_timeout)
        kv = self.bus.kv(subjects.BUCKET_SCHED)
        if revision:
            await kv.update(key, wire.encode(claim), last=revision)
        else:
            await kv.create(key, wire.encode(claim))
        decision.outcome = "scheduled"

    async def _holder(self, key: str, mechanism: str) -> tuple[int, wire.Claim | None]:
        """The live claim on ``key`` (None when free) and the revision to replace it."""
        try:
            entry = await self.bus.kv(subjects.BUCKET_SCHED).get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return 0, None
        claim = wire.CLAIM.decode(entry.value or b"")
        revision = entry.revision or 0
        if claim.expires_at < wire.now():
            return revision, None
        try:
            ledger = await self.bus.kv(subjects.BUCKET_LEDGER).get(f"{claim.plan_id}.{mechanism}")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return revision, claim
        done = wire.LEDGER.decode(ledger.value or b"").state in ("applied", "failed", "unknown")
        return revision, None if done else claim
