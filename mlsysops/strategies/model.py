"""The data placement and scaling strategies work on, and the decisions they return.

Everything here is plain, typed and numeric: quantities are parsed once (CPU in cores,
memory in GB of 10^9 bytes, accelerators as a count), never carried as strings. Targets
are the nodes (or clusters) a service may run on; requirements say what one replica of a
service needs and how it scales; metrics carry the observed and, optionally, a predicted
request rate. Decisions are dataclasses with a :meth:`to_json` for the policy status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

RESOURCES = ("cpu", "memory", "gpu")
UNITS = {"cpu": "cores", "memory": "GB", "gpu": "devices"}


@dataclass(frozen=True)
class Resources:
    """An amount of CPU (cores), memory (GB) and accelerators (count); inf means unknown."""

    cpu: float = 0.0
    memory: float = 0.0
    gpu: float = 0.0

    def get(self, resource: str) -> float:
        return float(getattr(self, resource))

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory, self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu - other.cpu, self.memory - other.memory, self.gpu - other.gpu)

    def scaled(self, factor: float) -> Resources:
        return Resources(self.cpu * factor, self.memory * factor, self.gpu * factor)

    def to_json(self) -> dict[str, float | None]:
        return {r: _finite(self.get(r)) for r in RESOURCES}


# --------------------------------------------------------------------------- energy
SOURCE_RENEWABLE_SHARE = {"renewable": 1.0, "grid_mix": 0.3, "fossil": 0.0}


@dataclass(frozen=True)
class EnergyProfile:
    """How a node or cluster turns work into energy and carbon.

    Power of a target = ``pue * (idle_watts if in use + watts_per_cpu * busy cores)``;
    ``known`` is False when no profile was published and these are the defaults.
    """

    pue: float = 1.0
    carbon_intensity: float = 0.0  # gCO2 per kWh
    renewable_share: float = 0.0  # 0..1
    idle_watts: float = 0.0
    watts_per_cpu: float = 0.0
    preferred: bool = False
    energy_source: str | None = None
    known: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None,
                  defaults: EnergyProfile | None = None) -> EnergyProfile:
        """A profile from the JSON of ``desc.energy.<name>``; absent fields from ``defaults``."""
        base = defaults or cls()
        if not data:
            return base
        values: dict[str, Any] = {"known": True}
        for key in ("pue", "carbon_intensity", "renewable_share", "idle_watts", "watts_per_cpu"):
            if data.get(key) is not None:
                values[key] = float(data[key])
        if data.get("preferred") is not None:
            values["preferred"] = bool(data["preferred"])
        source = data.get("energy_source")
        if source is not None:
            values["energy_source"] = str(source)
            if data.get("renewable_share") is None and source in SOURCE_RENEWABLE_SHARE:
                values["renewable_share"] = SOURCE_RENEWABLE_SHARE[source]
        return replace(base, **values)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A node (or a cluster taken as one) that can run services.

    ``capacity`` is what it has (``inf`` for a resource the description does not state);
    ``used`` is what others (other applications) already take on it.
    """

    name: str
    capacity: Resources
    used: Resources = Resources()
    energy: EnergyProfile = EnergyProfile()
    kind: str = "node"  # node | cluster
    cluster: str | None = None
    layer: str | None = None
    architecture: str | None = None
    labels: tuple[str, ...] = ()

    @property
    def free(self) -> Resources:
        return self.capacity - self.used

    @property
    def busy(self) -> bool:
        """Whether something else already runs here (so its idle power is spent anyway)."""
        return self.used.cpu > 0 or self.used.memory > 0 or self.used.gpu > 0


# --------------------------------------------------------------------------- services
@dataclass(frozen=True)
class ScalingProfile:
    """Capacity model of one service: ``alpha * replicas + beta >= rate`` (requests/s)."""

    alpha: float = 10.0  # requests/s one replica serves
    beta: float = 0.0  # requests/s served independently of replicas (caches, ...)
    min_replicas: int = 1
    max_replicas: int = 10
    fixed: int | None = None  # manual scaling: always this many

    def needed(self, rate: float) -> int:
        """Replicas the model needs for ``rate``, within the profile's bounds."""
        if self.fixed is not None:
            return self.fixed
        raw = math.ceil(max(0.0, rate - self.beta) / self.alpha - 1e-9) if self.alpha > 0 else 0
        return max(self.min_replicas, min(self.max_replicas, raw))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ServiceRequirements:
    """What a service (an application component) needs, per replica, and where it may run.

    ``eligible`` lists the targets it may run on (None: any); ``pinned`` names the one
    target its description fixes.
    """

    name: str
    per_replica: Resources = Resources()
    replicas: int = 1
    pinned: str | None = None
    eligible: frozenset[str] | None = None
    profile: ScalingProfile = ScalingProfile()

    @property
    def demand(self) -> Resources:
        return self.per_replica.scaled(max(1, self.replicas))


@dataclass(frozen=True)
class Application:
    """The application being placed: its name, its raw description, its constraints.

    ``co_location`` groups services that must share a target; ``anti_affinity`` groups
    services no two of which may share one.
    """

    name: str
    co_location: tuple[tuple[str, ...], ...] = ()
    anti_affinity: tuple[tuple[str, ...], ...] = ()
    description: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceMetrics:
    """Performance of one service: the request rate now, a prediction, the recent history."""

    rate: float | None = None
    predicted_rate: float | None = None
    history: tuple[tuple[float, float], ...] = ()  # (unix time, rate), oldest first
    at: float | None = None  # when ``rate`` was measured


# --------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Shortage:
    """One reason a decision could not satisfy everything: what is short, where, by how much."""

    resource: str  # cpu | memory | gpu | targets | max_replicas | rate
    demand: float
    available: float
    where: str = "all targets"
    services: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # numpy scalars in, plain floats out
        object.__setattr__(self, "demand", float(self.demand))
        object.__setattr__(self, "available", float(self.available))
        object.__setattr__(self, "services", tuple(str(s) for s in self.services))

    def describe(self) -> str:
        unit = UNITS.get(self.resource, "")
        who = f" for {', '.join(self.services)}" if self.services else ""
        return (f"{self.resource} short on {self.where}{who}: needs {self.demand:g} {unit}, "
                f"has {self.available:g}").replace("  ", " ")

    def to_json(self) -> dict[str, Any]:
        return {"resource": self.resource, "demand": _round(self.demand),
                "available": _round(self.available), "where": self.where,
                "services": list(self.services)}


@dataclass(frozen=True)
class Move:
    service: str
    source: str | None  # None: not running yet (a deployment)
    target: str


@dataclass
class PlacementDecision:
    """Where each service runs, and what the decision cost to make and would cost to run."""

    strategy: str
    feasible: bool
    placement: dict[str, str] = field(default_factory=dict)
    moves: list[Move] = field(default_factory=list)
    objective: float | None = None
    solve_ms: float = 0.0
    reason: str = ""
    shortages: list[Shortage] = field(default_factory=list)
    energy: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "feasible": self.feasible,
            "placement": dict(sorted(self.placement.items())),
            "moves": [{"service": m.service, "from": m.source, "to": m.target}
                      for m in self.moves],
            "objective": _round(self.objective), "solve_ms": round(self.solve_ms, 3),
            "reason": self.reason, "shortages": [s.to_json() for s in self.shortages],
            "energy": {k: _round(v) for k, v in self.energy.items()},
        }


@dataclass
class ScalingDecision:
    """Replicas per service, why, and what the strategy wants remembered for next time."""

    strategy: str
    feasible: bool
    replicas: dict[str, int] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    objective: float | None = None
    solve_ms: float = 0.0
    reason: str = ""
    shortages: list[Shortage] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # plain JSON, kept by the caller

    @property
    def changes(self) -> dict[str, tuple[int, int]]:
        """service -> (current, new) for the services whose replicas change."""
        return {s: (self.current.get(s, 0), r) for s, r in sorted(self.replicas.items())
                if self.current.get(s) is not None and self.current[s] != r}

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "feasible": self.feasible,
            "replicas": dict(sorted(self.replicas.items())),
            "changes": {s: {"from": a, "to": b} for s, (a, b) in self.changes.items()},
            "objective": _round(self.objective), "solve_ms": round(self.solve_ms, 3),
            "reason": self.reason, "shortages": [s.to_json() for s in self.shortages],
            "details": self.details,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def describe_shortages(shortages: Sequence[Shortage]) -> str:
    return "; ".join(s.describe() for s in shortages)
