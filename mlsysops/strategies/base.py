"""The two strategy interfaces: where services run, and how many replicas each runs.

A strategy is a class with a unique ``name``, constructed with its options (a plain dict:
weights and settings, deployment defaults merged with per-application overrides) and
called with typed inputs (:mod:`mlsysops.strategies.model`). Strategies are pure: they
read their inputs, return a decision, and change nothing; whatever a strategy needs to
remember between calls (a stabilisation window, a rate history) goes out in the
decision's ``memory`` and comes back in the next call's ``memory``, so that any replica
of the planner can make the next decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mlsysops.strategies.model import (
    Application,
    PlacementDecision,
    ScalingDecision,
    ServiceMetrics,
    ServiceRequirements,
    Target,
)


class Strategy(ABC):  # noqa: B024 - the two kinds below add the abstract methods
    """What both kinds share: a name, a kind, options."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})


class PlacementStrategy(Strategy):
    """Decides which target (node or cluster) each service of an application runs on.

    Inputs, for both methods:

    - ``application``: the name, the raw description and the co-location and
      anti-affinity groups;
    - ``targets``: the available nodes or clusters, with capacity, what others already
      use there, and an energy profile;
    - ``requirements``: per service, what one replica needs, how many replicas run, where
      it may run (``eligible``, ``pinned``) and its scaling profile;

    and for re-placement also ``current_placement`` (service -> target, for the services
    that run) and ``metrics`` (request rates, possibly predicted; may be empty).

    A decision places every service or says why it cannot (``feasible`` False, with
    ``reason`` and ``shortages``); it never raises for an infeasible problem.
    """

    kind: ClassVar[str] = "placement"

    def calculate_initial_placement(
        self,
        application: Application,
        targets: Sequence[Target],
        requirements: Mapping[str, ServiceRequirements],
    ) -> PlacementDecision:
        """Place an application nothing of which runs yet (default: re-place from nothing)."""
        return self.decide_re_placement(application, targets, requirements, {}, {})

    @abstractmethod
    def decide_re_placement(
        self,
        application: Application,
        targets: Sequence[Target],
        requirements: Mapping[str, ServiceRequirements],
        current_placement: Mapping[str, str],
        metrics: Mapping[str, ServiceMetrics] | None = None,
    ) -> PlacementDecision:
        """Place every service, given where the services run now."""


class ScalingStrategy(Strategy):
    """Decides how many replicas each service of an application runs.

    Inputs: the ``application``; the ``targets`` (free capacity bounds the replicas a
    host can take); ``requirements`` with each service's scaling profile (alpha, beta,
    min/max replicas); ``current_placement`` (service -> target) and ``current_replicas``;
    ``metrics`` per service (the rate now, perhaps a predicted rate and the history);
    ``now`` (Unix seconds) and ``memory`` (what the previous decision asked to keep).

    Services without a rate keep their replicas (clamped to their profile's bounds).
    """

    kind: ClassVar[str] = "scaling"

    @abstractmethod
    def decide_replicas(
        self,
        application: Application,
        targets: Sequence[Target],
        requirements: Mapping[str, ServiceRequirements],
        current_placement: Mapping[str, str],
        current_replicas: Mapping[str, int],
        metrics: Mapping[str, ServiceMetrics],
        *,
        now: float,
        memory: Mapping[str, Any] | None = None,
    ) -> ScalingDecision:
        """Replicas per service (every service of ``requirements``)."""
