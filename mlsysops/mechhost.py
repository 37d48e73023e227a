"""Mechanisms as the executor and scheduler host them.

The executor calls ``apply``/``get_status``/``get_options``; the scheduler only calls
``conflict_key`` (which narrows what counts as "the same mechanism"). Both load the same
directory, rescanned every second, and publish load errors like policies do.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from mlsysops import logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import PluginError
from mlsysops.plugins import Plugin, PluginDirectory

log = logs.get(__name__)
SCAN_EVERY = 1.0
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class MechanismHost:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.directory = PluginDirectory("mechanism", bus.settings.mechanism_dir, ("apply",),
                                         threads=bus.settings.plugin_threads)
        self.loaded = asyncio.Event()
        self.listeners: list[Any] = []

    def get(self, name: str) -> Plugin | None:
        return self.directory.get(name)

    def names(self) -> list[str]:
        return sorted(self.directory.loaded())

    async def watch(self) -> None:
        while True:
            for name, plugin in self.directory.scan():
                await self._publish(name, plugin)
                for listener in self.listeners:
                    await listener(name, plugin)
            self.loaded.set()
            await asyncio.sleep(SCAN_EVERY)

    async def _publish(self, name: str, plugin: Plugin | None) -> None:
        status = wire.PluginStatus(
            kind="mechanism", name=name, loaded=bool(plugin and plugin.loaded),
            path=str(plugin.path) if plugin else "", error=plugin.error if plugin else "removed",
            traceback=plugin.traceback if plugin else "", service=self.bus.service,
            updated_at=wire.now())
        key = f"plugin.{self.bus.service}.mechanism.{name}"
        try:
            await self.bus.kv(subjects.BUCKET_STATUS).put(key, wire.encode(status))
        except Exception as exc:
            log.warning("could not store plugin status", error=str(exc))
        if plugin is not None and plugin.error:
            await self.bus.report(wire.ErrorEvent(kind="mechanism", name=name,
                                                  message=f"failed to load: {plugin.error}",
                                                  traceback=plugin.traceback))

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
