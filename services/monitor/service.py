"""Monitor: the loop's inputs.

Descriptions: operators publish on ``desc.<kind>.<name>``; monitors share the subject in a
queue group, validate each description, store accepted ones in the ``desc`` bucket (an
empty payload deletes) and answer the reply subject with the verdict. A stored description
carries a ``generation``: new when its key did not exist or was deleted, kept on updates,
so a name deleted and published again is a new application to the loop. Rejections also go
to ``error.desc`` and never replace the last accepted description.

Telemetry: the Monitor follows every policy context and collects what they ask for
(``telemetry.metrics``) at the smallest ``telemetry.system_scrape_interval``; the set and
the period change at once when contexts change. Snapshots go to ``telemetry.<source>``,
kept in JetStream for the configured retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from typing import Any

import msgspec
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import descriptions, http, logs, subjects, telemetry, wire
from mlsysops.bus import Bus, KVCache
from mlsysops.energy import validate_energy
from mlsysops.state import desc_key

log = logs.get(__name__)


class Monitor:
    name = "monitor"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        s = bus.settings
        self.source: Any = (telemetry.PrometheusSource(s.prometheus_url) if s.prometheus_url
                            else telemetry.HostSource())
        self.collector = telemetry.Collector(self.source, self._publish_telemetry, bus.report,
                                             default_interval=s.telemetry_interval)
        self.contexts: KVCache[wire.ContextRecord] = KVCache(
            bus, subjects.BUCKET_CONTEXT, ">", wire.CONTEXT_RECORD.decode,
            lambda key, value: self._contexts_changed.set())
        self._contexts_changed = asyncio.Event()
        self._intake_ready = False

    def tasks(self) -> list[Any]:
        return [self._intake(), self.contexts.run(), self._follow_policies(),
                self.collector.run(), self._status()]

    def ready(self) -> bool:
        return self._intake_ready

    def role(self) -> str:
        return ""

    # ------------------------------------------------------------ descriptions
    async def _intake(self) -> None:
        sub = await self.bus.nc.subscribe(self.bus.subjects.desc_all, queue="monitor")  # type: ignore[union-attr]
        self._intake_ready = True
        async for msg in sub.messages:
            try:
                await self.take(msg)
            except Exception as exc:
                http.ERRORS.labels("monitor", "desc").inc()
                log.error("description intake failed", subject=msg.subject, error=repr(exc),
                          exc_info=exc)

    async def take(self, msg: Msg) -> None:
        http.MESSAGES.labels("monitor", "desc").inc()
        tokens = msg.subject.split(".")
        kind, name = tokens[-2], tokens[-1]
        if kind not in subjects.DESC_KINDS:
            known = ", ".join(subjects.DESC_KINDS)
            reply = wire.DescReply(accepted=False, kind=kind, name=name, errors=[wire.FieldError(
                "$", f"unknown description kind {kind!r}: use one of {known}")])
        else:
            try:
                reply = await self._store(kind, name, msg.data)
            except Exception as exc:  # a bug must refuse one description, not leave no answer
                log.error("description intake failed", subject=msg.subject, error=repr(exc),
                          exc_info=exc)
                reply = wire.DescReply(accepted=False, kind=kind, name=name, errors=[
                    wire.FieldError("$", f"internal error while storing: {exc!r}")])
        if not reply.accepted:
            await self.bus.report(wire.ErrorEvent(
                kind="desc", name=name, message=f"{kind} {name!r} rejected: " + "; ".join(
                    f"{e.path}: {e.message}" for e in reply.errors),
                details={"reply": msgspec.to_builtins(reply)}), subject_name=False)
        if msg.reply:
            await msg.respond(wire.encode(reply))

    async def _store(self, kind: str, name: str, payload: bytes) -> wire.DescReply:
        validate = (functools.partial(validate_energy, name, payload) if kind == "energy" else
                    functools.partial(descriptions.validate_payload, kind, name, payload,
                                      max_bytes=self.bus.settings.max_payload))
        # large documents are validated off the event loop so the intake stays responsive
        result = await asyncio.to_thread(validate) if len(payload) > 65536 else validate()
        reply = wire.DescReply(accepted=result.accepted, kind=kind, name=result.name or name,
                               errors=list(result.errors), warnings=list(result.warnings),
                               deleted=result.deleted)
        if not result.accepted:
            return reply
        kv = self.bus.kv(subjects.BUCKET_DESC)
        key = desc_key(kind, reply.name)
        if result.deleted:
            await kv.delete(key)
            log.info("description deleted", kind=kind, name=reply.name)
            return reply
        stored = wire.StoredDescription(kind=kind, name=reply.name, spec=result.spec or {},
                                        accepted_at=wire.now())
        reply.revision = await self._put(kv, key, stored)
        log.info("description accepted", kind=kind, name=reply.name, revision=reply.revision,
                 warnings=len(reply.warnings))
        return reply

    async def _put(self, kv: Any, key: str, stored: wire.StoredDescription) -> int:
        """Store a description, keeping its generation on an update, a new one otherwise.

        Compare-and-set against the entry read, so that two monitors storing the same new
        name at once agree on one generation.
        """
        while True:
            try:
                entry = await kv.get(key)
            except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
                entry = None
            previous = None
            if entry is not None and entry.value:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    previous = wire.STORED_DESC.decode(entry.value)
            stored.generation = (previous.generation if previous is not None
                                 else uuid.uuid4().hex[:16])
            try:
                if entry is not None:
                    return int(await kv.update(key, wire.encode(stored), last=entry.revision))
                return int(await kv.create(key, wire.encode(stored)))
            except jserr.KeyWrongLastSequenceError:
                continue  # stored meanwhile by another monitor: read it again

    # ------------------------------------------------------------ telemetry
    async def _follow_policies(self) -> None:
        while True:
            await self._contexts_changed.wait()
            self._contexts_changed.clear()
            by_policy: dict[str, Any] = {}
            for key, record in self.contexts.items():
                by_policy.setdefault(key.partition(".")[0], record.context)
            queries, interval, problems = telemetry.desired_queries(by_policy)
            self.collector.update(queries, interval)
            for policy, message in problems:
                await self.bus.report(wire.ErrorEvent(kind="policy", name=policy,
                                                      message=f"telemetry: {message}"))
            await asyncio.sleep(0.05)  # coalesce bursts of context writes

    async def _publish_telemetry(self, snap: wire.Telemetry) -> None:
        await self.bus.publish(self.bus.subjects.telemetry(snap.source), snap, msg_id=snap.id)

    async def _status(self) -> None:
        """Keep the collector's state (source up or down, queries) in the status bucket."""
        while True:
            data = wire.encode(self.collector.status())
            try:
                await self.bus.kv(subjects.BUCKET_STATUS).put("telemetry", data)
            except Exception as exc:
                log.debug("could not store telemetry status", error=str(exc))
            await asyncio.sleep(2.0)
