"""A lease in the ``leases`` bucket: work that must run in exactly one replica at a time.

The scheduler decides plans in one replica, and the monitor collects telemetry in one
replica (two collectors would give two snapshots per interval). :class:`Lease` is the
shared piece: a KV key with a TTL, created by whoever takes it and renewed with
compare-and-set by its holder. Standbys try to take it every ``renew_every`` s and the
first to succeed runs the work when the holder dies (after at most ``ttl`` s) or stops
(at once: a stopping holder deletes its key).

A renewal or take that meets a NATS leader election is retried (see
:func:`mlsysops.bus.retrying`), but a renewal only for ``ttl - 2 x renew_every`` s in all:
a holder that could not renew for longer stops its work before the lease can have expired
and gone to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors as jserr

from mlsysops import logs, subjects, wire
from mlsysops.bus import Bus

log = logs.get(__name__)


class Lease:
    """Run ``work`` while holding the lease ``key``; stand by otherwise."""

    def __init__(self, bus: Bus, key: str, *, ttl: float = 5.0, renew_every: float = 1.0,
                 what: str = "") -> None:
        self.bus = bus
        self.key = key
        self.ttl = ttl
        self.renew_every = renew_every
        self.what = what or key
        self.held = False
        # this process's own value (the token: a restarted or misnamed replica with the
        # same instance name is not taken for us when we take our own key back)
        self._value = wire.encode({"instance": bus.instance, "token": uuid.uuid4().hex})
        self._retry_for = max(ttl / 4, ttl - 2 * renew_every)

    async def hold(self, work: Callable[[], Awaitable[None]]) -> None:
        """Forever: take the lease, run ``work`` while held (restarted if it returns or
        raises), stop it when the lease is lost."""
        while True:
            try:
                revision = await self._take()
            except Exception:
                await asyncio.sleep(self.renew_every)
                continue
            log.info("lease taken", lease=self.what)
            self.held = True
            try:
                await self._run_while_held(work, revision)
            finally:
                self.held = False

    async def _run_while_held(self, work: Callable[[], Awaitable[None]], revision: int) -> None:
        worker = asyncio.ensure_future(work())
        try:
            while True:
                await asyncio.sleep(self.renew_every)
                revision = await self._put(revision)
                if worker.done():  # a transient error (the broker away): start again
                    log.warning("leased work stopped; restarting", lease=self.what,
                                error=repr(worker.exception()) if not worker.cancelled()
                                else "cancelled")
                    worker = asyncio.ensure_future(work())
        except asyncio.CancelledError:
            await self._release(revision)
            raise
        except Exception as exc:
            log.warning("lease lost; standing by", lease=self.what, error=repr(exc))
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _take(self) -> int:
        """Create the lease; also over a delete marker (released, or an operator's ``kv del``),
        or over our own key (a renewal of ours that failed)."""
        try:
            return await self._put(0)
        except jserr.KeyWrongLastSequenceError:
            entry: Any
            try:
                entry = await self.bus.kv(subjects.BUCKET_LEASES).get(self.key)
            except (jserr.KeyDeletedError, jserr.KeyNotFoundError) as gone:
                entry = getattr(gone, "entry", None)  # a delete marker: its revision
                if entry is None or not entry.revision:
                    raise
            else:
                if entry.value != self._value:
                    raise  # held by a live replica
                # still ours: a renewal failed (say in a NATS leader election) and our
                # work was stopped; take it back now rather than wait for it to expire
            return await self._put(entry.revision)

    async def _put(self, last: int) -> int:
        """Our key, compare-and-set on ``last``: retried (a NATS leader election) for at
        most ``_retry_for`` s in all, however long one request hangs."""
        return await asyncio.wait_for(self.bus.put_with_ttl(
            subjects.BUCKET_LEASES, self.key, self._value, self.ttl, last=last),
            self._retry_for)

    async def _release(self, revision: int) -> None:
        """On stop: delete our key now (only if still ours), so a standby takes over at once."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.bus.kv(subjects.BUCKET_LEASES).delete(self.key, last=revision), 2)
            log.info("lease released", lease=self.what)
