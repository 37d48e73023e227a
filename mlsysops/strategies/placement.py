"""Placement strategies: an integer program (default, ``milp``) and a greedy heuristic.

``milp`` — one binary ``x[s, t]`` per service and eligible target, one binary ``y[t]``
per target whose idle power the placement would switch on::

    minimise   w_move * (services not on their current target)
             + sum_t cost_per_watt(t) * (watts_per_cpu_t * sum_s cpu_s x[s,t] + idle_t y[t])
    subject to sum_t x[s,t] = 1                                  every service placed once
               sum_s r_s x[s,t] <= free_r(t) * u * y[t]          r in cpu, memory, gpu
               x[a,t] = x[b,t]                                   a, b co-located
               sum_{s in g} x[s,t] <= 1                          g an anti-affinity group
               x[s,t] = 0                                        t not eligible for s

solved by HiGHS through :func:`scipy.optimize.milp`, with the matrices built directly
(sparse, vectorised) for each call. ``u`` is ``max_utilisation``; ``cost_per_watt`` is
in :mod:`mlsysops.strategies.energy`.

``greedy`` — services (co-located groups as one unit) that still fit where they run stay
there; the others, largest first, go to the feasible target of least marginal energy
cost (a node not yet in use counts its idle power spread over its cores). Fast and
solver-free, not optimal, and it never moves a service only to save energy.

Both report an infeasible problem with the shortages found (:func:`diagnose`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from mlsysops.strategies.base import PlacementStrategy
from mlsysops.strategies.energy import cost_per_watt, placement_energy
from mlsysops.strategies.model import (
    RESOURCES,
    Application,
    Move,
    PlacementDecision,
    ServiceMetrics,
    ServiceRequirements,
    Shortage,
    Target,
    describe_shortages,
)
from mlsysops.strategies.options import PlacementWeights
from mlsysops.strategies.registry import register


@dataclass
class Problem:
    """A placement problem as arrays: services x targets."""

    services: list[str]
    targets: list[Target]
    demand: np.ndarray  # (S, 3) cpu, memory, gpu of all replicas
    free: np.ndarray  # (T, 3) free capacity times max_utilisation (cpu, memory); inf unknown
    eligible: np.ndarray  # (S, T) bool
    current: np.ndarray  # (S,) index of the current target, -1 if none
    co_location: list[list[int]]
    anti_affinity: list[list[int]]
    watt_cost: np.ndarray  # (T,) objective cost per IT watt
    weights: PlacementWeights

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.services), len(self.targets)


def build_problem(application: Application, targets: Sequence[Target],
                  requirements: Mapping[str, ServiceRequirements],
                  current_placement: Mapping[str, str],
                  weights: PlacementWeights) -> Problem:
    services = list(requirements)
    index = {s: i for i, s in enumerate(services)}
    tindex = {t.name: j for j, t in enumerate(targets)}
    n_s, n_t = len(services), len(targets)
    demand = np.array([[requirements[s].demand.get(r) for r in RESOURCES] for s in services],
                      dtype=float).reshape(n_s, 3)
    free = np.array([[t.free.get(r) for r in RESOURCES] for t in targets],
                    dtype=float).reshape(n_t, 3)
    free[:, :2] *= weights.max_utilisation
    free = np.maximum(free, 0.0)
    eligible = np.ones((n_s, n_t), dtype=bool)
    for i, s in enumerate(services):
        req = requirements[s]
        allowed: set[str] | None = set(req.eligible) if req.eligible is not None else None
        if req.pinned is not None:
            allowed = {req.pinned} if allowed is None else allowed & {req.pinned}
        if allowed is not None:
            eligible[i, :] = [t.name in allowed for t in targets]
    current = np.array([tindex.get(current_placement.get(s, ""), -1) for s in services],
                       dtype=int)

    def groups(raw: Sequence[Sequence[str]]) -> list[list[int]]:
        out = []
        for group in raw:
            members = sorted({index[s] for s in group if s in index})
            if len(members) > 1:
                out.append(members)
        return out

    watt_cost = np.array([cost_per_watt(t, weights) for t in targets], dtype=float)
    return Problem(services, list(targets), demand, free, eligible, current,
                   groups(application.co_location), groups(application.anti_affinity),
                   watt_cost, weights)


# --------------------------------------------------------------------------- diagnosis
def diagnose(p: Problem) -> list[Shortage]:
    """Why a problem has no solution, as far as simple counting can tell."""
    found: list[Shortage] = []
    names = [t.name for t in p.targets]
    for i, s in enumerate(p.services):
        if not p.eligible[i].any():
            found.append(Shortage("targets", 1, 0, "no eligible target", (s,)))
            continue
        free = p.free[p.eligible[i]]
        for r, resource in enumerate(RESOURCES):
            if p.demand[i, r] > 0 and free[:, r].max() < p.demand[i, r] - 1e-9:
                found.append(Shortage(resource, p.demand[i, r], float(free[:, r].max()),
                                      "any eligible target", (s,)))
    for group in p.co_location:
        members = tuple(p.services[i] for i in group)
        common = np.logical_and.reduce(p.eligible[group], axis=0)
        if not common.any():
            found.append(Shortage("targets", 1, 0, "no target eligible for all of a "
                                  "co-located group", members))
            continue
        need = p.demand[group].sum(axis=0)
        for r, resource in enumerate(RESOURCES):
            best = float(p.free[common, r].max())
            if need[r] > 0 and best < need[r] - 1e-9:
                found.append(Shortage(resource, need[r], best, "any target taking the "
                                      "co-located group", members))
    for group in p.anti_affinity:
        reachable = int(np.logical_or.reduce(p.eligible[group], axis=0).sum())
        if reachable < len(group):
            found.append(Shortage("targets", len(group), reachable,
                                  "targets for an anti-affinity group",
                                  tuple(p.services[i] for i in group)))
        for co in p.co_location:
            both = sorted(set(co) & set(group))
            if len(both) > 1:
                found.append(Shortage("targets", 2, 1, "a group both co-located and "
                                      "anti-affine", tuple(p.services[i] for i in both)))
    for r, resource in enumerate(RESOURCES):
        total = float(p.demand[:, r].sum())
        cap = float(p.free[:, r].sum())
        if total > cap + 1e-9:
            found.append(Shortage(resource, total, cap))
    single = p.eligible.sum(axis=1) == 1
    for j, name in enumerate(names):
        pinned = [int(i) for i in np.flatnonzero(single & p.eligible[:, j])]
        if not pinned:
            continue
        need = p.demand[pinned].sum(axis=0)
        for r, resource in enumerate(RESOURCES):
            if need[r] > p.free[j, r] + 1e-9:
                found.append(Shortage(resource, need[r], float(p.free[j, r]), name,
                                      tuple(p.services[i] for i in pinned)))
    return found


def _infeasible(name: str, p: Problem, started: float, detail: str = "") -> PlacementDecision:
    shortages = diagnose(p)
    if shortages:
        reason = "infeasible: " + describe_shortages(shortages)
    else:
        reason = ("infeasible: no assignment satisfies all capacity, co-location and "
                  "anti-affinity constraints at once (the services do not pack into the "
                  "free capacity; add capacity or raise max_utilisation)")
    if detail:
        reason += f" ({detail})"
    return PlacementDecision(strategy=name, feasible=False, reason=reason, shortages=shortages,
                             solve_ms=(time.perf_counter() - started) * 1000.0)


def _decision(name: str, p: Problem, assignment: Sequence[int], started: float,
              objective: float | None, requirements: Mapping[str, ServiceRequirements],
              reason: str = "") -> PlacementDecision:
    placement = {s: p.targets[j].name for s, j in zip(p.services, assignment, strict=True)}
    moves = []
    for i, s in enumerate(p.services):
        if p.current[i] != assignment[i]:
            source = p.targets[p.current[i]].name if p.current[i] >= 0 else None
            moves.append(Move(s, source, placement[s]))
    return PlacementDecision(
        strategy=name, feasible=True, placement=placement, moves=moves, objective=objective,
        solve_ms=(time.perf_counter() - started) * 1000.0, reason=reason,
        energy=placement_energy(placement, p.targets, requirements))


# --------------------------------------------------------------------------- MILP
def service_classes(p: Problem) -> list[list[int]]:
    """Services that are interchangeable for the model: same demand, same eligible
    targets, same current target, in no co-location or anti-affinity group. Each class
    becomes one integer variable per target (how many of its services go there) instead
    of one binary per service: the same optimum without the symmetry of identical items
    that makes bin packing slow. Grouped services stay classes of their own."""
    grouped = {i for g in (*p.co_location, *p.anti_affinity) for i in g}
    classes: dict[Any, list[int]] = {}
    for i in range(len(p.services)):
        key: Any = ("single", i) if i in grouped else (
            p.demand[i].tobytes(), p.eligible[i].tobytes(), int(p.current[i]))
        classes.setdefault(key, []).append(i)
    return list(classes.values())


@register
class MilpPlacement(PlacementStrategy):
    """Integer program over CPU, memory, accelerators, co-location, anti-affinity, moves
    and energy (HiGHS through scipy)."""

    name = "milp"
    description = ("integer program (HiGHS): capacity, co-location, anti-affinity, fewest "
                   "moves, energy (PUE, carbon, renewables)")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.weights = PlacementWeights.from_options(self.options)

    def decide_re_placement(self, application: Application, targets: Sequence[Target],
                            requirements: Mapping[str, ServiceRequirements],
                            current_placement: Mapping[str, str],
                            metrics: Mapping[str, ServiceMetrics] | None = None,
                            ) -> PlacementDecision:
        started = time.perf_counter()
        if not requirements:
            return PlacementDecision(strategy=self.name, feasible=True, objective=0.0)
        p = build_problem(application, targets, requirements, current_placement, self.weights)
        if not targets or diagnose(p):  # a certain shortage: no need to ask the solver
            return _infeasible(self.name, p, started)
        classes = service_classes(p)
        c, integrality, lb, ub, constraint, constant = self.model(p, classes)
        result = milp(c, integrality=integrality, bounds=Bounds(lb, ub),
                      constraints=constraint,
                      options={"time_limit": self.weights.time_limit,
                               "mip_rel_gap": self.weights.mip_rel_gap, "disp": False})
        if result.x is None:
            detail = "" if result.status == 2 else f"solver: {result.message}"
            return _infeasible(self.name, p, started, detail)
        n_t = len(p.targets)
        counts = np.round(result.x[: len(classes) * n_t]).astype(int).reshape(len(classes), n_t)
        assignment = [-1] * len(p.services)
        for k, members in enumerate(classes):
            slots: list[int] = []
            home = int(p.current[members[0]])
            order = ([home] if home >= 0 else []) + [t for t in range(n_t) if t != home]
            for t in order:
                slots += [t] * int(counts[k, t])
            for i, t in zip(members, slots, strict=True):
                assignment[i] = t
        objective = float(result.fun) + constant
        note = ""
        if result.status != 0:  # stopped early: keep the greedy answer if it is better
            note = f"not proven optimal: {result.message}"
            quick = greedy_assign(p)
            if quick is not None and objective_of(p, quick) < objective - 1e-9:
                assignment, objective = quick, objective_of(p, quick)
                note += "; the greedy solution was better and is used"
        return _decision(self.name, p, assignment, started, objective, requirements, note)

    def model(self, p: Problem, classes: list[list[int]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, LinearConstraint,
                         float]:
        """Objective, integrality, bounds, constraints and objective constant.

        Variables: ``n[k, t]`` (services of class ``k`` on target ``t``), then ``y[t]``
        for the targets whose idle power the placement would switch on.
        """
        w = self.weights
        n_k, n_t = len(classes), len(p.targets)
        n_x = n_k * n_t
        first = np.array([members[0] for members in classes])
        size = np.array([len(members) for members in classes], dtype=float)
        demand = p.demand[first]  # per service of the class
        eligible = p.eligible[first]
        current = p.current[first]
        wpc = np.array([t.energy.watts_per_cpu for t in p.targets], dtype=float)
        idle = np.array([0.0 if t.busy else t.energy.idle_watts for t in p.targets])
        # Objective on n: energy of the class's cores on t, minus the move weight where
        # its services run now (the constant w_move * placed makes it count the moves).
        cost = np.outer(demand[:, 0], wpc * p.watt_cost)
        placed = np.flatnonzero(current >= 0)
        cost[placed, current[placed]] -= w.move
        constant = float(w.move * size[placed].sum())
        idle_cost = idle * p.watt_cost
        with_y = np.flatnonzero(idle_cost > 0)
        y_of = {int(t): n_x + k for k, t in enumerate(with_y)}
        n = n_x + len(with_y)
        c = np.concatenate([cost.ravel(), idle_cost[with_y]])

        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        lo: list[float] = []
        hi: list[float] = []
        row = 0

        def add(r: np.ndarray, col: np.ndarray, v: np.ndarray, low: np.ndarray,
                high: np.ndarray) -> None:
            rows.append(r)
            cols.append(col)
            vals.append(v)
            lo.extend(low.tolist())
            hi.extend(high.tolist())

        # Every service of every class placed exactly once.
        add(np.repeat(np.arange(n_k), n_t), np.arange(n_x), np.ones(n_x), size, size)
        row += n_k
        # Capacity per target and resource (skipping unknown capacity and zero demand).
        linked = set()
        for r in range(3):
            used = np.flatnonzero(demand[:, r] > 0)
            if not len(used):
                continue
            for t in range(n_t):
                cap = p.free[t, r]
                if not np.isfinite(cap):
                    continue
                ks = used[eligible[used, t]]
                r_cols = ks * n_t + t
                r_vals = demand[ks, r]
                if t in y_of:
                    r_cols = np.append(r_cols, y_of[t])
                    r_vals = np.append(r_vals, -cap)
                    linked.add(t)
                    bound = 0.0
                else:
                    bound = cap
                add(np.full(len(r_cols), row), r_cols, r_vals, np.array([-np.inf]),
                    np.array([bound]))
                row += 1
        # A y without a finite capacity row: link it with a count (big-M on services).
        for t, yk in y_of.items():
            if t not in linked:
                ks = np.flatnonzero(eligible[:, t])
                add(np.full(len(ks) + 1, row), np.append(ks * n_t + t, yk),
                    np.append(np.ones(len(ks)), -size.sum()), np.array([-np.inf]),
                    np.array([0.0]))
                row += 1
        # Identical empty targets are interchangeable: open them in order (y[a] >= y[b]),
        # which cuts the equivalent permutations the search would otherwise visit.
        hosting = set(current[current >= 0].tolist())
        alike: dict[Any, list[int]] = {}
        for t in y_of:
            if t not in hosting:
                tg = p.targets[t]
                alike.setdefault((tg.capacity, tg.used, tg.energy, eligible[:, t].tobytes()),
                                 []).append(t)
        for group in alike.values():
            for a, b in itertools.pairwise(sorted(group)):
                add(np.array([row, row]), np.array([y_of[a], y_of[b]]), np.array([1.0, -1.0]),
                    np.array([0.0]), np.array([np.inf]))
                row += 1
        klass = {int(members[0]): k for k, members in enumerate(classes) if len(members) == 1}
        # Co-location: n[a,t] == n[b,t] for consecutive members (singleton classes).
        for group in p.co_location:
            ks = [klass[i] for i in group]
            for a, b in itertools.pairwise(ks):
                r_idx = np.repeat(np.arange(row, row + n_t), 2)
                c_idx = np.ravel(np.column_stack([a * n_t + np.arange(n_t),
                                                  b * n_t + np.arange(n_t)]))
                add(r_idx, c_idx, np.tile([1.0, -1.0], n_t), np.zeros(n_t), np.zeros(n_t))
                row += n_t
        # Anti-affinity: at most one member of the group per target.
        for group in p.anti_affinity:
            g = np.array([klass[i] for i in group])
            r_idx = np.repeat(np.arange(row, row + n_t), len(g))
            c_idx = (np.arange(n_t)[:, None] + (g * n_t)[None, :]).ravel()
            add(r_idx, c_idx, np.ones(len(c_idx)), np.full(n_t, -np.inf), np.ones(n_t))
            row += n_t

        matrix = sparse.csr_array((np.concatenate(vals), (np.concatenate(rows),
                                                           np.concatenate(cols))),
                                  shape=(row, n))
        lb = np.zeros(n)
        ub = np.concatenate([(eligible * size[:, None]).ravel(), np.ones(len(with_y))])
        integrality = np.ones(n)
        return c, integrality, lb, ub, LinearConstraint(matrix, np.array(lo), np.array(hi)), \
            constant


# --------------------------------------------------------------------------- greedy
@register
class GreedyPlacement(PlacementStrategy):
    """Best-fit decreasing by marginal energy cost; no solver, not optimal."""

    name = "greedy"
    description = "best-fit decreasing by marginal energy cost (fast heuristic, no solver)"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.weights = PlacementWeights.from_options(self.options)

    def decide_re_placement(self, application: Application, targets: Sequence[Target],
                            requirements: Mapping[str, ServiceRequirements],
                            current_placement: Mapping[str, str],
                            metrics: Mapping[str, ServiceMetrics] | None = None,
                            ) -> PlacementDecision:
        started = time.perf_counter()
        if not requirements:
            return PlacementDecision(strategy=self.name, feasible=True, objective=0.0)
        p = build_problem(application, targets, requirements, current_placement, self.weights)
        if not targets:
            return _infeasible(self.name, p, started)
        assignment = greedy_assign(p)
        if assignment is None:
            return _infeasible(self.name, p, started)
        return _decision(self.name, p, assignment, started, objective_of(p, assignment),
                         requirements)


def units_of(p: Problem) -> list[list[int]]:
    """Services grouped into units that move together (co-location, transitively)."""
    parent = list(range(len(p.services)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in p.co_location:
        for other in group[1:]:
            parent[find(other)] = find(group[0])
    units: dict[int, list[int]] = {}
    for i in range(len(p.services)):
        units.setdefault(find(i), []).append(i)
    return list(units.values())


def greedy_assign(p: Problem) -> list[int] | None:
    """Keep what still fits where it runs, then best-fit decreasing by marginal cost for
    the rest; None when some unit fits nowhere."""
    free = p.free.copy()
    scale = np.where(np.isfinite(free) & (free > 0), free, 1.0).max(axis=0)
    used = np.array([t.busy for t in p.targets])
    wpc = np.array([t.energy.watts_per_cpu for t in p.targets])
    idle = np.array([t.energy.idle_watts for t in p.targets])
    anti_of: dict[int, list[list[int]]] = {}
    for group in p.anti_affinity:
        for i in group:
            anti_of.setdefault(i, []).append(group)
    assignment = [-1] * len(p.services)

    def size(unit: list[int]) -> float:
        pinned = p.eligible[unit].all(axis=0).sum() <= 1
        return (1e9 if pinned else 0.0) + float((p.demand[unit] / scale).sum())

    def allowed(unit: list[int], need: np.ndarray) -> np.ndarray | None:
        ok: np.ndarray = np.asarray(p.eligible[unit].all(axis=0)
                                    & (free >= need - 1e-9).all(axis=1))
        for i in unit:
            for group in anti_of.get(i, []):
                for other in group:
                    if other != i and other in unit:
                        return None  # co-located and anti-affine at once
                    if other != i and assignment[other] >= 0:
                        ok[assignment[other]] = False
        return ok

    def place(unit: list[int], need: np.ndarray, target: int) -> None:
        for i in unit:
            assignment[i] = target
        free[target] -= need
        used[target] = True

    units = sorted(units_of(p), key=size, reverse=True)
    rest = []
    for unit in units:  # first pass: stay where it runs, if it still may and fits
        need = p.demand[unit].sum(axis=0)
        home = {int(p.current[i]) for i in unit}
        ok = allowed(unit, need)
        if ok is None:
            return None
        if len(home) == 1 and (t := home.pop()) >= 0 and ok[t]:
            place(unit, need, t)
        else:
            rest.append(unit)
    for unit in rest:
        need = p.demand[unit].sum(axis=0)
        ok = allowed(unit, need)
        if ok is None or not ok.any():
            return None
        # Opening a node costs its idle power, spread over the cores it can take (so the
        # node cheapest when full opens first); a node in use costs only the cores.
        share = np.where(np.isfinite(p.free[:, 0]) & (p.free[:, 0] > 0),
                         need[0] / np.maximum(p.free[:, 0], 1e-9), 1.0)
        score = p.watt_cost * (wpc * need[0] + np.where(used, 0.0, idle * share))
        left = ((free - need) / scale)[:, :2].sum(axis=1)  # best fit breaks ties
        order = np.lexsort((left, np.round(score, 9)))
        place(unit, need, next(int(t) for t in order if ok[t]))
    return assignment


def objective_of(p: Problem, assignment: Sequence[int]) -> float:
    """The MILP objective of an assignment (so that strategies can be compared)."""
    wpc = np.array([t.energy.watts_per_cpu for t in p.targets])
    total = 0.0
    on = set()
    for i, j in enumerate(assignment):
        total += p.watt_cost[j] * wpc[j] * p.demand[i, 0]
        if p.current[i] >= 0 and p.current[i] != j:
            total += p.weights.move
        on.add(j)
    for j in on:
        t = p.targets[j]
        if not t.busy:
            total += p.watt_cost[j] * t.energy.idle_watts
    return float(total)
