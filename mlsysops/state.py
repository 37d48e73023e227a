"""The shared State of the loop, as each service sees it.

Descriptions, mechanism status and telemetry live in JetStream; :class:`StateView` keeps
a current local copy (KV watches and a telemetry subscription) and builds the arguments
policies receive. It also keeps :data:`mlsysops.plugin_api.descriptions` current for
mechanisms.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any

from mlsysops import inbound, logs, plugin_api, subjects, wire
from mlsysops.bus import Bus, KVCache

log = logs.get(__name__)

KIND_KEYS = {"app": "MLSysOpsApp", "cluster": "MLSysOpsCluster", "node": "MLSysOpsNode"}


def desc_key(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def mech_key(name: str) -> str:
    return f"mech.{name}"


class StateView:
    """Descriptions, mechanism status and recent telemetry, kept current."""

    def __init__(self, bus: Bus, *, telemetry: bool = True) -> None:
        self.bus = bus
        self.descs: KVCache[wire.StoredDescription] = KVCache(
            bus, subjects.BUCKET_DESC, ">", wire.STORED_DESC.decode, self._on_desc)
        self.mechs: KVCache[wire.MechanismStatus] = KVCache(
            bus, subjects.BUCKET_STATUS, "mech.*", wire.MECH_STATUS.decode)
        self._want_telemetry = telemetry
        self.snapshots: collections.deque[wire.Telemetry] = collections.deque(
            maxlen=max(1, bus.settings.telemetry_history))
        self.telemetry_listeners: list[Any] = []
        self.app_listeners: list[Any] = []
        # derived views, rebuilt only when what they come from changes
        self._apps: list[str] | None = None
        self._system: dict[str, Any] | None = None

    def tasks(self) -> list[Any]:
        tasks = [self.descs.run(), self.mechs.run()]
        if self._want_telemetry:
            tasks.append(self._follow_telemetry())
        return tasks

    async def wait_ready(self) -> None:
        await asyncio.gather(self.descs.ready.wait(), self.mechs.ready.wait())

    # ---------------------------------------------------------------- descriptions
    def _on_desc(self, key: str, value: wire.StoredDescription | None) -> None:
        kind, _, name = key.partition(".")
        if kind in ("app", "cluster", "node"):
            plugin_api.descriptions.set(kind, name, value.spec if value else None)
        if kind == "app":
            self._apps = None
        else:
            self._system = None
        if kind == "app":
            for listener in self.app_listeners:
                listener(name, value)

    def apps(self) -> list[str]:
        if self._apps is None:
            self._apps = sorted(k.partition(".")[2] for k in self.descs.keys()
                                if k.startswith("app."))
        return self._apps

    def app_description(self, app: str) -> list[dict[str, Any]]:
        """What a policy receives for one application (all of them for ``_global``)."""
        names = self.apps() if app == subjects.GLOBAL_APP else [app]
        out = []
        for name in names:
            stored = self.descs.value(desc_key("app", name))
            if stored is not None:
                out.append({"name": name, "spec": _copy(stored.spec)})
        return out

    def system_description(self) -> dict[str, Any]:
        """Clusters, nodes and energy profiles (a fresh copy for each policy call)."""
        if self._system is None:
            self._system = self._build_system()
        return _copy(self._system)

    def _build_system(self) -> dict[str, Any]:
        clusters = {k.partition(".")[2]: _copy(v.spec) for k, v in self.descs.items()
                    if k.startswith("cluster.")}
        nodes = {k.partition(".")[2]: _copy(v.spec) for k, v in self.descs.items()
                 if k.startswith("node.")}
        energy = {k.partition(".")[2]: _copy(v.spec) for k, v in self.descs.items()
                  if k.startswith("energy.")}
        first = clusters[sorted(clusters)[0]] if clusters else {"nodes": sorted(nodes)}
        return {"MLSysOpsCluster": first, "MLSysOpsClusters": clusters, "MLSysOpsNode": nodes,
                "MLSysOpsEnergy": energy}

    # ---------------------------------------------------------------- mechanisms
    def mechanisms(self) -> dict[str, Any]:
        return {k.partition(".")[2]: {"state": _copy(v.state), "options": _copy(v.options)}
                for k, v in self.mechs.items()}

    # ---------------------------------------------------------------- telemetry
    async def _follow_telemetry(self) -> None:
        await self._load_history()
        sub = await self.bus.nc.subscribe(self.bus.subjects.wildcard("telemetry"))  # type: ignore[union-attr]
        limit = max(self.bus.settings.max_payload * 2, 1_048_576)  # the stream's max_msg_size
        async for msg in sub.messages:
            try:
                snap = inbound.telemetry(msg.subject, msg.data, self.bus.subjects, limit)
            except inbound.Refused as exc:
                # every replica sees the snapshot: one event, de-duplicated by its id
                digest = hashlib.blake2b(msg.subject.encode() + msg.data, digest_size=10)
                await self.bus.report(wire.ErrorEvent(
                    kind="telemetry", name=msg.subject.rsplit(".", 1)[-1],
                    message=f"telemetry {exc.message}; dropped", details={"subject": msg.subject}),
                    msg_id="e-" + digest.hexdigest())
                continue
            self.snapshots.append(snap)
            for listener in self.telemetry_listeners:
                listener(snap)

    async def _load_history(self) -> None:
        """Refill recent snapshots from the telemetry stream after a restart."""
        stream = self.bus.subjects.stream("telemetry")
        try:
            info = await self.bus.js.stream_info(stream)
        except Exception:
            return
        last, first = info.state.last_seq, info.state.first_seq
        for seq in range(max(first, last - self.snapshots.maxlen + 1), last + 1):  # type: ignore[operator]
            try:
                raw = await self.bus.js.get_msg(stream, seq)
                self.snapshots.append(inbound.telemetry(raw.subject or "", raw.data or b"",
                                                        self.bus.subjects, 1 << 62))
            except Exception:
                continue

    def telemetry(self) -> dict[str, Any]:
        from mlsysops.telemetry import telemetry_view

        return telemetry_view(list(self.snapshots), self.bus.settings.telemetry_history)


def _copy(value: Any) -> Any:
    """A deep copy of plain data, cheaper than ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
