"""Scaling strategies: reactive on the capacity model (default, ``capacity``) and
predictive on a short-horizon forecast (``predictive``).

Both solve one small integer program per decision (HiGHS through scipy)::

    minimise   sum_s  w_util * r_s                       capacity kept (in replicas)
                    + (w_util + w_unmet) / alpha_s * u_s  rate left unserved
                    + w_change * |r_s - current_s|        replicas added or removed
    subject to alpha_s * r_s + beta_s + u_s >= rate_s     the capacity model
               sum_{s on t} cpu_s * r_s <= free_cpu(t)    (and memory) per host
               lower_s <= r_s <= max_replicas_s           integers

``lower_s`` is ``min_replicas``, raised to ``min(current, highest need recorded in the
stabilisation window)``: scaling up is immediate, scaling down waits until the lower need
has lasted the whole window (no flapping), and happens when ``w_util > w_change``. The
slack ``u`` keeps the problem feasible when ``max_replicas`` or host capacity runs out;
the decision then names the shortage. Services without a rate keep their replicas
(clamped to their bounds).

``predictive`` plans for ``max(rate now, forecast)``: an external prediction carried in
the metrics (``predicted_rate``), else the linear-trend forecast of
:mod:`mlsysops.strategies.forecast` over the rate history (telemetry history plus what
earlier decisions kept in ``memory``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from mlsysops.strategies.base import ScalingStrategy
from mlsysops.strategies.forecast import forecast
from mlsysops.strategies.model import (
    Application,
    ScalingDecision,
    ServiceMetrics,
    ServiceRequirements,
    Shortage,
    Target,
    describe_shortages,
)
from mlsysops.strategies.options import ForecastOptions, ScalingWeights, StrategyError
from mlsysops.strategies.registry import register

_WEIGHT_KEYS = ("utilisation", "change", "unmet", "stabilisation_window", "time_limit")


@register
class CapacityScaling(ScalingStrategy):
    """Reactive: replicas for the observed rate, bounded, stabilised, capacity-aware."""

    name = "capacity"
    description = ("capacity model alpha*r+beta >= rate per service; bounded, scale-down "
                   "after a stabilisation window, host capacity respected")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.weights = ScalingWeights.from_options(self._split(self.options)[0])

    def _split(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        ours = {k: v for k, v in options.items() if k in _WEIGHT_KEYS}
        rest = {k: v for k, v in options.items() if k not in _WEIGHT_KEYS}
        if rest and type(self) is CapacityScaling:
            raise StrategyError(f"unknown option(s) {', '.join(sorted(rest))} "
                                f"(known: {', '.join(_WEIGHT_KEYS)})")
        return ours, rest

    # -- the rate to plan for (the predictive variant overrides this) -----------------
    def planning_rate(self, service: str, metrics: ServiceMetrics | None, now: float,
                      memory: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
        """The rate to provision for, and details for the status."""
        rate = metrics.rate if metrics is not None else None
        return rate, {"rate": rate}

    # -- the decision -------------------------------------------------------------------
    def decide_replicas(self, application: Application, targets: Sequence[Target],
                        requirements: Mapping[str, ServiceRequirements],
                        current_placement: Mapping[str, str],
                        current_replicas: Mapping[str, int],
                        metrics: Mapping[str, ServiceMetrics], *, now: float,
                        memory: Mapping[str, Any] | None = None) -> ScalingDecision:
        started = time.perf_counter()
        w = self.weights
        memory_out: dict[str, Any] = {k: v for k, v in (memory or {}).items()}
        history: dict[str, list[list[float]]] = {
            s: [list(p) for p in points if now - p[0] <= w.stabilisation_window]
            for s, points in dict(memory_out.get("needed") or {}).items() if s in requirements}
        services = list(requirements)
        n = len(services)
        lower = np.zeros(n)
        upper = np.zeros(n)
        rates: dict[int, float] = {}
        details: dict[str, dict[str, Any]] = {}
        current = {s: int(current_replicas[s]) for s in services if s in current_replicas}
        for i, s in enumerate(services):
            prof = requirements[s].profile
            cur = current.get(s)
            rate, info = self.planning_rate(s, metrics.get(s), now, memory_out)
            lo, hi = prof.min_replicas, max(prof.min_replicas, prof.max_replicas)
            if prof.fixed is not None:
                lo = hi = prof.fixed
            elif rate is None:
                keep = cur if cur is not None else prof.min_replicas
                lo = hi = max(lo, min(hi, keep))
            else:
                needed = prof.needed(rate)
                rates[i] = rate
                history.setdefault(s, []).append([now, needed])
                peak = max(p[1] for p in history[s])
                floor = min(cur, peak) if cur is not None else 0
                lo = max(lo, min(hi, int(floor)))
                info = {**info, "needed": needed, "floor": lo}
            lower[i], upper[i] = lo, hi
            details[s] = {**info, "min": lo, "max": hi}
        memory_out["needed"] = history

        result = self._solve(services, requirements, targets, current_placement, current,
                             rates, lower, upper)
        relaxed = ""
        if result is None:  # the stabilisation floor no longer fits: let it go
            relaxed = "stabilisation floor relaxed to fit host capacity; "
            floors = np.array([requirements[s].profile.min_replicas for s in services], float)
            lower = np.minimum(np.maximum(floors, 0), upper)
            result = self._solve(services, requirements, targets, current_placement, current,
                                 rates, lower, upper)
        if result is None:
            relaxed = "host capacity is short even at the minimum replicas; "
            result = self._solve(services, requirements, {}, current_placement, current,
                                 rates, lower, upper)
        assert result is not None  # without capacity rows the bounds alone are feasible
        replicas_arr, unmet, objective = result

        replicas = {s: int(replicas_arr[i]) for i, s in enumerate(services)}
        shortages = []
        for i, s in enumerate(services):
            details[s]["replicas"] = replicas[s]
            if i in rates and unmet[i] > 1e-6:
                details[s]["unmet_rate"] = round(float(unmet[i]), 6)
                shortages.append(self._shortage(s, requirements[s], targets,
                                                current_placement, rates[i], replicas[s],
                                                upper[i]))
        reason = relaxed + describe_shortages(shortages)
        if not rates:
            reason = reason or "no request rate for any service: replicas kept"
        return ScalingDecision(
            strategy=self.name, feasible=not shortages and not relaxed.startswith("host"),
            replicas=replicas, current=current, objective=objective,
            solve_ms=(time.perf_counter() - started) * 1000.0, reason=reason.strip("; "),
            shortages=shortages, details=details, memory=memory_out)

    def _solve(self, services: list[str], requirements: Mapping[str, ServiceRequirements],
               targets: Sequence[Target] | Mapping[str, Target],
               placement: Mapping[str, str], current: Mapping[str, int],
               rates: Mapping[int, float], lower: np.ndarray, upper: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Variables r (n), u (n), d (n); None when infeasible."""
        w = self.weights
        n = len(services)
        if n == 0:
            return np.zeros(0), np.zeros(0), 0.0
        alpha = np.array([max(requirements[s].profile.alpha, 1e-9) for s in services])
        c = np.zeros(3 * n)
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        lo: list[float] = []
        hi: list[float] = []
        constant = 0.0

        def row(entries: list[tuple[int, float]], low: float, high: float) -> None:
            r = len(lo)
            for col, val in entries:
                rows.append(r)
                cols.append(col)
                vals.append(val)
            lo.append(low)
            hi.append(high)

        for i, s in enumerate(services):
            prof = requirements[s].profile
            if i in rates:
                c[i] = w.utilisation
                c[n + i] = (w.utilisation + w.unmet) / alpha[i]
                constant -= w.utilisation * (rates[i] - prof.beta) / alpha[i]
                row([(i, alpha[i]), (n + i, 1.0)], rates[i] - prof.beta, math.inf)
            if s in current:
                c[2 * n + i] = w.change
                row([(2 * n + i, 1.0), (i, -1.0)], -current[s], math.inf)
                row([(2 * n + i, 1.0), (i, 1.0)], current[s], math.inf)
        by_name = targets if isinstance(targets, Mapping) else {t.name: t for t in targets}
        hosts: dict[str, list[int]] = {}
        for i, s in enumerate(services):
            host = placement.get(s)
            if host is not None and host in by_name:
                hosts.setdefault(host, []).append(i)
        for host, members in sorted(hosts.items()):
            free = by_name[host].free
            for resource in ("cpu", "memory", "gpu"):
                cap = free.get(resource)
                per = [(i, requirements[services[i]].per_replica.get(resource)) for i in members]
                per = [(i, v) for i, v in per if v > 0]
                if per and math.isfinite(cap):
                    row(per, -math.inf, cap)
        integrality = np.concatenate([np.ones(n), np.zeros(2 * n)])
        lb = np.concatenate([lower, np.zeros(2 * n)])
        ub = np.concatenate([upper, np.full(2 * n, math.inf)])
        constraints = []
        if lo:
            matrix = sparse.csr_array((vals, (rows, cols)), shape=(len(lo), 3 * n))
            constraints.append(LinearConstraint(matrix, np.array(lo), np.array(hi)))
        result = milp(c, integrality=integrality, bounds=Bounds(lb, ub), constraints=constraints,
                      options={"time_limit": w.time_limit, "disp": False})
        if result.x is None:
            return None
        r = np.round(result.x[:n])
        return r, result.x[n: 2 * n], float(result.fun) + constant

    @staticmethod
    def _shortage(service: str, req: ServiceRequirements, targets: Sequence[Target],
                  placement: Mapping[str, str], rate: float, replicas: int,
                  upper: float) -> Shortage:
        prof = req.profile
        wanted = math.ceil(max(0.0, rate - prof.beta) / prof.alpha - 1e-9) if prof.alpha > 0 \
            else replicas
        if replicas >= upper:
            return Shortage("max_replicas", wanted, upper, "the service's profile", (service,))
        host = placement.get(service, "")
        target = next((t for t in targets if t.name == host), None)
        if target is not None:
            for resource in ("cpu", "memory", "gpu"):
                per = req.per_replica.get(resource)
                if per > 0 and per * wanted > target.free.get(resource):
                    return Shortage(resource, per * wanted, target.free.get(resource), host,
                                    (service,))
        return Shortage("rate", rate, prof.alpha * replicas + prof.beta, host or "unplaced",
                        (service,))


@register
class PredictiveScaling(CapacityScaling):
    """Provisions ahead of the load: for max(rate now, predicted or forecast rate)."""

    name = "predictive"
    description = ("capacity model on max(rate, forecast): external predicted_rate, else a "
                   "linear-trend forecast of the rate history")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.forecast = ForecastOptions.from_options(self._split(self.options)[1])

    def planning_rate(self, service: str, metrics: ServiceMetrics | None, now: float,
                      memory: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
        kept = dict(memory.get("rates") or {})
        points = [(float(t), float(v)) for t, v in kept.get(service, [])]
        if metrics is not None:
            points += list(metrics.history)
            if metrics.rate is not None:
                points.append((metrics.at if metrics.at is not None else now, metrics.rate))
        horizon_start = now - self.forecast.window
        unique = sorted({round(t, 6): (t, v) for t, v in points if t >= horizon_start}.values())
        kept[service] = [[t, v] for t, v in unique]
        memory["rates"] = kept
        rate = metrics.rate if metrics is not None else None
        if rate is None:
            return None, {"rate": None}
        external = metrics.predicted_rate if metrics is not None else None
        predicted = external if external is not None else forecast(unique, self.forecast)
        planned = max(rate, predicted) if predicted is not None else rate
        return planned, {"rate": rate, "predicted_rate": predicted,
                         "prediction": "external" if external is not None else "forecast"}
