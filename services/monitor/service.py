"""Monitor: the loop's inputs.

Descriptions: operators publish on ``desc.<kind>.<name>``. The intake stream captures
every publication (with or without a reply subject, also while no monitor runs), and the
monitors take them in one at a time in stream order from one shared durable consumer:
validate, store accepted ones in the ``desc`` bucket (an empty payload deletes), announce
the outcome on ``desc_result.<kind>.<name>``. So the accepted state follows publish order
whichever monitor validates, and a monitor that comes up takes in what was published
while none ran. A request (a publication with a reply subject) is answered, by the monitor
the queue group hands it to, with the outcome of that publication. A stored description
carries a ``generation``: new when its key did not exist or was deleted, kept on updates,
so a name deleted and published again is a new application to the loop. Rejections also go
to ``error.desc`` and never replace the last accepted description.

Telemetry: the Monitor follows every policy context (every application of every policy)
and collects the union of what they ask for (``telemetry.metrics``) at the smallest
``telemetry.system_scrape_interval``; the set and the period change at once when contexts
change. One monitor replica collects, the holder of the ``leader.monitor`` lease (another
takes over within seconds when it dies), so any number of replicas give one snapshot per
interval. Snapshots go to ``telemetry.<source>``, kept in JetStream for the configured
retention.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
import uuid
from typing import Any

import msgspec
import nats.js.errors as jserr
from nats.aio.msg import Msg

from mlsysops import descriptions, http, logs, subjects, telemetry, wire
from mlsysops.bus import Bus, KVCache
from mlsysops.consumer import consume
from mlsysops.energy import validate_energy
from mlsysops.lease import Lease
from mlsysops.state import desc_key

log = logs.get(__name__)

COLLECTOR_LEASE = "leader.monitor"  # the one monitor replica that collects telemetry
LEASE_TTL = 5.0
INTAKE_ACK_WAIT = 4.0  # a description held by a monitor that died comes back this soon
REPLY_WAIT = 10.0  # longest a request waits for its outcome (then: "queued")


class Monitor:
    name = "monitor"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        s = bus.settings
        self.source: Any = (telemetry.PrometheusSource(s.prometheus_url) if s.prometheus_url
                            else telemetry.HostSource())
        self.collector = telemetry.Collector(self.source, self._publish_telemetry, bus.report,
                                             default_interval=s.telemetry_interval)
        self.lease = Lease(bus, COLLECTOR_LEASE, ttl=LEASE_TTL, what="telemetry collector")
        # the telemetry section of every context record (policy.app -> section, encoded):
        # the collector follows their union, recomputed only when a section changes
        self._wishes: dict[str, bytes] = {}
        self.contexts: KVCache[wire.ContextRecord] = KVCache(
            bus, subjects.BUCKET_CONTEXT, ">", wire.CONTEXT_RECORD.decode, self._on_context)
        self._contexts_changed = asyncio.Event()
        self._outcomes = Outcomes()
        self._intake_ready = False

    def tasks(self) -> list[Any]:
        return [self._intake(), self._answer_requests(), self._follow_outcomes(),
                self.contexts.run(), self._follow_policies(), self.lease.hold(self.collector.run),
                self._status()]

    def ready(self) -> bool:
        return self._intake_ready

    def role(self) -> str:
        return "collector" if self.lease.held else "standby"

    # ------------------------------------------------------------ descriptions
    async def _intake(self) -> None:
        """Take descriptions from the intake stream, one at a time, in publish order."""
        self._intake_ready = True
        await consume(self.bus, subjects.INTAKE_FAMILY, "monitor", self._take_in,
                      concurrency=1, ack_wait=INTAKE_ACK_WAIT, max_ack_pending=1)

    async def _take_in(self, msg: Msg) -> None:
        reply = await self.take(msg.subject, msg.data, seq=msg.metadata.sequence.stream)
        try:
            await self.bus.nc.publish(  # type: ignore[union-attr]
                self.bus.subjects.desc_result(reply.kind, reply.name), wire.encode(reply))
        except Exception as exc:  # the outcome is stored; only its announcement is lost
            log.warning("could not announce a description's outcome", error=repr(exc))
        await msg.ack()

    async def take(self, subject: str, data: bytes, *, seq: int = 0) -> wire.DescReply:
        """Validate and store one description; the reply says what happened."""
        http.MESSAGES.labels("monitor", "desc").inc()
        tokens = subject.split(".")
        kind, name = tokens[-2], tokens[-1]
        if kind not in subjects.DESC_KINDS:
            known = ", ".join(subjects.DESC_KINDS)
            reply = wire.DescReply(accepted=False, kind=kind, name=name, errors=[wire.FieldError(
                "$", f"unknown description kind {kind!r}: use one of {known}")])
        else:
            try:
                reply = await self._store(kind, name, data, seq)
            except Exception as exc:  # a bug must refuse one description, not leave no answer
                log.error("description intake failed", subject=subject, error=repr(exc),
                          exc_info=exc)
                reply = wire.DescReply(accepted=False, kind=kind, name=name, errors=[
                    wire.FieldError("$", f"internal error while storing: {exc!r}")])
        reply.seq, reply.digest = seq, wire.payload_digest(data)
        if not reply.accepted:
            await self.bus.report(wire.ErrorEvent(
                kind="desc", name=name, message=f"{kind} {name!r} rejected: " + "; ".join(
                    f"{e.path}: {e.message}" for e in reply.errors),
                details={"reply": msgspec.to_builtins(reply)}), subject_name=False)
        return reply

    async def _answer_requests(self) -> None:
        """Answer each request with the outcome of its description, once taken in."""
        sub = await self.bus.nc.subscribe(self.bus.subjects.desc_all, queue="monitor")  # type: ignore[union-attr]
        async for msg in sub.messages:
            if msg.reply:
                task = asyncio.ensure_future(self._answer(msg))
                self._outcomes.tasks.add(task)
                task.add_done_callback(self._outcomes.tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        kind, name, digest = tokens[-2], tokens[-1], wire.payload_digest(msg.data)
        reply = await self._outcomes.wait(kind, name, digest, REPLY_WAIT)
        if reply is None:
            reply = wire.DescReply(accepted=False, kind=kind, name=name, digest=digest,
                                   queued=True, warnings=[wire.FieldError("$", (
                                       f"taken in but not validated within {REPLY_WAIT:.0f}s "
                                       "(a backlog); the outcome follows on "
                                       f"{self.bus.subjects.desc_result(kind, name)}"))])
        try:
            await msg.respond(wire.encode(reply))
        except Exception as exc:
            log.debug("could not answer a description request", error=repr(exc))

    async def _follow_outcomes(self) -> None:
        sub = await self.bus.nc.subscribe(self.bus.subjects.desc_result_all)  # type: ignore[union-attr]
        async for msg in sub.messages:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                self._outcomes.arrived(wire.DESC_REPLY.decode(msg.data))

    async def _store(self, kind: str, name: str, payload: bytes, seq: int) -> wire.DescReply:
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
        stored = None if result.deleted else wire.StoredDescription(
            kind=kind, name=reply.name, spec=result.spec or {}, accepted_at=wire.now(), seq=seq)
        revision, superseded = await self._write(desc_key(kind, reply.name), stored, seq)
        if superseded:
            reply.warnings.append(wire.FieldError("$", (
                "valid, but a later publication of this description was taken in first; "
                "the later one stays")))
            return reply
        reply.revision = revision
        log.info("description deleted" if stored is None else "description accepted",
                 kind=kind, name=reply.name, revision=revision, seq=seq,
                 warnings=len(reply.warnings))
        return reply

    async def _write(self, key: str, stored: wire.StoredDescription | None,
                     seq: int) -> tuple[int, bool]:
        """Store (or delete, for None) with compare-and-set; ``(revision, superseded)``.

        Descriptions are taken in one at a time in stream order, so the entry changes under
        us only if a later publication was stored meanwhile (this one was redelivered after
        its monitor stalled): then this one is superseded and not written. An update keeps
        the entry's generation; a new or deleted key gets a new one.
        """
        kv = self.bus.kv(subjects.BUCKET_DESC)
        try:
            entry = await kv.get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            entry = None
        previous = None
        if entry is not None and entry.value:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                previous = wire.STORED_DESC.decode(entry.value)
        if previous is not None and seq and previous.seq > seq:
            return 0, True
        try:
            if stored is None:
                if entry is not None:
                    await kv.delete(key, last=entry.revision)
                return 0, False
            stored.generation = (previous.generation if previous is not None
                                 else uuid.uuid4().hex[:16])
            if entry is not None:
                return int(await kv.update(key, wire.encode(stored), last=entry.revision)), False
            return int(await kv.create(key, wire.encode(stored))), False
        except jserr.KeyWrongLastSequenceError:
            return 0, True

    # ------------------------------------------------------------ telemetry
    def _on_context(self, key: str, record: wire.ContextRecord | None) -> None:
        """Keep the telemetry section of each context; wake the follower if one changed."""
        section = None if record is None else record.context.get("telemetry")
        encoded = b"" if section is None else wire.encode(section)
        if self._wishes.get(key, b"") == encoded:
            return
        if encoded:
            self._wishes[key] = encoded
        else:
            self._wishes.pop(key, None)
        self._contexts_changed.set()

    async def _follow_policies(self) -> None:
        """Collect the union of every context's wishes (every application of every policy)."""
        while True:
            await self._contexts_changed.wait()
            self._contexts_changed.clear()
            queries, interval, problems = telemetry.desired_queries(
                {key: {"telemetry": msgspec.json.decode(section)}
                 for key, section in self._wishes.items()})
            self.collector.update({q: {k.partition(".")[0] for k in askers}
                                   for q, askers in queries.items()}, interval)
            for policy, message in sorted({(k.partition(".")[0], m) for k, m in problems}):
                await self.bus.report(wire.ErrorEvent(kind="policy", name=policy,
                                                      message=f"telemetry: {message}"))
            await asyncio.sleep(0.05)  # coalesce bursts of context writes

    async def _publish_telemetry(self, snap: wire.Telemetry) -> None:
        await self.bus.publish(self.bus.subjects.telemetry(snap.source), snap, msg_id=snap.id)

    async def _status(self) -> None:
        """Keep the collector's state (source up or down, queries) in the status bucket."""
        while True:
            if self.lease.held:  # the collecting replica says how collection goes
                data = wire.encode({**self.collector.status(), "collector": self.bus.instance})
                try:
                    await self.bus.kv(subjects.BUCKET_STATUS).put("telemetry", data)
                except Exception as exc:
                    log.debug("could not store telemetry status", error=str(exc))
            await asyncio.sleep(0.5 if not self.lease.held else 2.0)


_Key = tuple[str, str, str]  # kind, name, payload digest


class Outcomes:
    """Outcomes announced on ``desc_result``, matched to the requests waiting for them.

    The request and the stream's copy of a description arrive independently (and maybe at
    different monitors), so a request waits for the outcome of its subject and payload; an
    outcome that came first is kept for ``KEEP`` s.
    """

    KEEP = 2.0

    def __init__(self) -> None:
        self._waiting: dict[_Key, list[asyncio.Future[wire.DescReply]]] = {}
        self._recent: collections.OrderedDict[_Key, tuple[float, wire.DescReply]] = (
            collections.OrderedDict())
        self.tasks: set[asyncio.Future[None]] = set()

    def arrived(self, reply: wire.DescReply) -> None:
        key = (reply.kind, reply.name, reply.digest)
        for future in self._waiting.pop(key, []):
            if not future.done():
                future.set_result(reply)
        self._recent[key] = (time.monotonic(), reply)
        self._recent.move_to_end(key)
        too_old = time.monotonic() - self.KEEP
        while self._recent and (len(self._recent) > 4096 or
                                next(iter(self._recent.values()))[0] < too_old):
            self._recent.popitem(last=False)

    async def wait(self, kind: str, name: str, digest: str,
                   timeout: float) -> wire.DescReply | None:
        key = (kind, name, digest)
        seen = self._recent.get(key)
        if seen is not None and seen[0] >= time.monotonic() - self.KEEP:
            return seen[1]
        future: asyncio.Future[wire.DescReply] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiting.get(key, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(key, None)
