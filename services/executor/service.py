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
import contextlib
import re
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
from mlsysops.state import StateView, mech_key, piece_key

log = logs.get(__name__)
# Redelivery of a request whose executor died: the consumer keeps a request alive with
# in-progress acks every ACK_WAIT / 4 while it is handled, so this bounds (with the restart
# of a pull) how soon an apply cut by a dead executor is reported.
ACK_WAIT = 4.0
CONCURRENCY = 16  # requests handled at once by one executor
RECORD_FOR = 300.0  # seconds the outcome of an apply is retried into the ledger
_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")  # an application name as a key token
INTERRUPTED = ("interrupted: the executor stopped during apply; the outcome is unknown and "
               "the command is not applied again (mechanisms are best effort)")


class Executor:
    name = "executor"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.state = StateView(bus, telemetry=False)
        self.mechanisms = MechanismHost(bus)
        self.mechanisms.listeners.append(self._on_mechanism)
        self._pieces: dict[str, dict[str, bytes]] = {}  # mechanism -> app -> state written
        self._store_errors: dict[str, str] = {}

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
                await self._store_pieces(name, None)
            except Exception as exc:
                log.debug("could not clear mechanism status", error=str(exc))
        else:
            await self._publish_status(name, plugin)

    async def _publish_status(self, name: str, plugin: Plugin) -> None:
        await self.state.wait_ready()  # the pieces stored already are known
        status = await self._read_status(name, plugin)
        apps = _split_applications(status)
        try:
            problems = await self._store_pieces(name, apps)
            status.store_error = "; ".join(problems)
            data = wire.encode(status)
            await self.bus.kv(subjects.BUCKET_STATUS).put(mech_key(name), data)
            await self.bus.nc.publish(self.bus.subjects.status(name), data)  # type: ignore[union-attr]
        except Exception as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        await self._report_store(name, problems)

    async def _read_status(self, name: str, plugin: Plugin) -> wire.MechanismStatus:
        status = wire.MechanismStatus(mechanism=name, updated_at=wire.now(),
                                      executor=self.bus.instance)
        timeout = self.bus.settings.call_timeout
        try:
            if plugin.function("get_status"):
                status.state = await plugin.call("get_status", timeout=timeout)
            if plugin.function("get_options"):
                status.options = await plugin.call("get_options", timeout=timeout)
            wire.encode(status)  # plain data only
        except (PluginError, TypeError, msgspec.EncodeError) as exc:
            status.state = status.options = None
            status.error = exc.message if isinstance(exc, PluginError) else str(exc)
        return status

    async def _store_pieces(self, name: str, apps: dict[str, Any] | None) -> list[str]:
        """Write the applications' pieces that changed, delete those of departed ones.

        Returns what could not be stored (each piece is a message of its own: one too
        large fails alone, and policies keep seeing its previous version).
        """
        kv = self.bus.kv(subjects.BUCKET_STATUS)
        if name not in self._pieces:  # what is stored already (an earlier run wrote it)
            prefix = piece_key(name, "")
            self._pieces[name] = {k[len(prefix):]: wire.encode(p.state)
                                  for k, p in self.state.pieces.items() if k.startswith(prefix)}
        written = self._pieces[name]
        now = wire.now()
        changed = {app: wire.encode(state) for app, state in (apps or {}).items()}
        changed = {app: raw for app, raw in changed.items() if written.get(app) != raw}
        gone = [app for app in written if apps is None or app not in apps]
        problems: list[str] = []

        async def put(app: str) -> None:
            piece = wire.MechanismPiece(mechanism=name, app=app, state=(apps or {})[app],
                                        updated_at=now)
            try:
                await kv.put(piece_key(name, app), wire.encode(piece))
                written[app] = changed[app]
            except Exception as exc:
                problems.append(f"application {app}: {type(exc).__name__}: {exc}")

        async def delete(app: str) -> None:
            with contextlib.suppress(Exception):
                await kv.delete(piece_key(name, app))
                written.pop(app, None)

        jobs = [put(app) for app in changed] + [delete(app) for app in gone]
        for start in range(0, len(jobs), 256):  # bounded: a first status of 10k pieces
            await asyncio.gather(*jobs[start:start + 256])
        return problems

    async def _report_store(self, name: str, problems: list[str]) -> None:
        """A status that could not be stored is an error event (once until it changes)."""
        message = "; ".join(problems)
        if message == self._store_errors.get(name, ""):
            return
        self._store_errors[name] = message
        if not message:
            return
        log.warning("could not store mechanism status", mechanism=name, error=message)
        with contextlib.suppress(Exception):
            await self.bus.report(wire.ErrorEvent(
                kind="mechanism", name=name,
                message=f"status could not be stored ({message}); policies see the previous "
                        "status"))


def _split_applications(status: wire.MechanismStatus) -> dict[str, Any] | None:
    """Take ``state["applications"]`` out of the status to be stored per application.

    Only a mapping keyed by names usable as keys is split (``status.pieces`` says so);
    anything else stays in the status as the mechanism returned it.
    """
    state = status.state
    if not isinstance(state, dict) or not isinstance(state.get("applications"), dict):
        return None
    apps = state["applications"]
    if not all(isinstance(app, str) and _TOKEN.fullmatch(app) for app in apps):
        return None
    status.state = {k: v for k, v in state.items() if k != "applications"}
    status.pieces = True
    return dict(apps)


def _with_plan_id(request: wire.ExecRequest) -> Any:
    """The command as the mechanism sees it: a dict command also carries ``_plan_id``."""
    if isinstance(request.command, dict):
        return {**request.command, "_plan_id": request.plan_id}
    return request.command
