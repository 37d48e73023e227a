"""A drop-in placement strategy: spread services over the least allocated nodes.

This is what Kubernetes' default scheduler scores highest (``LeastAllocated``): each
service, largest first, goes to the eligible node with the most free CPU and memory
left, unless it already runs somewhere it still fits. It knows nothing about energy,
which makes it the energy-blind baseline of the energy benchmark, and it is the
example of docs/strategies.md: a file in ``plugins/strategies`` whose strategy classes
are registered by their ``name`` and can be chosen by a placement policy::

    mlsysops trigger placement shop --params '{"strategy": "spread"}'

It honours capacity, eligibility and pinning; co-location and anti-affinity it leaves
to the strategies that know them (it reports them as unsupported when asked).
"""

from __future__ import annotations

import time

from mlsysops.strategies import (
    Move,
    PlacementDecision,
    PlacementStrategy,
    Resources,
    Shortage,
    placement_energy,
)


class SpreadPlacement(PlacementStrategy):
    name = "spread"
    description = "least-allocated spreading, energy-blind (Kubernetes default-like)"

    def decide_re_placement(self, application, targets, requirements, current_placement,
                            metrics=None):
        started = time.perf_counter()
        if application.co_location or application.anti_affinity:
            return PlacementDecision(self.name, feasible=False,
                                     reason="spread does not support co-location or "
                                            "anti-affinity groups")
        free = {t.name: t.free for t in targets}
        capacity = {t.name: t.capacity for t in targets}
        placement = {}

        def fits(need: Resources, name: str) -> bool:
            left = free[name] - need
            return left.cpu >= -1e-9 and left.memory >= -1e-9 and left.gpu >= -1e-9

        def share_left(name: str, need: Resources) -> float:
            left, cap = free[name] - need, capacity[name]
            cpu = left.cpu / cap.cpu if 0 < cap.cpu < float("inf") else 1.0
            mem = left.memory / cap.memory if 0 < cap.memory < float("inf") else 1.0
            return (cpu + mem) / 2

        order = sorted(requirements.values(), key=lambda r: (r.demand.cpu, r.demand.memory),
                       reverse=True)
        for req in order:
            need = req.demand
            allowed = [t.name for t in targets
                       if (req.eligible is None or t.name in req.eligible)
                       and (req.pinned is None or t.name == req.pinned)]
            here = current_placement.get(req.name)
            if here in allowed and fits(need, here):
                choice = here
            else:
                fitting = [n for n in allowed if fits(need, n)]
                if not fitting:
                    return PlacementDecision(
                        self.name, feasible=False,
                        reason=f"infeasible: no eligible node has room for {req.name}",
                        shortages=[Shortage("cpu", need.cpu, max(
                            (free[n].cpu for n in allowed), default=0.0),
                            "any eligible target", (req.name,))],
                        solve_ms=(time.perf_counter() - started) * 1000)
                choice = max(fitting, key=lambda n: (share_left(n, need), n))
            placement[req.name] = choice
            free[choice] = free[choice] - need
        moves = [Move(s, current_placement.get(s), t) for s, t in placement.items()
                 if current_placement.get(s) != t]
        return PlacementDecision(self.name, feasible=True, placement=placement, moves=moves,
                                 solve_ms=(time.perf_counter() - started) * 1000,
                                 energy=placement_energy(placement, targets, requirements))
