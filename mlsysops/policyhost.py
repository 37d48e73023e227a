"""Policies as the analyzer and planner host them: loaded, initialised, watched, quarantined.

Wraps :class:`mlsysops.plugins.PluginDirectory` for policies: after a file (re)loads, its
``initialize()`` runs once to read the framework settings (interval, scope, core, ...);
any failure there is a load error. Failures of ``analyze``/``plan`` are counted per
policy (only the policy's own: a call ended by an unload is not one, see :meth:`failed`);
after ``quarantine_after`` consecutive ones the policy is quarantined until its file
changes. Load and quarantine state is published to the ``status`` bucket and every
failure as an error event on ``error.policy.<name>``.

A changed file is swapped in atomically: it is imported off the event loop and
initialised while the old version keeps serving, and only then replaces it (so verdicts
arriving meanwhile are handled, by the old version). A new version that fails to import
or to initialise is reported and the old one goes on serving. The digests of the
versions served are remembered, so that the planner can tell a verdict made by an
older version from one made by a version it has not loaded yet.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlsysops import logs, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import PluginError
from mlsysops.plugins import Change, Plugin, PluginDirectory, PluginUnloaded, kept_message
from mlsysops.policies import PolicySettings, check_context, policy_settings

log = logs.get(__name__)
SCAN_EVERY = 1.0
VERSIONS_KEPT = 64  # digests remembered per policy (see PolicyHost.served)


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
        self._versions: dict[str, deque[str]] = {}  # digests served, per policy
        self._scanning = asyncio.Lock()

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def active(self) -> list[Policy]:
        return [p for p in self.policies.values() if not p.quarantined]

    def served(self, name: str, digest: str) -> bool:
        """Whether version ``digest`` of policy ``name`` was loaded and served here."""
        return digest in self._versions.get(name, ())

    async def watch(self) -> None:
        while True:
            await self.rescan()
            self.loaded.set()
            await asyncio.sleep(SCAN_EVERY)

    async def rescan(self) -> None:
        async with self._scanning:
            for change in await self.directory.prepare():
                await self._take(change)

    def _notify(self, name: str) -> None:
        for listener in self.listeners:
            listener(name)

    async def _take(self, change: Change) -> None:
        """Initialise a new version, then swap it in (or keep the old one if it failed)."""
        name, new = change.name, change.plugin
        if new is None:
            self.directory.commit(change)
            self.policies.pop(name, None)
            self._notify(name)
            await self._publish_status(wire.PluginStatus(kind="policy", name=name,
                                                         loaded=False, error="removed"))
            return
        policy = await self._initialized(new) if new.loaded else None
        # No await from here to the swap: nothing sees the policy missing meanwhile.
        serving = self.directory.commit(change)
        if policy is not None:
            self.policies[name] = policy
            self._versions.setdefault(name, deque(maxlen=VERSIONS_KEPT)).append(new.digest)
        elif serving is None or serving is new:
            self.policies.pop(name, None)
        self._notify(name)  # before any await: the analyzer's pairs follow the swap at once
        await self._report_load(new, serving if serving is not new else None)

    async def _initialized(self, plugin: Plugin) -> Policy | None:
        """The policy of a loaded ``plugin`` once ``initialize()`` passed; else None."""
        try:
            initial = await self._initial_context(plugin)
            return Policy(plugin, policy_settings(plugin.name, initial), initial)
        except PluginError as exc:
            plugin.fail(exc.message, exc.traceback)
            log.error("policy failed to initialise", policy=plugin.name, error=exc.message)
            return None

    async def _report_load(self, plugin: Plugin, kept: Plugin | None) -> None:
        """Publish the load state after ``plugin`` was loaded; ``kept``: still serving."""
        error = plugin.error
        if error and kept is not None:
            error = kept_message(error, plugin, kept)
        status = wire.PluginStatus(kind="policy", name=plugin.name,
                                   loaded=plugin.name in self.policies, path=str(plugin.path),
                                   error=error, traceback=plugin.traceback)
        await self._publish_status(status)
        if error:
            await self.bus.report(wire.ErrorEvent(kind="policy", name=plugin.name,
                                                  message=f"failed to load: {error}",
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
        unloaded (its file was removed; the service is stopping), or that a version
        already replaced refused, is not its failure: it is logged, neither counted nor
        reported. Waiting for one of its threads is never a failure (that wait has no
        deadline). A replaced version's failures are reported, but only the serving
        version is ever quarantined.
        """
        if isinstance(exc, PluginUnloaded):
            log.info("call ended by an unload, not counted", policy=policy.name, app=app,
                     call=what, reason=exc.message)
            return
        policy.failures += 1
        await self.bus.report(wire.ErrorEvent(kind="policy", name=policy.name, app=app,
                                              message=f"{what}: {exc.message}",
                                              traceback=exc.traceback))
        if self.policies.get(policy.name) is not policy:
            return  # a replaced version finishing its calls: quarantine is the serving one's
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
            self._notify(policy.name)

