"""The connection to NATS JetStream and the state layout every service shares.

A :class:`Bus` connects with the authentication and TLS settings, binds to the streams and
KV buckets (creating what is missing, never changing what exists: see
:mod:`mlsysops.layout`), and offers the few operations the services need:
publishing with a de-duplication id, reporting errors, and KV caches kept current by a
watch.

On a NATS cluster a request can meet a leader election (a node died): it times out, or
JetStream answers that no one leads the stream yet. Publishes and KV operations are
retried for up to :data:`RETRY_FOR` s (:func:`retrying`), each attempt waiting at most
:data:`ATTEMPT_TIMEOUT` s, and fail only then (:class:`Unavailable`, a ``TimeoutError``).
A retry is harmless: a publish carries the same ``Nats-Msg-Id`` each time, and a
compare-and-set write whose earlier attempt was stored after all is recognised by its
value (see :class:`KV`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import nats
import nats.js.api as api
import nats.js.errors as jserr
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from mlsysops import layout, logs, permissions, subjects, wire
from mlsysops.errors import PermanentError
from mlsysops.settings import Settings, redact_url

log = logs.get(__name__)
T = TypeVar("T")

ATTEMPT_TIMEOUT = 5.0  # s: one JetStream request (a request lost in an election is resent)
RETRY_FOR = 20.0  # s: how long an operation is retried while JetStream has no leader
WATCH_HEARTBEAT = 1.0  # s: idle heartbeat of a KVCache's watch (see KVCache._watch)
# JetStream API errors that mean "no leader yet": cluster temporarily unavailable, not leader
_ELECTING = (10008, 10009)


class Unavailable(TimeoutError):
    """JetStream did not answer an operation for :data:`RETRY_FOR` s (a broker away)."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says JetStream is unreachable or electing, not that we asked wrong."""
    if isinstance(exc, Unavailable):
        return False  # already retried for its whole budget
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                        jserr.NoStreamResponseError, jserr.ServiceUnavailableError)):
        return True
    return isinstance(exc, jserr.APIError) and getattr(exc, "err_code", None) in _ELECTING


async def retrying(attempt: Callable[[bool], Awaitable[T]], what: str) -> T:
    """``await attempt(retried)`` until it succeeds or fails for another reason than
    :func:`transient`, with a growing pause (0.1 s to 2 s); ``retried`` is True once an
    earlier attempt failed (its outcome may be unknown: a timeout can hide a success)."""
    deadline = time.monotonic() + RETRY_FOR
    pause, retried = 0.1, False
    while True:
        try:
            return await attempt(retried)
        except Exception as exc:
            if not transient(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise Unavailable(f"{what}: JetStream did not answer within {RETRY_FOR:g} s "
                                  f"({exc!r})") from exc
            log.info("jetstream unavailable; retrying", what=what, error=repr(exc))
        await asyncio.sleep(pause)
        pause, retried = min(pause * 2, 2.0), True


def instance_name(settings: Settings) -> str:
    return settings.instance or f"{socket.gethostname()}-{__import__('os').getpid()}"


def connect_options(s: Settings) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` for these settings (auth, TLS, reconnect)."""
    opts: dict[str, Any] = {
        "servers": [u.strip() for u in s.nats_url.split(",") if u.strip()],
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 3,
    }
    if s.nats_user:
        opts["user"], opts["password"] = s.nats_user, s.nats_password
    if s.nats_token:
        opts["token"] = s.nats_token
    if s.nats_nkey_seed:
        opts["nkeys_seed"] = s.nats_nkey_seed
    if s.nats_creds:
        opts["user_credentials"] = s.nats_creds
    if s.nats_tls_ca or s.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=s.nats_tls_ca or None)
        if s.nats_tls_cert:
            ctx.load_cert_chain(s.nats_tls_cert, s.nats_tls_key or None)
        opts["tls"] = ctx
    return opts


class ConnectRefused(PermanentError):
    """The server refused the credentials: retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _who(s: Settings) -> str:
    if s.nats_user:
        return f"the user {s.nats_user!r}"
    if s.nats_token:
        return "the token"
    if s.nats_nkey_seed:
        return f"the NKey in {s.nats_nkey_seed}"
    if s.nats_creds:
        return f"the credentials in {s.nats_creds}"
    if s.nats_tls_cert:
        return f"the client certificate {s.nats_tls_cert}"
    return "an anonymous connection"


class Bus:
    """One service's connection to NATS and JetStream."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.instance = instance_name(settings)
        self.subjects = subjects.Subjects(settings.prefix)
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}
        self.changes: list[layout.Change] = []  # what connect() created, changed or found
        self.connected = asyncio.Event()
        self._refused = asyncio.Event()
        self._closing = False

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "Bus.connect() first"
        return self._js

    # ----------------------------------------------------------------- connection
    async def connect(self, mode: layout.Mode = "service") -> None:
        """Connect (retrying until the server answers), then bind to the layout: create
        what is missing (``service``), also change what differs (``init``), or neither
        (``read``: a layout of nothing raises :class:`~mlsysops.layout.NoControlPlane`)."""
        opts = connect_options(self.settings)
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                self.nc = await self._connect_once(opts)
        assert self.nc is not None
        self._js = self.nc.jetstream(timeout=ATTEMPT_TIMEOUT)
        await permissions.check(self.nc, self.service, self.settings.prefix)
        # on a fresh cluster the streams just created elect their leaders meanwhile
        self.changes = await retrying(lambda _: self.ensure(mode), "bind to the layout")
        self.connected.set()
        log.info("connected", servers=[redact_url(u) for u in opts["servers"]],
                 instance=self.instance)

    async def _connect_once(self, opts: dict[str, Any]) -> Client:
        """One connection; refused credentials stop at once (nats.py would retry for ever)."""
        nc = Client()
        self._refused = asyncio.Event()
        task = asyncio.ensure_future(nc.connect(
            name=f"mlsysops-{self.service}-{self.instance}", error_cb=self._on_error,
            disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect, **opts))
        refused = asyncio.ensure_future(self._refused.wait())
        await asyncio.wait({task, refused}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            refused.cancel()
            task.result()
            return nc
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectRefused(f"NATS at {', '.join(redact_url(u) for u in opts['servers'])} "
                             f"refused {_who(self.settings)} (Authorization Violation): check "
                             "--nats-user/--nats-password, --nats-token, --nats-nkey-seed, "
                             "--nats-creds or the client certificate")

    async def close(self) -> None:
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.flush(), 2)
            except Exception:
                pass
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)

    async def _on_error(self, exc: Exception) -> None:
        refused = isinstance(exc, nats.errors.AuthorizationError) or (
            "authorization violation" in str(exc).lower())  # how nats.py reports it at connect
        if refused and not self.connected.is_set():
            self._refused.set()
            return
        log.warning("nats error", error=str(exc))

    async def _on_disconnect(self) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("disconnected from nats")

    async def _on_reconnect(self) -> None:
        self.connected.set()
        log.info("reconnected to nats")

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    # ----------------------------------------------------------------- layout
    async def ensure(self, mode: layout.Mode = "service") -> list[layout.Change]:
        """Bind to the streams and buckets (see :mod:`mlsysops.layout` for what ``mode``
        may create or change) and return what was created, changed or differs."""
        changes = await layout.reconcile(self.js, self.settings, mode)
        for role, cfg in layout.buckets(self.settings):
            try:
                self._kv[role] = await self.js.key_value(cfg.bucket or "")
            except jserr.BucketNotFoundError:
                if mode != "read":
                    raise
        return changes

    def kv(self, role: str) -> KV:
        return KV(self._kv[role])

    # ----------------------------------------------------------------- messages
    async def publish(self, subject: str, obj: Any, msg_id: str | None = None) -> api.PubAck:
        """Publish ``obj`` (a wire Struct) into JetStream, retrying while it is unavailable.

        ``msg_id`` (a random one if not given) makes a retry harmless: JetStream stores a
        message once per id within its duplicate window.
        """
        headers = {"Nats-Msg-Id": msg_id or uuid.uuid4().hex}
        data = wire.encode(obj)
        return await retrying(lambda _: self.js.publish(subject, data, headers=headers),
                              f"publish on {subject}")

    async def report(self, event: wire.ErrorEvent, *, subject_name: bool = True,
                     msg_id: str | None = None) -> None:
        """Publish an error event on ``error.<kind>.<name>`` and log it; never raises.

        With ``subject_name=False`` the subject is ``error.<kind>`` (descriptions).
        """
        if not event.at:
            event.at = wire.now()
        log.error("reported", kind=event.kind, name=event.name, app=event.app, error=event.message)
        tokens = [event.kind, event.name] if event.name and subject_name else [event.kind]
        try:
            await self.publish(self.subjects.error(*tokens), event, msg_id=msg_id)
        except Exception as exc:
            log.warning("could not publish error event", error=str(exc))

    async def drop(self, msg: Any, reason: str) -> None:
        """Report a loop message that can never be handled, and terminate it (no redelivery)."""
        await self.report(wire.ErrorEvent(kind="service", name=self.service,
                                          message=f"{reason}; dropped",
                                          details={"subject": msg.subject}))
        await msg.term()

    async def put_with_ttl(
        self, role: str, key: str, value: bytes, ttl: float, last: int | None = None
    ) -> int:
        """Put a KV entry that expires after ``ttl`` s (compare-and-set when ``last``),
        retrying while JetStream is unavailable (see :func:`retrying`)."""
        headers = {"Nats-TTL": f"{max(1, int(ttl))}s"}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        subject = f"$KV.{self.subjects.bucket(role)}.{key}"

        async def attempt(retried: bool) -> int:
            try:
                return (await self.js.publish(subject, value, headers=headers)).seq
            except jserr.APIError as exc:
                if getattr(exc, "err_code", None) not in (10071, 10164):
                    raise
                if retried:  # our earlier attempt may have been stored after all
                    mine = await self.kv(role).written(key, value)
                    if mine is not None:
                        return mine
                raise jserr.KeyWrongLastSequenceError(description=exc.description) from None

        return await retrying(attempt, f"put {key}")


class KV:
    """A KV bucket whose operations are retried while JetStream is unavailable.

    A compare-and-set write (``create``, ``update``, ``delete`` with ``last``) that is
    retried after an attempt whose outcome is unknown (a timeout) can find that attempt's
    own write: it then fails with wrong-last-sequence. Before that counts as a conflict,
    the key is read again; if it holds the value being written (or, for a delete, is
    gone), the earlier attempt succeeded and so does this call.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.raw = kv

    def __getattr__(self, name: str) -> Any:  # anything else, as nats.py has it
        return getattr(self.raw, name)

    async def get(self, key: str, revision: int | None = None) -> KeyValue.Entry:
        return await retrying(lambda _: self.raw.get(key, revision), f"get {key}")

    async def put(self, key: str, value: bytes) -> int:
        return await retrying(lambda _: self.raw.put(key, value), f"put {key}")

    async def create(self, key: str, value: bytes) -> int:
        return await self._set(key, value, lambda: self.raw.create(key, value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return await self._set(key, value, lambda: self.raw.update(key, value, last=last))

    async def delete(self, key: str, last: int | None = None) -> bool:
        async def attempt(retried: bool) -> bool:
            try:
                return await self.raw.delete(key, last=last)
            except jserr.KeyWrongLastSequenceError:
                if retried and await self._gone(key):
                    return True
                raise

        return await retrying(attempt, f"delete {key}")

    async def purge(self, key: str, msg_ttl: float | None = None) -> bool:
        return await retrying(lambda _: self.raw.purge(key, msg_ttl=msg_ttl), f"purge {key}")

    async def keys(self, **kwargs: Any) -> list[str]:
        return await retrying(lambda _: self.raw.keys(**kwargs), "keys")

    async def watch(self, keys: str, **kwargs: Any) -> KeyValue.KeyWatcher:
        return await retrying(lambda _: self.raw.watch(keys, **kwargs), f"watch {keys}")

    async def written(self, key: str, value: bytes) -> int | None:
        """The revision of ``key`` if it holds ``value`` now (one attempt, no retry)."""
        try:
            entry = await self.raw.get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return None
        return entry.revision if entry.value == value else None

    async def _gone(self, key: str) -> bool:
        try:
            await self.raw.get(key)
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return True
        return False

    async def _set(self, key: str, value: bytes, write: Callable[[], Awaitable[int]]) -> int:
        async def attempt(retried: bool) -> int:
            try:
                return await write()
            except jserr.KeyWrongLastSequenceError:
                mine = await self.written(key, value) if retried else None
                if mine is None:
                    raise
                return mine

        return await retrying(attempt, f"write {key}")


class KVCache(Generic[T]):
    """A local, always-current copy of the keys of one bucket under a prefix.

    Built on a KV watch: every service that needs a key space on each message keeps it in
    memory instead of asking the server each time. ``revision`` of an entry is what a
    compare-and-set update must name.
    """

    def __init__(
        self,
        bus: Bus,
        role: str,
        pattern: str,
        decode: Callable[[bytes], T],
        on_change: Callable[[str, T | None], None] | None = None,
    ) -> None:
        self._bus, self._role, self._pattern = bus, role, pattern
        self._decode = decode
        self._on_change = on_change
        self._items: dict[str, tuple[int, T]] = {}
        self.ready = asyncio.Event()

    def get(self, key: str) -> tuple[int, T] | None:
        return self._items.get(key)

    def value(self, key: str) -> T | None:
        item = self._items.get(key)
        return item[1] if item else None

    def items(self) -> Iterator[tuple[str, T]]:
        for key, (_, value) in list(self._items.items()):
            yield key, value

    def keys(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def apply(self, key: str, revision: int, value: T | None) -> None:
        """Record a change we made ourselves (the watch will confirm it)."""
        current = self._items.get(key)
        if current and current[0] > revision:
            return
        if value is None:
            self._items.pop(key, None)
        else:
            self._items[key] = (revision, value)

    async def run(self) -> None:
        """Follow the bucket forever (re-watching after a broker restart)."""
        while True:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kv watch restarting", bucket=self._role, error=str(exc))
                await asyncio.sleep(0.5)

    async def _watch(self) -> None:
        """What ``KeyValue.watch`` does (the last entry of each key, then every change),
        with a short idle heartbeat: nats.py recreates the watch's consumer after two
        missed heartbeats, so a watch whose consumer died with a NATS node is current
        again ``2 x WATCH_HEARTBEAT`` s after the stream has a leader (10 s with
        ``KeyValue.watch``)."""
        bucket = self._bus.subjects.bucket(self._role)
        pre = f"$KV.{bucket}."
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def deliver(msg: Any) -> None:
            queue.put_nowait(msg)

        sub = await retrying(lambda _: self._bus.js.subscribe(
            pre + self._pattern, stream=f"KV_{bucket}", cb=deliver, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=WATCH_HEARTBEAT,
            inactive_threshold=300), f"watch {bucket} {self._pattern}")
        try:
            info = await retrying(lambda _: sub.consumer_info(), f"watch {bucket}")
            if not info.num_pending and queue.empty():
                self.ready.set()  # nothing stored yet
            while True:
                msg = await queue.get()
                headers = msg.headers or {}
                gone = (headers.get("KV-Operation") in ("DEL", "PURGE")
                        or "Nats-Marker-Reason" in headers or not msg.data)  # TTL markers
                self._handle(msg.subject[len(pre):], msg.metadata.sequence.stream,
                             None if gone else msg.data)
                if not msg.metadata.num_pending:
                    self.ready.set()  # caught up with what was stored
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)

    def _handle(self, key: str, revision: int, data: bytes | None) -> None:
        if data is None:
            self._items.pop(key, None)
            value = None
        else:
            try:
                value = self._decode(data)
            except Exception as exc:
                log.warning("undecodable kv entry", bucket=self._role, key=key, error=str(exc))
                return
            current = self._items.get(key)
            if current and current[0] > revision:
                return
            self._items[key] = (revision, value)
        if self._on_change:
            self._on_change(key, value)
