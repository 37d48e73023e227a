"""Strategy inputs from what a policy receives: descriptions, Fluidity's status, telemetry.

- :func:`parse_cpu` / :func:`parse_memory`: Kubernetes quantities to cores and GB;
- :func:`node_targets` / :func:`cluster_targets`: nodes (or clusters, aggregated) with
  their capacity from ``MLSysOpsNode.hardware`` and their energy profile from
  ``MLSysOpsEnergy`` (a node's own profile over its cluster's, over the defaults);
- :func:`requirements_of`: per component, what one replica requests (the sum over its
  containers' ``platform_requirements``), where it may run, its scaling profile;
- :func:`application_of`: co-location from ``single_node`` plus configured groups;
- :func:`fluidity_state`: where the components run now, with how many replicas;
- :func:`usage_by_others`: what other applications' components take on each node;
- :func:`rate_metrics`: request rates per component from telemetry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mlsysops.strategies.model import (
    Application,
    EnergyProfile,
    Resources,
    ScalingProfile,
    ServiceMetrics,
    ServiceRequirements,
    Target,
)
from mlsysops.strategies.options import StrategyError

_QUANTITY = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")
_MEMORY_UNITS = {
    "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
    "m": 1e-3,
}
GB = 1e9


def _quantity(value: Any, what: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise StrategyError(f"{what}: {value!r} is not a quantity")
    if isinstance(value, int | float):
        return float(value), ""
    m = _QUANTITY.match(str(value))
    if not m:
        raise StrategyError(f"{what}: {value!r} is not a Kubernetes quantity")
    return float(m.group(1)), m.group(2)


def parse_cpu(value: Any) -> float:
    """Cores in a CPU quantity: ``"250m"`` -> 0.25, ``"2"`` -> 2.0, ``1.5`` -> 1.5."""
    number, unit = _quantity(value, "cpu")
    if unit == "m":
        return number / 1000.0
    if unit == "":
        return number
    if unit in _MEMORY_UNITS:  # "1k" cores is legal if odd
        return number * _MEMORY_UNITS[unit]
    raise StrategyError(f"cpu: unknown unit in {value!r}")


def parse_memory(value: Any) -> float:
    """GB (10^9 bytes) in a memory quantity: ``"64Mi"`` -> 0.067108864, ``"1G"`` -> 1.0."""
    number, unit = _quantity(value, "memory")
    if unit not in _MEMORY_UNITS:
        raise StrategyError(f"memory: unknown unit in {value!r}")
    return number * _MEMORY_UNITS[unit] / GB


# --------------------------------------------------------------------------- targets
def _cluster_of_nodes(system: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cluster, spec in (system.get("MLSysOpsClusters") or {}).items():
        for node in spec.get("nodes") or []:
            out.setdefault(str(node), str(spec.get("cluster_id") or cluster))
    for node, spec in (system.get("MLSysOpsNode") or {}).items():
        if spec.get("cluster_id"):
            out[str(node)] = str(spec["cluster_id"])
    return out


def node_capacity(spec: Mapping[str, Any] | None) -> Resources:
    """Cores, GB and GPUs of an ``MLSysOpsNode``; ``inf`` for what it does not state."""
    hardware = (spec or {}).get("hardware") or {}
    cores = (hardware.get("cpu") or {}).get("cores")
    memory = hardware.get("memory")
    gpu = hardware.get("gpu")
    gpus = 0.0
    if isinstance(gpu, Mapping):
        gpus = float(gpu.get("instances") or 1)
    return Resources(float(cores) if cores is not None else math.inf,
                     float(memory) if memory is not None else math.inf, gpus)


def energy_profile(name: str, system: Mapping[str, Any], cluster: str | None = None,
                   defaults: Mapping[str, Any] | None = None) -> EnergyProfile:
    """A node's (or cluster's) energy profile: its own fields over its cluster's over
    ``defaults``."""
    profiles = system.get("MLSysOpsEnergy") or {}
    base = EnergyProfile.from_dict(defaults or {})
    base = EnergyProfile(**{**base.to_json(), "known": False})
    if cluster and cluster != name and cluster in profiles:
        base = EnergyProfile.from_dict(profiles[cluster], base)
    return EnergyProfile.from_dict(profiles.get(name), base)


def node_targets(system: Mapping[str, Any], *, clusters: Iterable[str] | None = None,
                 used: Mapping[str, Resources] | None = None,
                 energy_defaults: Mapping[str, Any] | None = None) -> list[Target]:
    """Every node known to the system description (described, or listed by a cluster),
    restricted to ``clusters`` when given, sorted by name."""
    nodes: dict[str, Mapping[str, Any]] = dict(system.get("MLSysOpsNode") or {})
    cluster_of = _cluster_of_nodes(system)
    names = set(nodes) | set(cluster_of)
    allowed = set(clusters) if clusters is not None else None
    out = []
    for name in sorted(names):
        cluster = cluster_of.get(name)
        if allowed is not None and cluster not in allowed:
            continue
        spec = nodes.get(name) or {}
        arch = ((spec.get("hardware") or {}).get("cpu") or {}).get("architecture")
        out.append(Target(
            name=name, capacity=node_capacity(spec if name in nodes else None),
            used=(used or {}).get(name, Resources()),
            energy=energy_profile(name, system, cluster, energy_defaults), kind="node",
            cluster=cluster, layer=spec.get("continuum_layer"), architecture=arch,
            labels=tuple(str(label) for label in spec.get("labels") or ())))
    return out


def cluster_targets(system: Mapping[str, Any], *, used: Mapping[str, Resources] | None = None,
                    energy_defaults: Mapping[str, Any] | None = None) -> list[Target]:
    """Each cluster as one target: the sum of its nodes' capacity and use, its own energy
    profile (else the capacity-weighted mean of its nodes')."""
    nodes = node_targets(system, used=used, energy_defaults=energy_defaults)
    profiles = system.get("MLSysOpsEnergy") or {}
    out = []
    for cluster, spec in sorted((system.get("MLSysOpsClusters") or {}).items()):
        members = [t for t in nodes if t.cluster == (spec.get("cluster_id") or cluster)]
        capacity = sum((t.capacity for t in members), Resources())
        use = sum((t.used for t in members), Resources())
        if cluster in profiles:
            energy = energy_profile(cluster, system, None, energy_defaults)
        else:
            energy = _mean_profile(members, energy_defaults)
        out.append(Target(name=cluster, capacity=capacity, used=use, energy=energy,
                          kind="cluster", cluster=cluster))
    return out


def _mean_profile(members: Sequence[Target], defaults: Mapping[str, Any] | None
                  ) -> EnergyProfile:
    if not members:
        return EnergyProfile.from_dict(defaults or {})
    weights = [t.capacity.cpu if math.isfinite(t.capacity.cpu) else 1.0 for t in members]
    total = sum(weights) or 1.0

    def mean(get: Callable[[EnergyProfile], float]) -> float:
        return sum(get(t.energy) * w for t, w in zip(members, weights, strict=True)) / total

    return EnergyProfile(
        pue=mean(lambda e: e.pue), carbon_intensity=mean(lambda e: e.carbon_intensity),
        renewable_share=mean(lambda e: e.renewable_share),
        idle_watts=sum(t.energy.idle_watts for t in members),
        watts_per_cpu=mean(lambda e: e.watts_per_cpu),
        preferred=all(t.energy.preferred for t in members),
        known=any(t.energy.known for t in members))


# --------------------------------------------------------------------------- services
def component_request(component: Mapping[str, Any]) -> Resources:
    """What one replica of a component requests: the sum over its containers."""
    cpu = memory = gpu = 0.0
    for container in component.get("containers") or []:
        req = container.get("platform_requirements") or {}
        c = (req.get("cpu") or {}).get("requests")
        m = (req.get("memory") or {}).get("requests")
        g = (req.get("gpu") or {}).get("requests")
        cpu += parse_cpu(c) if c not in (None, "") else 0.0
        memory += parse_memory(m) if m not in (None, "") else 0.0
        gpu += float(g) if g else 0.0
    return Resources(cpu, memory, gpu)


def _architectures(component: Mapping[str, Any]) -> set[str] | None:
    wanted: set[str] | None = None
    for container in component.get("containers") or []:
        arch = ((container.get("platform_requirements") or {}).get("cpu") or {}).get(
            "architecture")
        if arch:
            wanted = set(arch) if wanted is None else wanted & set(arch)
    return wanted


def eligible_targets(component: Mapping[str, Any], app_spec: Mapping[str, Any],
                     targets: Sequence[Target]) -> frozenset[str] | None:
    """Targets a component may run on given its placement fields (None: all)."""
    placement = component.get("node_placement") or {}
    layers = set(placement.get("continuum_layer") or []) - {"*"}
    labels = set(placement.get("labels") or [])
    archs = _architectures(component)
    clusters = set((app_spec.get("cluster_placement") or {}).get("cluster_id") or [])
    if not (layers or labels or archs or clusters):
        return None
    return frozenset(
        t.name for t in targets
        if (not layers or t.layer in layers) and labels <= set(t.labels)
        and (not archs or t.architecture is None or t.architecture in archs)
        and (not clusters or t.cluster in clusters
                             or (t.kind == "cluster" and t.name in clusters)))


def scaling_profile(component: Mapping[str, Any], configured: Mapping[str, Any] | None,
                    defaults: Mapping[str, Any] | None) -> ScalingProfile:
    """Defaults, then the description's ``node_placement.scaling`` (manual: fixed
    instances; auto: ``instances`` is the maximum), then the configured profile."""
    values: dict[str, Any] = {}
    for layer in (defaults or {},):
        values.update({k: v for k, v in layer.items() if k in _PROFILE_KEYS})
    scaling = (component.get("node_placement") or {}).get("scaling") or {}
    if scaling.get("instances") is not None:
        if scaling.get("scaling_mode") == "manual":
            values["fixed"] = int(scaling["instances"])
        else:
            values["max_replicas"] = int(scaling["instances"])
    values.update({k: v for k, v in (configured or {}).items() if k in _PROFILE_KEYS})
    unknown = sorted(set(configured or {}) - set(_PROFILE_KEYS))
    if unknown:
        raise StrategyError(f"profile of {component_name(component)!r}: unknown key(s) "
                            f"{', '.join(unknown)} (known: {', '.join(_PROFILE_KEYS)})")
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value) or value < 0:
            raise StrategyError(f"profile of {component_name(component)!r}: {key} must be a "
                                f"number >= 0, got {value!r}")
    if values.get("alpha", 1.0) <= 0:
        raise StrategyError(f"profile of {component_name(component)!r}: alpha must be > 0")
    for key in ("min_replicas", "max_replicas", "fixed"):
        if values.get(key) is not None:
            values[key] = int(values[key])
    profile = ScalingProfile(**values)
    if profile.max_replicas < profile.min_replicas:
        raise StrategyError(f"profile of {component_name(component)!r}: max_replicas "
                            f"{profile.max_replicas} < min_replicas {profile.min_replicas}")
    return profile


_PROFILE_KEYS = ("alpha", "beta", "min_replicas", "max_replicas", "fixed")


def check_profiles(profiles: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None
                   ) -> None:
    """Raise :class:`StrategyError` for a malformed profile (before it is kept)."""
    if not isinstance(profiles or {}, Mapping) or not isinstance(defaults or {}, Mapping):
        raise StrategyError("profiles and profile_defaults must be objects")
    scaling_profile({"metadata": {"name": "(defaults)"}}, None, defaults)
    for name, profile in (profiles or {}).items():
        if not isinstance(profile, Mapping):
            raise StrategyError(f"profile of {name!r} must be an object, got {profile!r}")
        scaling_profile({"metadata": {"name": name}}, profile, defaults)


def component_name(component: Mapping[str, Any]) -> str:
    return str((component.get("metadata") or {}).get("name") or "")


def requirements_of(app: Mapping[str, Any], targets: Sequence[Target], *,
                    replicas: Mapping[str, int] | None = None,
                    profiles: Mapping[str, Mapping[str, Any]] | None = None,
                    profile_defaults: Mapping[str, Any] | None = None,
                    ) -> dict[str, ServiceRequirements]:
    """Requirements of every component of ``app`` (``{"name", "spec"}`` as policies get
    it), in description order; ``replicas`` are the current ones (default 1)."""
    spec = app.get("spec") or {}
    out = {}
    for component in spec.get("components") or []:
        name = component_name(component)
        if not name:
            continue
        profile = scaling_profile(component, (profiles or {}).get(name), profile_defaults)
        count = (replicas or {}).get(name)
        if count is None:
            count = profile.fixed if profile.fixed is not None else max(1, profile.min_replicas)
        out[name] = ServiceRequirements(
            name=name, per_replica=component_request(component), replicas=int(count),
            pinned=(component.get("node_placement") or {}).get("node") or None,
            eligible=eligible_targets(component, spec, targets), profile=profile)
    return out


def application_of(app: Mapping[str, Any], *, co_location: Iterable[Sequence[str]] = (),
                   anti_affinity: Iterable[Sequence[str]] = ()) -> Application:
    """The application with its ``single_node`` groups as co-location, plus the given
    groups (from the policy configuration)."""
    spec = app.get("spec") or {}
    groups = [tuple(g.get("components") or ()) for g in spec.get("single_node") or []]
    groups += [tuple(g) for g in co_location]
    return Application(name=str(app.get("name") or spec.get("name") or ""),
                       co_location=tuple(g for g in groups if len(g) > 1),
                       anti_affinity=tuple(tuple(g) for g in anti_affinity if len(g) > 1),
                       description=spec)


# --------------------------------------------------------------------------- what runs
def fluidity_state(mechanisms: Mapping[str, Any], app: str
                   ) -> tuple[dict[str, list[str]], dict[str, int]] | None:
    """``(hosts per component, replicas per component)`` as Fluidity reports them for
    ``app``; None while Fluidity has not reported. Replicas are summed over hosts."""
    state = (mechanisms.get("fluidity") or {}).get("state")
    if not isinstance(state, Mapping) or not isinstance(state.get("applications"), Mapping):
        return None
    instances = state["applications"].get(app) or {}
    hosts: dict[str, list[str]] = {}
    replicas: dict[str, int] = {}
    for component, items in instances.items():
        for item in items or []:
            host = item.get("host")
            if host:
                hosts.setdefault(component, []).append(str(host))
            replicas[component] = replicas.get(component, 0) + int(item.get("replicas") or 0)
    return hosts, replicas


def usage_by_others(mechanisms: Mapping[str, Any], app: str,
                    describe: Callable[[str], Mapping[str, Any] | None]) -> dict[str, Resources]:
    """What the components of applications other than ``app`` request on each node, from
    Fluidity's status and their descriptions (``describe(name)`` returns an application
    as ``{"name", "spec"}``, e.g. :data:`mlsysops.plugin_api.descriptions`' ``app``)."""
    state = (mechanisms.get("fluidity") or {}).get("state")
    if not isinstance(state, Mapping):
        return {}
    out: dict[str, Resources] = {}
    for other, components in (state.get("applications") or {}).items():
        if other == app:
            continue
        doc = describe(other) or {}
        requests = {component_name(c): component_request(c)
                    for c in (doc.get("spec") or {}).get("components") or []}
        for component, items in (components or {}).items():
            per = requests.get(component)
            if per is None:
                continue
            for item in items or []:
                host = str(item.get("host") or "")
                count = int(item.get("replicas") or 0)
                out[host] = out.get(host, Resources()) + per.scaled(count)
    return out


def rate_metrics(telemetry: Mapping[str, Any], metric: str, app: str, *,
                 app_label: str = "app", component_label: str = "component",
                 ) -> dict[str, ServiceMetrics]:
    """Request rate per component of ``app`` from telemetry (``latest`` and ``history``).

    Samples of ``metric`` whose ``app_label`` is ``app`` are read per ``component_label``;
    several samples of one component at one time (several instances) are summed. A
    sample labelled ``kind="predicted"`` is taken as a predicted rate.
    """
    def rows(samples: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {}
        for sample in samples:
            labels = sample.get("labels") or {}
            if labels.get(app_label) != app or not labels.get(component_label):
                continue
            kind = "predicted" if labels.get("kind") == "predicted" else "rate"
            entry = out.setdefault(str(labels[component_label]), {})
            entry.setdefault(kind, []).append(float(sample.get("value", 0.0)))
            entry.setdefault("ts", []).append(float(sample.get("ts") or 0.0))
        return out

    history: dict[str, dict[float, float]] = {}
    for snap in telemetry.get("history") or []:
        taken = float(snap.get("collected_at") or 0.0)
        for component, entry in rows((snap.get("metrics") or {}).get(metric) or []).items():
            if "rate" in entry:
                when = max(entry["ts"]) or taken
                history.setdefault(component, {})[when] = sum(entry["rate"])
    latest = rows((telemetry.get("latest") or {}).get(metric) or [])
    out = {}
    for component in sorted(set(latest) | set(history)):
        entry = latest.get(component, {})
        points = tuple(sorted(history.get(component, {}).items()))
        rate: float | None = sum(entry["rate"]) if "rate" in entry else None
        at: Any = max(entry["ts"]) if entry.get("ts") else telemetry.get("collected_at")
        if rate is None and points:  # only in history: the newest point is the rate
            at, rate = points[-1]
        predicted = sum(entry["predicted"]) if "predicted" in entry else None
        out[component] = ServiceMetrics(rate=rate, predicted_rate=predicted, history=points,
                                        at=float(at) if at else None)
    return out
