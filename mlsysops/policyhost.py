"""Policies as the analyzer and planner host them: loaded, initialised, watched, quarantined.

Wraps :class:`mlsysops.plugins.PluginDirectory` for policies: after a file (re)loads, its
``initialize()`` runs once to read the framework settings (interval, scope, core, ...);
any failure there is a load error. Failures of ``analyze``/``plan`` are counted per
policy (only the policy's own: a call ended by an unload is not one, see :meth:`failed`);
after ``quarantine_after`` consecutive ones the policy is quarantined until its file
changes. Load and quarantine state is published to the ``status`` bucket and every
failure as an error event on ``error.policy.<name>``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mlsysops import logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import PluginError
from mlsysops.plugins import Plugin, PluginDirectory, PluginUnloaded
from mlsysops.policies import PolicySettings, check_context, policy_settings

log = logs.get(__name__)
SCAN_EVERY = 1.0


@dataclass
class Policy:
    plugin: Plugin
    settings: PolicySettings
    initial: dict[str, Any]
    failures: int = 0
    quarantined: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.plugin.name


class PolicyHost:
    """The loaded policies of one service, rescanned every second."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.directory = PluginDirectory("policy", bus.settings.policy_dir, ("analyze", "plan"),
                                         threads=bus.settings.plugin_threads)
        self.policies: dict[str, Policy] = {}
        self.loaded = asyncio.Event()
        self.listeners: list[Any] = []

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def active(self) -> list[Policy]:
        return [p for p in self.policies.values() if not p.quarantined]

    async def watch(self) -> None:
        while True:
            await self.rescan()
            self.loaded.set()
            await asyncio.sleep(SCAN_EVERY)

    async def rescan(self) -> None:
        for name, plugin in self.directory.scan():
            self.policies.pop(name, None)
            if plugin is None:
                await self._publish_status(wire.PluginStatus(kind="policy", name=name,
                                                             loaded=False, error="removed"))
            else:
                await self._activate(plugin)
            for listener in self.listeners:
                listener(name)

    async def _activate(self, plugin: Plugin) -> None:
        if plugin.loaded:
            try:
                initial = await self._initial_context(plugin)
                self.policies[plugin.name] = Policy(plugin, policy_settings(plugin.name, initial),
                                                    initial)
            except PluginError as exc:
                plugin.error, plugin.traceback = exc.message, exc.traceback
        status = wire.PluginStatus(kind="policy", name=plugin.name, loaded=plugin.name in
                                   self.policies, path=str(plugin.path), error=plugin.error,
                                   traceback=plugin.traceback)
        await self._publish_status(status)
        if plugin.error:
            await self.bus.report(wire.ErrorEvent(kind="policy", name=plugin.name,
                                                  message=f"failed to load: {plugin.error}",
                                                  traceback=plugin.traceback))

    async def _initial_context(self, plugin: Plugin) -> dict[str, Any]:
        if plugin.function("initialize") is None:
            return {}
        context = await plugin.call("initialize", timeout=self.bus.settings.call_timeout)
        return check_context(plugin.name, context, what="initialize()")

    async def _publish_status(self, status: wire.PluginStatus) -> None:
        status.service, status.updated_at = self.bus.service, wire.now()
        key = f"plugin.{self.bus.service}.policy.{status.name}"
        try:
            await self.bus.kv(subjects.BUCKET_STATUS).put(key, wire.encode(status))
        except Exception as exc:
            log.warning("could not store plugin status", error=str(exc))

    # ------------------------------------------------------------- failures
    async def succeeded(self, policy: Policy) -> None:
        policy.failures = 0

    async def failed(self, policy: Policy, app: str, what: str, exc: PluginError) -> None:
        """Count a failure, report it, and quarantine the policy when it keeps failing.

        Only the policy's own errors count: it raised, returned something unusable,
        overran its deadline once running, or every one of its threads is still held by
        calls that did. A call that could not run or was cut short because the policy was
        unloaded (its file changed or was removed; the service is stopping) is not its
        failure: it is logged, neither counted nor reported. Waiting for one of its
        threads is never a failure (that wait has no deadline).
        """
        if isinstance(exc, PluginUnloaded):
            log.info("call ended by an unload, not counted", policy=policy.name, app=app,
                     call=what, reason=exc.message)
            return
        policy.failures += 1
        await self.bus.report(wire.ErrorEvent(kind="policy", name=policy.name, app=app,
                                              message=f"{what}: {exc.message}",
                                              traceback=exc.traceback))
        limit = self.bus.settings.quarantine_after
        if policy.failures >= limit and not policy.quarantined:
            policy.quarantined = True
            message = (f"quarantined after {policy.failures} consecutive failures; "
                       "it runs again when its file changes")
            await self.bus.report(wire.ErrorEvent(kind="policy", name=policy.name,
                                                  message=message))
            await self._publish_status(wire.PluginStatus(
                kind="policy", name=policy.name, loaded=True, path=str(policy.plugin.path),
                error=message))
            for listener in self.listeners:
                listener(policy.name)
