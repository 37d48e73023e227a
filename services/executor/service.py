"""Executor: applies each scheduled command through its mechanism, at most once.

Requests come from a durable consumer shared by all executor replicas. Before calling
``apply`` the executor creates the (plan, mechanism) entry in the ledger; creation is
atomic, so a redelivered request finds the entry and never applies twice. The consumer
keeps each request alive with in-progress acks while it is handled, so the ack wait is
short (4 s). If an executor dies inside ``apply`` the entry stays ``started``: the
request is redelivered within seconds and records the execution with outcome
``unknown`` ("interrupted: ...") instead of applying again, because mechanisms are best
effort and not retried (the next analysis sees the real state). An ``apply`` abandoned
at its deadline is ``unknown`` too: it may still take effect.

Each executor also publishes every mechanism's ``get_status``/``get_options`` on
``status.<mechanism>`` and in the ``status`` bucket, periodically and after each apply.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import nats.js.errors as jserr
from nats.aio.msg import Msg
from tenacity import AsyncRetrying, stop_after_delay, wait_exponential

from mlsysops import inbound, logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.consumer import consume
from mlsysops.errors import CallAbandoned, PluginError
from mlsysops.mechhost import MechanismHost
from mlsysops.plugins import Plugin
from mlsysops.state import StateView, mech_key

log = logs.get(__name__)
# Redelivery of a request whose executor died: the consumer keeps a request alive with
# in-progress acks every ACK_WAIT / 4 while it is handled, so this bounds (with the restart
# of a pull) how soon an apply cut by a dead executor is reported.
ACK_WAIT = 4.0
CONCURRENCY = 16  # requests handled at once by one executor
RECORD_FOR = 300.0  # seconds the outcome of an apply is retried into the ledger
INTERRUPTED = ("interrupted: the executor stopped during apply; the outcome is unknown and "
               "the command is not applied again (mechanisms are best effort)")


class Executor:
    name = "executor"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.state = StateView(bus, telemetry=False)
        self.mechanisms = MechanismHost(bus)
        self.mechanisms.listeners.append(self._on_mechanism)

    def tasks(self) -> list[Any]:
        return [*self.state.tasks(), self.mechanisms.watch(), self._consume(),
                self._status_loop()]

    def ready(self) -> bool:
        return self.mechanisms.loaded.is_set()

    def close(self) -> None:
        self.mechanisms.directory.close()

    def role(self) -> str:
        return ""

    async def _consume(self) -> None:
        await self.mechanisms.loaded.wait()
        await self.state.wait_ready()
        await consume(self.bus, "exec", "executor", self.handle, concurrency=CONCURRENCY,
                      ack_wait=ACK_WAIT)

    # ------------------------------------------------------------ one request
    async def handle(self, msg: Msg) -> None:
        try:
            request = inbound.exec_request(msg.subject, msg.data, self.bus.subjects)
        except inbound.Refused as exc:
            await self.bus.drop(msg, exc.message)
            return
        ledger = self.bus.kv(subjects.BUCKET_LEDGER)
        key = f"{request.plan_id}.{request.mechanism}"
        entry = wire.LedgerEntry(state="started", plan_id=request.plan_id,
                                 mechanism=request.mechanism, executor=self.bus.instance,
                                 started_at=wire.now())
        try:
            revision = await ledger.create(key, wire.encode(entry))
        except jserr.KeyWrongLastSequenceError:
            await self._seen_before(request, key)
            await msg.ack()
            return
        result = await self._apply(request)
        entry.state = result.outcome
        entry.finished_at, entry.error = result.finished_at, result.error
        await self._record(key, entry, revision)
        await self._publish_result(result)
        await msg.ack()
        plugin = self.mechanisms.get(request.mechanism)
        if plugin is not None:  # policies should see the new state soon
            await self._publish_status(request.mechanism, plugin)

    async def _record(self, key: str, entry: wire.LedgerEntry, revision: int) -> None:
        """Store the outcome in the ledger, retrying (the outcome is known; never lose it).

        The consumer keeps the request alive meanwhile, so it is not redelivered.
        """
        ledger = self.bus.kv(subjects.BUCKET_LEDGER)
        async for attempt in AsyncRetrying(wait=wait_exponential(multiplier=0.2, max=2),
                                           stop=stop_after_delay(RECORD_FOR), reraise=True):
            with attempt:
                try:
                    await ledger.update(key, wire.encode(entry), last=revision)
                except jserr.KeyWrongLastSequenceError:
                    found = await ledger.get(key)  # written by an earlier attempt?
                    if wire.LEDGER.decode(found.value or b"").state == "started":
                        raise

    async def _seen_before(self, request: wire.ExecRequest, key: str) -> None:
        """A redelivery: re-announce a finished result, or close an interrupted apply."""
        ledger = self.bus.kv(subjects.BUCKET_LEDGER)
        found = await ledger.get(key)
        entry = wire.LEDGER.decode(found.value or b"")
        if entry.state == "started":
            entry.state, entry.error, entry.finished_at = "unknown", INTERRUPTED, wire.now()
            await ledger.update(key, wire.encode(entry), last=found.revision)
            log.warning("apply was interrupted; not applied again", plan_id=request.plan_id,
                        mechanism=request.mechanism)
        await self._publish_result(wire.ExecResult(
            plan_id=request.plan_id, mechanism=request.mechanism, outcome=entry.state,
            app=request.app, policy=request.policy, error=entry.error,
            duration=max(0.0, entry.finished_at - entry.started_at),
            finished_at=entry.finished_at, executor=entry.executor))

    async def _apply(self, request: wire.ExecRequest) -> wire.ExecResult:
        started = time.perf_counter()
        error = ""
        outcome: wire.Outcome = "applied"
        plugin = self.mechanisms.get(request.mechanism)
        try:
            if plugin is None:
                raise PluginError(request.mechanism, "mechanism is not loaded by this executor")
            await plugin.call("apply", _with_plan_id(request),
                              timeout=self.bus.settings.apply_timeout)
        except PluginError as exc:
            # CallAbandoned: overran its deadline (or its plugin was unloaded while it ran)
            # and may still take effect, so the outcome is unknown, not failed
            outcome = "unknown" if isinstance(exc, CallAbandoned) else "failed"
            error = exc.message
            await self.bus.report(wire.ErrorEvent(kind="mechanism", name=request.mechanism,
                                                  app=request.app, message=error,
                                                  traceback=exc.traceback,
                                                  details={"plan_id": request.plan_id}))
        log.info("executed", plan_id=request.plan_id, mechanism=request.mechanism,
                 outcome=outcome, error=error)
        return wire.ExecResult(plan_id=request.plan_id, mechanism=request.mechanism,
                               outcome=outcome, app=request.app, policy=request.policy,
                               error=error, duration=time.perf_counter() - started,
                               finished_at=wire.now(), executor=self.bus.instance)

    async def _publish_result(self, result: wire.ExecResult) -> None:
        await self.bus.publish(self.bus.subjects.result(result.mechanism), result,
                               msg_id=f"r-{result.plan_id}.{result.mechanism}")

    # ------------------------------------------------------------ mechanism status
    async def _status_loop(self) -> None:
        await self.mechanisms.loaded.wait()
        while True:
            for name in self.mechanisms.names():
                plugin = self.mechanisms.get(name)
                if plugin is not None:
                    await self._publish_status(name, plugin)
            await asyncio.sleep(self.bus.settings.status_interval)

    async def _on_mechanism(self, name: str, plugin: Plugin | None) -> None:
        if plugin is None or not plugin.loaded:
            try:
                await self.bus.kv(subjects.BUCKET_STATUS).delete(mech_key(name))
            except Exception as exc:
                log.debug("could not clear mechanism status", error=str(exc))
        else:
            await self._publish_status(name, plugin)

    async def _publish_status(self, name: str, plugin: Plugin) -> None:
        status = wire.MechanismStatus(mechanism=name, updated_at=wire.now(),
                                      executor=self.bus.instance)
        timeout = self.bus.settings.call_timeout
        try:
            if plugin.function("get_status"):
                status.state = await plugin.call("get_status", timeout=timeout)
            if plugin.function("get_options"):
                status.options = await plugin.call("get_options", timeout=timeout)
            data = wire.encode(status)
        except (PluginError, TypeError, msgspec.EncodeError) as exc:
            status.state = status.options = None
            status.error = exc.message if isinstance(exc, PluginError) else str(exc)
            data = wire.encode(status)
        try:
            await self.bus.kv(subjects.BUCKET_STATUS).put(mech_key(name), data)
            await self.bus.nc.publish(self.bus.subjects.status(name), data)  # type: ignore[union-attr]
        except Exception as exc:
            log.debug("could not publish mechanism status", error=str(exc))


def _with_plan_id(request: wire.ExecRequest) -> Any:
    """The command as the mechanism sees it: a dict command also carries ``_plan_id``."""
    if isinstance(request.command, dict):
        return {**request.command, "_plan_id": request.plan_id}
    return request.command
