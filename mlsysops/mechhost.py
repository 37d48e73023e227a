"""Mechanisms as the executor and scheduler host them.

The executor calls ``apply``/``get_status``/``get_options``; the scheduler only calls
``conflict_key`` (which narrows what counts as "the same mechanism"). Both load the same
directory, rescanned every second, and publish load errors like policies do.

Reloading is as for policies (:mod:`mlsysops.plugins`): files are imported off the event
loop (the scheduler renews its lease on it), a new version replaces the old one at once,
an ``apply`` running on the old version finishes there (its outcome is known, not cut
short into "unknown"), and a changed file that fails to load leaves the old version
serving, with the error reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from mlsysops import logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import PluginError
from mlsysops.plugins import Change, Plugin, PluginDirectory, kept_message

log = logs.get(__name__)
SCAN_EVERY = 1.0
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class MechanismHost:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.directory = PluginDirectory("mechanism", bus.settings.mechanism_dir, ("apply",),
                                         threads=bus.settings.plugin_threads)
        self.loaded = asyncio.Event()
        self.listeners: list[Any] = []  # async (name, the version serving or None)
        self._scanning = asyncio.Lock()

    def get(self, name: str) -> Plugin | None:
        return self.directory.get(name)

    def names(self) -> list[str]:
        return sorted(self.directory.loaded())

    async def watch(self) -> None:
        while True:
            await self.rescan()
            self.loaded.set()
            await asyncio.sleep(SCAN_EVERY)

    async def rescan(self) -> None:
        """Import what changed off the loop, then put each change in place."""
        async with self._scanning:
            for change in await self.directory.prepare():
                serving = self.directory.commit(change)
                await self._publish(change, serving)
                for listener in self.listeners:
                    await listener(change.name, serving)

    async def _publish(self, change: Change, serving: Plugin | None) -> None:
        """The load state after ``change``: of the new version, or of the one kept."""
        name, new = change.name, change.plugin
        error = new.error if new is not None else "removed"
        if new is not None and serving is not None and serving is not new:
            error = kept_message(error, new, serving)
        shown = serving or new
        status = wire.PluginStatus(
            kind="mechanism", name=name, loaded=bool(serving and serving.loaded),
            path=str(shown.path) if shown else "", error=error,
            traceback=new.traceback if new else "", service=self.bus.service,
            updated_at=wire.now())
        key = f"plugin.{self.bus.service}.mechanism.{name}"
        try:
            await self.bus.kv(subjects.BUCKET_STATUS).put(key, wire.encode(status))
        except Exception as exc:
            log.warning("could not store plugin status", error=str(exc))
        if new is not None and new.error:
            await self.bus.report(wire.ErrorEvent(kind="mechanism", name=name,
                                                  message=f"failed to load: {error}",
                                                  traceback=new.traceback))

    async def conflict_keys(self, plugin: Plugin, command: Any) -> list[str]:
        """The keys ``command`` claims on its mechanism, all or none.

        A mechanism's ``conflict_key(command)`` returns one key (a string), several (a
        list: the command conflicts with any command claiming one of them), or None.
        Without the function, or for None, the command claims the whole mechanism
        (``[""]``); an empty list claims nothing (the command conflicts with none).
        """
        if plugin.function("conflict_key") is None:
            return [""]
        key = await plugin.call("conflict_key", command, timeout=self.bus.settings.call_timeout)
        if key is None:
            return [""]
        if isinstance(key, str | int) and not isinstance(key, bool):
            return [str(key)]
        if isinstance(key, list | tuple) and all(
                isinstance(k, str | int) and not isinstance(k, bool) for k in key):
            return list(dict.fromkeys(str(k) for k in key))
        raise PluginError(plugin.name, f"conflict_key() must return a string or a list of "
                                       f"strings, got {type(key).__name__}")


def claim_key(mechanism: str, conflict_key: str) -> str:
    """KV key of the claim on ``mechanism`` for ``conflict_key``."""
    if not conflict_key:
        token = "_all"
    elif _SAFE.match(conflict_key):
        token = conflict_key
    else:
        token = "h" + hashlib.blake2b(conflict_key.encode(), digest_size=10).hexdigest()
    return f"claim.{mechanism}.{token}"
