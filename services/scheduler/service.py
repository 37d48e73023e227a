"""Plan Scheduler: strictly ordered, first plan per conflict key wins.

One replica is active at a time: it holds a lease (a KV key with a TTL that it renews);
standbys retry to take the lease and the first to succeed becomes active when the holder
dies. The active replica consumes plans in stream order, one at a time. For each
(mechanism, command) of a plan it asks the mechanism for the command's conflict keys; if
no earlier plan holds one of them (a claim whose execution has no terminal result in the
executor ledger, and did not start more than ``--exec-timeout`` ago), it claims them all
and schedules the command, else it discards the entry naming the holder. Plans of
``core`` policies are never discarded: they take the claims. A plan for an application
that no longer has a description is discarded.

Claims are written first, then the plan's decisions are stored, and only then are the
requests and decisions published: a redelivered plan is decided the same way, and its
requests and decisions are re-published with the same ``Nats-Msg-Id`` (dropped as
duplicates by JetStream). A plan whose handling keeps raising is set aside after
``MAX_ATTEMPTS`` deliveries, with its reason, so that one bad plan never stops the stream.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import nats.errors
import nats.js.api as api
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import http, inbound, logs, subjects, wire
from mlsysops.bus import Bus, KVCache
from mlsysops.errors import PluginError
from mlsysops.lease import Lease
from mlsysops.mechhost import MechanismHost, claim_key
from mlsysops.state import desc_key

log = logs.get(__name__)
T = TypeVar("T")

LEASE_KEY = "leader.scheduler"
LEASE_TTL = 5.0
RENEW_EVERY = 1.0
MAX_ATTEMPTS = 5  # deliveries of a plan whose handling raises before it is set aside
# errors that say the broker is away (not that the plan is bad): never set a plan aside
TRANSIENT = (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
             nats.errors.NoRespondersError, jserr.NoStreamResponseError,
             jserr.ServiceUnavailableError, TimeoutError, OSError)  # Unavailable: a TimeoutError


class Scheduler:
    name = "scheduler"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.mechanisms = MechanismHost(bus)
        # decisions and set-aside records live as long as the plans stream keeps a plan
        # (a redelivered plan finds its decisions), the ledger as long as the requests
        self.keep_for = bus.settings.stream_max_age
        self.lease = Lease(bus, LEASE_KEY, ttl=LEASE_TTL, renew_every=RENEW_EVERY,
                           what="scheduler")
        # which applications have a description (a plan for a deleted one is discarded)
        self.apps: KVCache[bool] = KVCache(bus, subjects.BUCKET_DESC, "app.*", lambda _: True)

    def tasks(self) -> list[Any]:
        return [self.mechanisms.watch(), self.apps.run(), self._lead()]

    def ready(self) -> bool:
        return self.mechanisms.loaded.is_set()

    def close(self) -> None:
        self.mechanisms.directory.close()

    def role(self) -> str:
        return "active" if self.active else "standby"

    @property
    def active(self) -> bool:
        return self.lease.held

    # ------------------------------------------------------------ leadership
    async def _lead(self) -> None:
        await self.mechanisms.loaded.wait()
        await self.lease.hold(self._consume)

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
                except Exception as exc:
                    if isinstance(exc, TRANSIENT):  # the broker is away: try again later
                        for rest in batch[i:]:  # keep the order: all from here come back
                            await rest.nak()
                        raise
                    await self._failed(msg, exc)

    async def _failed(self, msg: Msg, exc: Exception) -> None:
        """A plan whose handling raised: again after a pause, set aside after a few tries."""
        attempts = msg.metadata.num_delivered or 1
        log.error("plan handling failed", attempts=attempts, error=repr(exc), exc_info=exc)
        if attempts < MAX_ATTEMPTS:
            await msg.nak(delay=min(0.5 * 2 ** (attempts - 1), 5.0))
            return
        await self._set_aside(msg, f"{type(exc).__name__}: {exc}", attempts)

    async def handle(self, msg: Msg) -> None:
        started = asyncio.get_running_loop().time()
        try:
            plan = inbound.plan(msg.subject, msg.data, self.bus.subjects)
        except inbound.Refused as exc:
            await self.bus.drop(msg, exc.message)
            return
        # A plan decided before (redelivered, or a copy under another message id) is
        # decided the same way: its stored decisions are published again, with the same
        # ids, which JetStream drops as duplicates. Otherwise decide() writes the claims,
        # then the decisions are stored, and only then is anything published: a decision
        # that was published is always the one stored.
        outcome = await self._stored(plan.plan_id)
        if outcome is None:
            outcome = await self.decide(plan)
            await self.bus.put_with_ttl(subjects.BUCKET_SCHED, f"plan.{plan.plan_id}",
                                        wire.encode(outcome), self.keep_for)
        await self._announce(plan.plan_id, outcome)
        if outcome.requests:
            await msg.ack()  # a lost ack only means a redelivery, decided the same way
        else:
            await msg.term()
        http.LATENCY.labels("scheduler", "plan").observe(
            asyncio.get_running_loop().time() - started)
        http.MESSAGES.labels("scheduler", "plan").inc()

    async def _announce(self, plan_id: str, outcome: wire.PlanDecisions) -> None:
        await asyncio.gather(
            *(self.bus.publish(self.bus.subjects.exec(r.mechanism), r, msg_id=r.exec_id)
              for r in outcome.requests),
            *(self.bus.publish(self.bus.subjects.decision(d.mechanism), d,
                               msg_id=f"d-{plan_id}.{d.mechanism}")
              for d in outcome.decisions))

    async def _stored(self, plan_id: str) -> wire.PlanDecisions | None:
        try:
            entry = await self.bus.kv(subjects.BUCKET_SCHED).get(f"plan.{plan_id}")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return None
        return _decode(wire.PLAN_DECISIONS, f"plan.{plan_id}", entry.value)

    # ------------------------------------------------------------ set aside
    async def _set_aside(self, msg: Msg, reason: str, attempts: int) -> None:
        """Put a plan that keeps failing aside with its reason, and move on in order.

        Every command of the plan is recorded as discarded (so its planner stops waiting
        and the policy sees it), the claims it may have taken are released, an error
        event says why, and ``aside.<plan_id>`` keeps it for ``mlsysops status``.
        """
        plan = inbound.plan(msg.subject, msg.data, self.bus.subjects)
        why = f"set aside after {attempts} attempts: {reason}"
        aside = wire.SetAside(plan_id=plan.plan_id, app=plan.app, policy=plan.policy,
                              reason=reason, attempts=attempts, at=wire.now())
        outcome = wire.PlanDecisions(plan_id=plan.plan_id, decisions=[
            wire.Decision(plan_id=plan.plan_id, mechanism=m, outcome="discarded", app=plan.app,
                          policy=plan.policy, reason=why, decided_at=aside.at)
            for m in plan.commands])
        await self.bus.report(wire.ErrorEvent(
            kind="service", name="scheduler", app=plan.app,
            message=f"plan {plan.plan_id} of policy {plan.policy!r} {why}",
            details={"plan_id": plan.plan_id, "policy": plan.policy, "attempts": attempts}))
        for step in (self._release_claims(plan),
                     self.bus.put_with_ttl(subjects.BUCKET_SCHED, f"aside.{plan.plan_id}",
                                           wire.encode(aside), self.keep_for),
                     self.bus.put_with_ttl(subjects.BUCKET_SCHED, f"plan.{plan.plan_id}",
                                           wire.encode(outcome), self.keep_for),
                     self._announce(plan.plan_id, outcome)):
            try:
                await step
            except Exception as exc:
                log.warning("setting a plan aside: a step failed", plan_id=plan.plan_id,
                            error=repr(exc))
        await msg.term()

    async def _release_claims(self, plan: wire.Plan) -> None:
        """Delete the claims ``plan`` holds (taken before its handling failed)."""
        kv = self.bus.kv(subjects.BUCKET_SCHED)
        for mechanism, command in plan.commands.items():
            plugin = self.mechanisms.get(mechanism)
            if plugin is None:
                continue
            for conflict_key in await self.mechanisms.conflict_keys(plugin, command):
                key = claim_key(mechanism, conflict_key)
                try:
                    entry = await kv.get(key)
                    if wire.CLAIM.decode(entry.value or b"").plan_id == plan.plan_id:
                        await kv.delete(key, last=entry.revision)
                except Exception:
                    continue  # absent, another plan's, or undecodable: not ours to free

    # ------------------------------------------------------------ the rule
    async def decide(self, plan: wire.Plan) -> wire.PlanDecisions:
        out = wire.PlanDecisions(plan_id=plan.plan_id)
        gone = not await self._app_exists(plan.app)
        for mechanism, command in plan.commands.items():
            decision = wire.Decision(plan_id=plan.plan_id, mechanism=mechanism,
                                     outcome="discarded", app=plan.app, policy=plan.policy,
                                     decided_at=wire.now())
            try:
                if gone:
                    decision.reason = (f"application {plan.app!r} was deleted (it has no "
                                       "description) after the plan was made")
                else:
                    await self._decide_one(plan, mechanism, command, decision)
            except PluginError as exc:
                decision.reason = exc.message
            if decision.outcome == "scheduled":
                out.requests.append(wire.ExecRequest(
                    exec_id=f"{plan.plan_id}.{mechanism}", plan_id=plan.plan_id,
                    mechanism=mechanism, command=command, app=plan.app, policy=plan.policy,
                    conflict_key=decision.conflict_key, scheduled_at=decision.decided_at,
                    conflict_keys=decision.conflict_keys))
            log.info("decision", plan_id=plan.plan_id, mechanism=mechanism,
                     outcome=decision.outcome, reason=decision.reason)
            out.decisions.append(decision)
        return out

    async def _app_exists(self, app: str) -> bool:
        """Whether ``app`` has a description (plans of global policies always pass)."""
        if app == subjects.GLOBAL_APP or self.apps.get(desc_key("app", app)) is not None:
            return True
        try:  # the watch may lag behind a description published just now
            await self.bus.kv(subjects.BUCKET_DESC).get(desc_key("app", app))
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return False
        return True

    async def _decide_one(self, plan: wire.Plan, mechanism: str, command: Any,
                          decision: wire.Decision) -> None:
        plugin = self.mechanisms.get(mechanism)
        if plugin is None:
            known = ", ".join(self.mechanisms.names()) or "none"
            decision.reason = f"mechanism {mechanism!r} is not loaded (loaded: {known})"
            return
        keys = await self.mechanisms.conflict_keys(plugin, command)
        decision.conflict_keys, decision.conflict_key = keys, ",".join(keys)
        held: list[tuple[str, wire.Claim]] = []
        revisions: dict[str, int] = {}
        for conflict_key in keys:
            revision, holder = await self._holder(claim_key(mechanism, conflict_key), mechanism)
            revisions[conflict_key] = revision
            if holder is not None and holder.plan_id != plan.plan_id:
                held.append((conflict_key, holder))
        if held:
            conflict_key, holder = held[0]
            decision.holder = holder.plan_id
            if not plan.core:
                on = f" (conflict key {conflict_key!r})" if conflict_key else ""
                decision.reason = (f"{mechanism}{on} is held by plan {holder.plan_id} until "
                                   "its execution ends")
                return
            decision.reason = f"core plan preempted plan {holder.plan_id}"
        kv = self.bus.kv(subjects.BUCKET_SCHED)
        for conflict_key in keys:  # all keys are free (or preempted): claim every one
            claim = wire.Claim(plan_id=plan.plan_id, mechanism=mechanism,
                               conflict_key=conflict_key, since=wire.now())
            data, revision = wire.encode(claim), revisions[conflict_key]
            key = claim_key(mechanism, conflict_key)
            await (kv.update(key, data, last=revision) if revision else kv.create(key, data))
        decision.outcome = "scheduled"

    async def _holder(self, key: str, mechanism: str) -> tuple[int, wire.Claim | None]:
        """The live claim on ``key`` (None when free) and the revision to replace it.

        A claim is live until its execution has a terminal result in the ledger, or until
        ``--exec-timeout`` after the executor recorded its start. An execution that has
        not started (a backlog, no executor yet) keeps its claim however long it waits.
        """
        try:
            entry = await self.bus.kv(subjects.BUCKET_SCHED).get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return 0, None
        claim = _decode(wire.CLAIM, key, entry.value)
        revision = entry.revision or 0
        try:
            ledger = await self.bus.kv(subjects.BUCKET_LEDGER).get(f"{claim.plan_id}.{mechanism}")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            # not started yet; only a claim older than the ledger's own memory is stale
            return revision, None if claim.since < wire.now() - self.keep_for else claim
        execution = wire.LEDGER.decode(ledger.value or b"")
        if execution.state != "started":
            return revision, None
        overdue = execution.started_at + self.bus.settings.exec_timeout < wire.now()
        return revision, None if overdue else claim


def _decode(codec: wire.Codec[T], key: str, data: bytes | None) -> T:
    """A stored record, or an error naming the record that cannot be read."""
    try:
        return codec.decode(data or b"")
    except Exception as exc:
        raise ValueError(f"the stored record {key!r} in the scheduler's bucket cannot be "
                         f"decoded ({exc})") from None
