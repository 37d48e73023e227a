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
from mlsysops.frozen import FrozenDict, FrozenList, freeze, thaw

log = logs.get(__name__)

KIND_KEYS = {"app": "MLSysOpsApp", "cluster": "MLSysOpsCluster", "node": "MLSysOpsNode"}


def desc_key(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def mech_key(name: str) -> str:
    return f"mech.{name}"


def piece_key(mechanism: str, app: str) -> str:
    """Key of one application's part of a mechanism's status."""
    return f"mechapp.{mechanism}.{app}"


class StateView:
    """Descriptions, mechanism status and recent telemetry, kept current.

    What policies receive is frozen (:mod:`mlsysops.frozen`) once, when it changes, and
    shared by every call: a call costs a few small dicts, not a copy of the fleet. An
    application's policy gets its own application's part of each mechanism's status
    (kept per application, see the executor) and ``_global`` policies every part.
    """

    def __init__(self, bus: Bus, *, telemetry: bool = True) -> None:
        self.bus = bus
        self.descs: KVCache[wire.StoredDescription] = KVCache(
            bus, subjects.BUCKET_DESC, ">", _decode_desc, self._on_desc)
        self.mechs: KVCache[wire.MechanismStatus] = KVCache(
            bus, subjects.BUCKET_STATUS, "mech.*", _decode_status,
            lambda key, value: self._mechanisms_changed())
        self.pieces: KVCache[wire.MechanismPiece] = KVCache(
            bus, subjects.BUCKET_STATUS, "mechapp.>", _decode_piece, self._on_piece)
        self._want_telemetry = telemetry
        self.snapshots: collections.deque[wire.Telemetry] = collections.deque(
            maxlen=max(1, bus.settings.telemetry_history))
        self.telemetry_listeners: list[Any] = []
        self.app_listeners: list[Any] = []
        # derived views, rebuilt only when what they come from changes
        self._apps: list[str] | None = None
        self._all_descriptions: FrozenList | None = None
        self._system: FrozenDict | None = None
        self._by_mechanism: dict[str, FrozenDict] = {}  # mechanism -> every app's part
        self._telemetry: FrozenDict | None = None

    def tasks(self) -> list[Any]:
        tasks = [self.descs.run(), self.mechs.run(), self.pieces.run()]
        if self._want_telemetry:
            tasks.append(self._follow_telemetry())
        return tasks

    async def wait_ready(self) -> None:
        await asyncio.gather(self.descs.ready.wait(), self.mechs.ready.wait(),
                             self.pieces.ready.wait())

    # ---------------------------------------------------------------- descriptions
    def _on_desc(self, key: str, value: wire.StoredDescription | None) -> None:
        kind, _, name = key.partition(".")
        if kind in ("app", "cluster", "node"):
            plugin_api.descriptions.set(kind, name, thaw(value.spec) if value else None)
        if kind == "app":
            self._apps = self._all_descriptions = None
            for listener in self.app_listeners:
                listener(name, value)
        else:
            self._system = None

    def apps(self) -> list[str]:
        if self._apps is None:
            self._apps = sorted(k.partition(".")[2] for k in self.descs.keys()
                                if k.startswith("app."))
        return self._apps

    def app_description(self, app: str) -> FrozenList:
        """What a policy receives for one application (all of them for ``_global``)."""
        if app == subjects.GLOBAL_APP:
            if self._all_descriptions is None:
                self._all_descriptions = FrozenList(
                    self._described(name) for name in self.apps()
                    if self.descs.value(desc_key("app", name)) is not None)
            return self._all_descriptions
        stored = self.descs.value(desc_key("app", app))
        return FrozenList([] if stored is None else [self._described(app)])

    def _described(self, name: str) -> FrozenDict:
        stored = self.descs.value(desc_key("app", name))
        return FrozenDict(name=name, spec=stored.spec if stored else FrozenDict())

    def system_description(self) -> FrozenDict:
        """Clusters, nodes and energy profiles."""
        if self._system is None:
            self._system = freeze(self._build_system())
        return self._system

    def _build_system(self) -> dict[str, Any]:
        def of(kind: str) -> dict[str, Any]:
            return {k.partition(".")[2]: v.spec for k, v in self.descs.items()
                    if k.startswith(kind + ".")}

        clusters, nodes, energy = of("cluster"), of("node"), of("energy")
        first = clusters[sorted(clusters)[0]] if clusters else {"nodes": sorted(nodes)}
        return {"MLSysOpsCluster": first, "MLSysOpsClusters": clusters, "MLSysOpsNode": nodes,
                "MLSysOpsEnergy": energy}

    # ---------------------------------------------------------------- mechanisms
    def _mechanisms_changed(self) -> None:
        self._by_mechanism.clear()

    def _on_piece(self, key: str, value: wire.MechanismPiece | None) -> None:
        self._by_mechanism.pop(key.split(".")[1], None)

    def mechanisms(self, app: str = subjects.GLOBAL_APP) -> dict[str, Any]:
        """Each mechanism's ``{"state", "options"}``; ``state["applications"]`` holds
        ``app``'s part only (every application's for ``_global``)."""
        out = {}
        for key, status in self.mechs.items():
            name = key.partition(".")[2]
            state = status.state
            if status.pieces and isinstance(state, dict):
                state = FrozenDict(state, applications=self._applications(name, app))
            out[name] = FrozenDict(state=state, options=status.options)
        return out

    def _applications(self, mechanism: str, app: str) -> FrozenDict:
        if app != subjects.GLOBAL_APP:
            piece = self.pieces.value(piece_key(mechanism, app))
            return FrozenDict() if piece is None else FrozenDict({app: piece.state})
        every = self._by_mechanism.get(mechanism)
        if every is None:
            prefix = piece_key(mechanism, "")
            every = FrozenDict((k[len(prefix):], v.state) for k, v in self.pieces.items()
                               if k.startswith(prefix))
            self._by_mechanism[mechanism] = every
        return every

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
            self._telemetry = None
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
        """The telemetry view (built once per new snapshot) with the upstream keys."""
        from mlsysops.telemetry import telemetry_view
        from mlsysops.telemetry.upstream import with_upstream_keys

        if self._telemetry is None:
            self._telemetry = freeze(telemetry_view(list(self.snapshots),
                                                    self.bus.settings.telemetry_history))
        return with_upstream_keys(self._telemetry, lambda: list(self.snapshots),
                                  self.bus.settings)


def _decode_desc(raw: bytes) -> wire.StoredDescription:
    stored = wire.STORED_DESC.decode(raw)
    stored.spec = freeze(stored.spec)
    return stored


def _decode_status(raw: bytes) -> wire.MechanismStatus:
    status = wire.MECH_STATUS.decode(raw)
    status.state, status.options = freeze(status.state), freeze(status.options)
    return status


def _decode_piece(raw: bytes) -> wire.MechanismPiece:
    piece = wire.MECH_PIECE.decode(raw)
    piece.state = freeze(piece.state)
    return piece
