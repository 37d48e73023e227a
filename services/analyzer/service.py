"""Analyzer: evaluates every (policy, application) pair at the policy's interval.

Work is shared between replicas without a coordinator: each replica announces itself in
the leases bucket, and a pair belongs to the replica that wins rendezvous hashing over
the live members. A member is live while its heartbeat's ``updated_at`` is less than
``MEMBER_TTL`` old (the key's own TTL expiry is invisible to a watch); a replica that
stops removes its key at once. The context record of a pair is written with
compare-and-set, so even while membership changes at most one evaluation per interval is
kept. A positive verdict marks the pair in flight (no new analysis until the planner has
made its plan) and is kept in the record's outbox until published, so a crash never
loses it.

A context record belongs to one generation of the application's description (see the
monitor): a record made for another generation (an application of the same name that was
deleted) is treated as absent, and verdict ids include the generation, so they never
repeat for an application published again.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
from typing import Any

import msgspec
import nats.js.errors as jserr

from mlsysops import http, inbound, logs, subjects, wire
from mlsysops.bus import Bus, KVCache
from mlsysops.errors import PluginError
from mlsysops.policies import check_context, check_result, interval_of, mechanisms_argument
from mlsysops.policyhost import Policy, PolicyHost
from mlsysops.state import StateView, desc_key

log = logs.get(__name__)

TICK = 0.05
MEMBER_TTL = 10.0
MEMBER_EVERY = 3.0
CONCURRENCY = 64
Pair = tuple[str, str]


class Analyzer:
    name = "analyzer"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.state = StateView(bus)
        self.host = PolicyHost(bus)
        self.contexts: KVCache[wire.ContextRecord] = KVCache(
            bus, subjects.BUCKET_CONTEXT, ">", wire.CONTEXT_RECORD.decode)
        self.members: KVCache[wire.ServiceHeartbeat] = KVCache(
            bus, subjects.BUCKET_LEASES, "members.analyzer.*", wire.HEARTBEAT.decode)
        self._member_key = f"members.analyzer.{bus.instance.replace('.', '_')}"
        self._heap: list[tuple[float, Pair]] = []
        self._due: dict[Pair, float] = {}
        self._running: set[Pair] = set()
        self._forced: set[Pair] = set()  # due now because telemetry arrived
        self._evaluations: set[asyncio.Future[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._wake = asyncio.Event()
        self._pairs: dict[Pair, Policy] | None = None  # recomputed when apps or policies change
        self._apps_changed = True
        self.state.telemetry_listeners.append(self._on_telemetry)
        self.state.app_listeners.append(lambda app, value: self._changed(apps=True))
        self._reloaded: set[str] = set()  # policies whose pairs are due at once
        self.host.listeners.append(self._policy_changed)

    def tasks(self) -> list[Any]:
        return [*self.state.tasks(), self.contexts.run(), self.members.run(), self.host.watch(),
                self._announce(), self._loop(), self._triggers()]

    def ready(self) -> bool:
        return self.host.loaded.is_set() and self.contexts.ready.is_set()

    def close(self) -> None:
        self.host.directory.close()

    def role(self) -> str:
        return f"members={len(self.live_members())}"

    # ------------------------------------------------------------ sharing the work
    async def _announce(self) -> None:
        beat = wire.ServiceHeartbeat("analyzer", self.bus.instance, wire.now(), wire.now())
        try:
            while True:
                beat.updated_at = wire.now()
                try:
                    await self.bus.put_with_ttl(subjects.BUCKET_LEASES, self._member_key,
                                                wire.encode(beat), MEMBER_TTL)
                except Exception as exc:
                    log.debug("membership refresh failed", error=str(exc))
                self._forget_departed()
                await asyncio.sleep(MEMBER_EVERY)
        except asyncio.CancelledError:
            await self._leave()
            raise

    async def _leave(self) -> None:
        """On stop: remove our member key now, so the others take our pairs at once.

        A purge marker with a TTL: watchers drop the key, and the marker itself expires
        (instance names change with each process; markers must not pile up).
        """
        try:
            await asyncio.wait_for(self.bus.kv(subjects.BUCKET_LEASES).purge(
                self._member_key, msg_ttl=MEMBER_TTL), 2)
            log.info("left the analyzer members", key=self._member_key)
        except Exception as exc:
            log.warning("could not remove the member key; it expires by itself",
                        key=self._member_key, error=str(exc))

    def _forget_departed(self) -> None:
        """Drop members whose heartbeat is older than MEMBER_TTL from the local copy."""
        now = wire.now()
        for key, beat in self.members.items():
            if key != self._member_key and now - beat.updated_at >= MEMBER_TTL:
                self.members.apply(key, 1 << 62, None)  # a later heartbeat brings it back

    def live_members(self) -> list[str]:
        """Member keys whose heartbeat is less than MEMBER_TTL old, ours always included.

        The KV watch never sees a key expire by its TTL, so age decides. A member whose
        clock is far behind ours is not counted here while it counts itself: its pairs
        may then be attempted twice (compare-and-set keeps one), never by nobody.
        """
        now = wire.now()
        live = {key for key, beat in self.members.items()
                if now - beat.updated_at < MEMBER_TTL}
        live.add(self._member_key)
        return sorted(live)

    def owns(self, pair: Pair) -> bool:
        members = self.live_members()
        if len(members) == 1:
            return True
        return max(members, key=lambda m: _score(pair, m)) == self._member_key

    # ------------------------------------------------------------ scheduling
    def _changed(self, apps: bool = False) -> None:
        self._pairs = None
        self._apps_changed = self._apps_changed or apps
        self._wake.set()

    def _policy_changed(self, name: str) -> None:
        """A policy (re)loaded: its pairs are due now, so that an interval edited in the
        file applies at once (an evaluation too soon after the last is skipped)."""
        self._reloaded.add(name)
        self._changed()

    def pairs(self) -> dict[Pair, Policy]:
        if self._pairs is None:
            self._pairs = self._compute_pairs()
        return self._pairs

    def _compute_pairs(self) -> dict[Pair, Policy]:
        apps = self.state.apps()
        out: dict[Pair, Policy] = {}
        for policy in self.host.active():
            if policy.settings.scope == "global":
                out[(policy.name, subjects.GLOBAL_APP)] = policy
            else:
                out.update({(policy.name, app): policy for app in apps})
        return out

    def _schedule(self, pair: Pair, at: float) -> None:
        if self._due.get(pair, float("inf")) <= at:
            return
        self._due[pair] = at
        heapq.heappush(self._heap, (at, pair))

    def _on_telemetry(self, snap: wire.Telemetry) -> None:
        """Analyse now the pairs of telemetry-driven policies this snapshot concerns.

        Samples labelled with ``app`` concern that application (and global policies);
        a snapshot without such labels concerns every application.
        """
        apps = {s.labels["app"] for s in snap.samples if "app" in s.labels}
        now = time.monotonic()
        for pair, policy in self.pairs().items():
            if policy.settings.on_telemetry and (
                    not apps or pair[1] in apps or pair[1] == subjects.GLOBAL_APP):
                self._forced.add(pair)
                self._schedule(pair, now)
        self._wake.set()

    async def _loop(self) -> None:
        await asyncio.gather(self.host.loaded.wait(), self.contexts.ready.wait(),
                             self.state.wait_ready(), self.members.ready.wait())
        while True:
            pairs = self.pairs()
            now = time.monotonic()
            for pair in pairs.keys() - self._due.keys():
                self._schedule(pair, now)
            if self._reloaded:
                for pair in [p for p in pairs if p[0] in self._reloaded]:
                    self._due.pop(pair, None)
                    self._schedule(pair, now)
                self._reloaded.clear()
            while self._heap and self._heap[0][0] <= now:
                at, pair = heapq.heappop(self._heap)
                if self._due.get(pair) != at:
                    continue
                del self._due[pair]
                policy = pairs.get(pair)
                if policy is None or pair in self._running:
                    continue
                forced = pair in self._forced
                self._forced.discard(pair)
                if not self.owns(pair):
                    self._schedule(pair, now + self.interval(policy, pair[1]))
                    continue
                await self._slots.acquire()
                # the next evaluation is one interval after this one really starts
                self._schedule(pair, time.monotonic() + self.interval(policy, pair[1]))
                self._running.add(pair)
                task = asyncio.ensure_future(self._evaluate_guarded(policy, pair, forced))
                self._evaluations.add(task)
                task.add_done_callback(self._evaluations.discard)
            if self._apps_changed:
                self._apps_changed = False
                await self._cleanup()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK)
            except TimeoutError:
                pass

    async def _cleanup(self) -> None:
        """Forget context records of applications that were deleted.

        Compare-and-set on the revision seen, so a record written meanwhile (the
        application published again) is never deleted by a stale view.
        """
        apps = set(self.state.apps()) | {subjects.GLOBAL_APP}
        for key in self.contexts.keys():
            policy, _, app = key.partition(".")
            item = self.contexts.get(key)
            if item is None or app in apps or not self.owns((policy, app)):
                continue
            try:
                await self.bus.kv(subjects.BUCKET_CONTEXT).delete(key, last=item[0])
            except Exception as exc:
                log.debug("context cleanup failed", key=key, error=str(exc))
                continue
            self.contexts.apply(key, item[0], None)

    def interval(self, policy: Policy, app: str) -> float:
        """The pair's analysis interval: ``configuration.analyze_interval`` of its live
        context (a policy may change it from ``analyze``, as upstream policies do), else
        the one ``initialize()`` gave. A context made by another version of the policy
        file counts with the loaded version's interval (see :func:`_configured`)."""
        record = self.contexts.value(wire.context_key(policy.name, app))
        if record is None or record.policy_digest != policy.plugin.digest:
            return policy.settings.interval
        return interval_of(record.context, policy.settings.interval)

    def generation(self, app: str) -> str | None:
        """The generation of ``app``'s stored description ("" for _global; None: gone)."""
        if app == subjects.GLOBAL_APP:
            return ""
        stored = self.state.descs.value(desc_key("app", app))
        return None if stored is None else stored.generation

    def _record(self, policy: Policy, app: str,
                generation: str) -> tuple[int, wire.ContextRecord]:
        """The pair's revision and record; a record of another generation counts as absent
        (fresh initial context), though its revision is kept for compare-and-set."""
        revision, record = self.contexts.get(wire.context_key(policy.name, app)) or (0, None)
        if record is None or record.generation != generation:
            record = wire.ContextRecord(context=_copy(policy.initial), generation=generation)
        return revision, record

    # ------------------------------------------------------------ one evaluation
    async def _evaluate_guarded(self, policy: Policy, pair: Pair, forced: bool) -> None:
        started = time.perf_counter()
        try:
            await self.evaluate(policy, pair[1], forced=forced)
        except Exception as exc:
            http.ERRORS.labels("analyzer", "evaluation").inc()
            log.error("evaluation failed", policy=pair[0], app=pair[1], error=repr(exc))
        finally:
            self._running.discard(pair)
            self._slots.release()
            http.LATENCY.labels("analyzer", "evaluation").observe(time.perf_counter() - started)
            http.MESSAGES.labels("analyzer", "evaluation").inc()

    async def evaluate(self, policy: Policy, app: str, *, forced: bool = False) -> None:
        """One analysis of (policy, app); ``forced`` skips the once-per-interval check."""
        key = wire.context_key(policy.name, app)
        generation = self.generation(app)
        if generation is None:
            return  # deleted since the pairs were computed
        revision, record = self._record(policy, app, generation)
        if record.inflight:
            await self._maybe_republish(record)
            return
        if not forced and wire.now() < record.last_eval + self.interval(policy, app) * 0.5:
            return  # another replica evaluated this pair within this interval
        outcome = await self._analyze(policy, app, _configured(policy, record))
        if outcome is None:
            return
        verdict_flag, context = outcome
        new = wire.ContextRecord(context=context, last_eval=wire.now(),
                                 last_verdict=verdict_flag, last_plan_id=record.last_plan_id,
                                 evaluations=record.evaluations + 1,
                                 policy_digest=policy.plugin.digest, generation=generation)
        verdict = None
        if verdict_flag:
            verdict = wire.Verdict(
                verdict_id=wire.make_id("v", policy.name, app, generation, revision,
                                        record.evaluations),
                app=app, policy=policy.name, created_at=wire.now(), context=context,
                policy_digest=policy.plugin.digest)
            new.inflight, new.inflight_since, new.outbox_verdict = (
                verdict.verdict_id, verdict.created_at, verdict)
        if not await self._store(key, revision, new):
            return
        # a shorter interval asked for in the new context applies from now on
        self._schedule((policy.name, app),
                       time.monotonic() + interval_of(context, policy.settings.interval))
        if verdict is not None:
            await self.bus.publish(self.bus.subjects.verdict(app, policy.name), verdict,
                                   msg_id=verdict.verdict_id)
            log.info("verdict", policy=policy.name, app=app, verdict_id=verdict.verdict_id)

    async def _analyze(self, policy: Policy, app: str,
                       context: dict[str, Any]) -> tuple[bool, dict[str, Any]] | None:
        args = (_copy(context), self.state.app_description(app), self.state.system_description(),
                mechanisms_argument(self.state.mechanisms(app), policy.settings),
                self.state.telemetry(),
                self.bus.settings.ml_connector_url or None)
        try:
            result = await policy.plugin.call("analyze", *args,
                                              timeout=self.bus.settings.call_timeout)
            flag, new_context = check_result(policy.name, "analyze", result)
            if not isinstance(flag, bool):
                raise PluginError(policy.name, f"analyze() must return a bool verdict first, "
                                               f"got {type(flag).__name__}")
            check_context(policy.name, new_context, what="analyze()")
        except PluginError as exc:
            await self.host.failed(policy, app, "analyze", exc)
            return None
        await self.host.succeeded(policy)
        return flag, new_context

    async def _store(self, key: str, revision: int, record: wire.ContextRecord) -> bool:
        kv = self.bus.kv(subjects.BUCKET_CONTEXT)
        data = wire.encode(record)
        try:
            if revision:
                new_rev = await kv.update(key, data, last=revision)
            else:
                new_rev = await kv.create(key, data)
        except jserr.KeyWrongLastSequenceError:
            log.debug("context changed under us; evaluation dropped", key=key)
            return False
        self.contexts.apply(key, new_rev, record)
        return True

    async def _maybe_republish(self, record: wire.ContextRecord) -> None:
        """A verdict stuck in flight for long: publish its outbox again (same id)."""
        stale_after = 2 * self.bus.settings.call_timeout + 5
        verdict = record.outbox_verdict
        if verdict is None or wire.now() - record.inflight_since < stale_after:
            return
        await self.bus.publish(self.bus.subjects.verdict(verdict.app, verdict.policy), verdict,
                               msg_id=verdict.verdict_id)


    # ------------------------------------------------------------ run a policy now
    async def _triggers(self) -> None:
        await asyncio.gather(self.host.loaded.wait(), self.contexts.ready.wait())
        sub = await self.bus.nc.subscribe(self.bus.subjects.trigger_all,  # type: ignore[union-attr]
                                          queue="analyzer")
        async for msg in sub.messages:
            try:
                reply = await self.trigger(msg.subject.split(".")[-2], msg.subject.split(".")[-1],
                                           msg.data)
            except Exception as exc:
                reply = {"accepted": False, "error": f"internal error: {exc!r}"}
            if msg.reply:
                await msg.respond(wire.encode(reply))

    async def trigger(self, policy_name: str, app: str, data: bytes) -> dict[str, Any]:
        """Issue a verdict for (policy, app) now; plan() sees ``context["trigger"]``."""
        try:
            params = msgspec.json.decode(data or b"{}").get("params", {})
        except (msgspec.DecodeError, AttributeError, UnicodeDecodeError, RecursionError):
            return {"accepted": False, "error": 'the payload must be JSON like {"params": {...}}'}
        if inbound.depth(params) > inbound.MAX_DEPTH:
            return {"accepted": False,
                    "error": f"params nested deeper than the limit of {inbound.MAX_DEPTH} levels"}
        policy = self.host.get(policy_name)
        if policy is None or policy.quarantined:
            return {"accepted": False, "error": f"policy {policy_name!r} is not loaded"}
        if (policy.name, app) not in self.pairs():
            return {"accepted": False, "error": f"policy {policy_name!r} does not manage "
                                                f"application {app!r}"}
        if not isinstance(params, dict):
            return {"accepted": False, "error": "params must be a JSON object"}
        key = wire.context_key(policy.name, app)
        generation = self.generation(app)
        if generation is None:
            return {"accepted": False, "error": f"application {app!r} was deleted"}
        revision, record = self._record(policy, app, generation)
        if record.inflight:
            return {"accepted": False, "error": f"a plan is already in flight ({record.inflight})"}
        context = {**record.context, "trigger": {"params": params, "at": wire.now()}}
        verdict = wire.Verdict(
            verdict_id=wire.make_id("v", policy.name, app, generation, revision,
                                    record.evaluations, "t"),
            app=app, policy=policy.name, created_at=wire.now(), context=context,
            trigger="manual", policy_digest=policy.plugin.digest)
        new = msgspec.structs.replace(record, inflight=verdict.verdict_id,
                                      inflight_since=verdict.created_at, outbox_verdict=verdict)
        if not await self._store(key, revision, new):
            return {"accepted": False, "error": "the pair changed meanwhile; try again"}
        await self.bus.publish(self.bus.subjects.verdict(app, policy.name), verdict,
                               msg_id=verdict.verdict_id)
        return {"accepted": True, "verdict_id": verdict.verdict_id}


def _configured(policy: Policy, record: wire.ContextRecord) -> dict[str, Any]:
    """The context ``analyze`` gets: a context kept from another version of the policy
    file takes the interval the loaded version's ``initialize()`` sets (editing the
    interval in the file must take effect); the rest of the context is kept."""
    context = record.context
    interval = (policy.initial.get("configuration") or {}).get("analyze_interval")
    config = context.get("configuration")
    if (interval is None or record.policy_digest in ("", policy.plugin.digest)
            or not isinstance(config, dict) or config.get("analyze_interval") == interval):
        return context
    return {**context, "configuration": {**config, "analyze_interval": interval}}


def _score(pair: Pair, member: str) -> bytes:
    return hashlib.blake2b(f"{pair[0]}\x00{pair[1]}\x00{member}".encode(), digest_size=8).digest()


def _copy(value: Any) -> Any:
    return wire.CONTEXT_RECORD.decode(wire.encode(wire.ContextRecord(context=value))).context
