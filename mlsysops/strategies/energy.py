"""The energy model placement strategies weigh, and the figures a decision reports.

A target in use draws ``idle_watts`` plus ``watts_per_cpu`` per requested core (the
requests stand in for utilisation); the facility draws that times the PUE. A target that
nothing uses is assumed to be switched off or asleep (so its idle power counts only when
the placement uses it, or when others already use it). Carbon is facility power times
the carbon intensity; the non-renewable part is facility power times
``1 - renewable_share``.

The objective weighs one facility watt on target ``t`` as :func:`cost_per_watt`: the
energy, carbon and non-renewable terms, reduced by ``preferred_bonus`` on preferred
targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlsysops.strategies.model import ServiceRequirements, Target
from mlsysops.strategies.options import PlacementWeights


def cost_per_watt(target: Target, weights: PlacementWeights) -> float:
    """Objective cost of one IT watt on ``target`` (PUE included)."""
    e = target.energy
    per_facility_watt = (weights.energy + weights.carbon * e.carbon_intensity / 1000.0
                         + weights.renewable * (1.0 - e.renewable_share))
    bonus = weights.preferred_bonus if e.preferred else 0.0
    return e.pue * per_facility_watt * (1.0 - bonus)


def placement_energy(placement: Mapping[str, str], targets: Sequence[Target],
                     requirements: Mapping[str, ServiceRequirements]) -> dict[str, float]:
    """Facility power (W), carbon (gCO2/h), non-renewable power (W) and targets in use.

    Only this placement's share is counted: the dynamic power of its services, and the
    idle power of targets it turns on (targets others already use are on anyway).
    """
    by_name = {t.name: t for t in targets}
    cores: dict[str, float] = {}
    for service, target in placement.items():
        req = requirements.get(service)
        if req is not None and target in by_name:
            cores[target] = cores.get(target, 0.0) + req.demand.cpu
    watts = carbon = dirty = 0.0
    for name, busy_cores in cores.items():
        t = by_name[name]
        it = t.energy.watts_per_cpu * busy_cores + (0.0 if t.busy else t.energy.idle_watts)
        facility = it * t.energy.pue
        watts += facility
        carbon += facility * t.energy.carbon_intensity / 1000.0
        dirty += facility * (1.0 - t.energy.renewable_share)
    return {"facility_watts": watts, "carbon_g_per_h": carbon, "non_renewable_watts": dirty,
            "targets_used": float(len(cores))}
