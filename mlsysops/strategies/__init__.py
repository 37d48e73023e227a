"""Pluggable placement and scaling strategies (public API for policy and strategy authors).

- Interfaces: :class:`PlacementStrategy` (``calculate_initial_placement``,
  ``decide_re_placement``) and :class:`ScalingStrategy` (``decide_replicas``).
- Data: :class:`Target` (a node or cluster with capacity and :class:`EnergyProfile`),
  :class:`ServiceRequirements` (per-replica :class:`Resources`, eligibility,
  :class:`ScalingProfile`), :class:`Application`, :class:`ServiceMetrics`; decisions
  :class:`PlacementDecision` and :class:`ScalingDecision`.
- Built-in strategies: placement ``milp`` (default) and ``greedy``; scaling
  ``capacity`` (default) and ``predictive``.
- Registry: :func:`create_placement`, :func:`create_scaling`, :func:`discover` (drop-in
  files and the ``mlsysops.strategies`` entry-point group), :func:`register`.
- Inputs from MLSysOps descriptions, Fluidity's status and telemetry:
  :mod:`mlsysops.strategies.inputs`.

See docs/strategies.md for the author's guide.
"""

from mlsysops.strategies import placement as _placement  # noqa: F401 - registers built-ins
from mlsysops.strategies import scaling as _scaling  # noqa: F401 - registers built-ins
from mlsysops.strategies.base import PlacementStrategy, ScalingStrategy, Strategy
from mlsysops.strategies.energy import cost_per_watt, placement_energy
from mlsysops.strategies.forecast import forecast
from mlsysops.strategies.model import (
    Application,
    EnergyProfile,
    Move,
    PlacementDecision,
    Resources,
    ScalingDecision,
    ScalingProfile,
    ServiceMetrics,
    ServiceRequirements,
    Shortage,
    Target,
)
from mlsysops.strategies.options import (
    ForecastOptions,
    PlacementWeights,
    ScalingWeights,
    StrategyError,
    apply_overrides,
    configuration,
    duration,
    merge,
)
from mlsysops.strategies.placement import GreedyPlacement, MilpPlacement
from mlsysops.strategies.registry import (
    ENTRY_POINT_GROUP,
    create_placement,
    create_scaling,
    describe,
    discover,
    errors,
    names,
    register,
)
from mlsysops.strategies.scaling import CapacityScaling, PredictiveScaling

DEFAULT_PLACEMENT = "milp"
DEFAULT_SCALING = "capacity"

__all__ = [
    "DEFAULT_PLACEMENT",
    "DEFAULT_SCALING",
    "ENTRY_POINT_GROUP",
    "Application",
    "CapacityScaling",
    "EnergyProfile",
    "ForecastOptions",
    "GreedyPlacement",
    "MilpPlacement",
    "Move",
    "PlacementDecision",
    "PlacementStrategy",
    "PlacementWeights",
    "PredictiveScaling",
    "Resources",
    "ScalingDecision",
    "ScalingProfile",
    "ScalingStrategy",
    "ScalingWeights",
    "ServiceMetrics",
    "ServiceRequirements",
    "Shortage",
    "Strategy",
    "StrategyError",
    "Target",
    "apply_overrides",
    "configuration",
    "cost_per_watt",
    "create_placement",
    "create_scaling",
    "describe",
    "discover",
    "duration",
    "errors",
    "forecast",
    "merge",
    "names",
    "placement_energy",
    "register",
]
