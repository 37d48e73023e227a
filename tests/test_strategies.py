"""Placement and scaling strategies, their inputs, registry and policies (no NATS).

The strategies are pure functions of typed inputs, so most tests build inputs directly;
the policy tests call ``analyze``/``plan`` of the shipped policy files with hand-made
descriptions, Fluidity status and telemetry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from mlsysops import strategies as st
from mlsysops.plugin_api import descriptions, get_logger
from mlsysops.strategies import (
    Application,
    EnergyProfile,
    Resources,
    ScalingProfile,
    ServiceMetrics,
    ServiceRequirements,
    StrategyError,
    Target,
    inputs,
    registry,
)
from mlsysops.strategies.placement import build_problem, diagnose

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "plugins" / "optional"
DROPINS = ROOT / "plugins" / "strategies"


def node(name: str, cpu: float = 8, memory: float = 16, gpu: float = 0, **energy: Any) -> Target:
    return Target(name, Resources(cpu, memory, gpu), energy=EnergyProfile.from_dict(energy))


def svc(name: str, cpu: float = 1, memory: float = 1, gpu: float = 0, **kw: Any
        ) -> ServiceRequirements:
    return ServiceRequirements(name, Resources(cpu, memory, gpu), **kw)


def reqs(*services: ServiceRequirements) -> dict[str, ServiceRequirements]:
    return {s.name: s for s in services}


APP = Application("shop")
BLIND = {"energy": 0, "carbon": 0, "renewable": 0}


def check_valid(decision: st.PlacementDecision, targets: list[Target],
                requirements: dict[str, ServiceRequirements], app: Application = APP) -> None:
    """Every service placed once, on an eligible target, within every capacity."""
    assert decision.feasible, decision.reason
    assert set(decision.placement) == set(requirements)
    by_name = {t.name: t for t in targets}
    load: dict[str, Resources] = {}
    for s, t in decision.placement.items():
        r = requirements[s]
        assert r.eligible is None or t in r.eligible
        assert r.pinned is None or t == r.pinned
        load[t] = load.get(t, Resources()) + r.demand
    for t, used in load.items():
        free = by_name[t].free
        assert used.cpu <= free.cpu + 1e-6 and used.memory <= free.memory + 1e-6
        assert used.gpu <= free.gpu + 1e-6
    for group in app.co_location:
        assert len({decision.placement[s] for s in group}) == 1
    for group in app.anti_affinity:
        assert len({decision.placement[s] for s in group}) == len(group)


# --------------------------------------------------------------------------- quantities
@pytest.mark.parametrize(("text", "cores"), [("250m", 0.25), ("2", 2.0), (1.5, 1.5),
                                             ("0.5", 0.5), ("1e3m", 1.0)])
def test_cpu_quantities_are_cores(text: Any, cores: float) -> None:
    assert inputs.parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize(("text", "gb"), [("64Mi", 64 * 2**20 / 1e9), ("1G", 1.0),
                                          ("1Gi", 2**30 / 1e9), ("500M", 0.5), (2e9, 2.0)])
def test_memory_quantities_are_gigabytes(text: Any, gb: float) -> None:
    assert inputs.parse_memory(text) == pytest.approx(gb)


@pytest.mark.parametrize("bad", ["fast", "12Q", "", True])
def test_bad_quantities_are_refused_with_the_value(bad: Any) -> None:
    with pytest.raises(StrategyError, match=r"quantity|unit"):
        inputs.parse_memory(bad)


# --------------------------------------------------------------------------- placement
@pytest.mark.parametrize("name", ["milp", "greedy"])
def test_memory_counts_not_only_cpu(name: str) -> None:
    # Plenty of CPU on node-a, but its memory takes only one of the two services.
    targets = [node("a", cpu=64, memory=4), node("b", cpu=4, memory=64)]
    requirements = reqs(svc("x", cpu=1, memory=3), svc("y", cpu=1, memory=3))
    decision = st.create_placement(name).calculate_initial_placement(APP, targets, requirements)
    check_valid(decision, targets, requirements)
    assert sorted(decision.placement.values()) == ["a", "b"]


@pytest.mark.parametrize("name", ["milp", "greedy"])
def test_accelerators_go_where_there_are_gpus(name: str) -> None:
    targets = [node("cpu-only", cpu=32), node("gpu", cpu=4, gpu=1)]
    requirements = reqs(svc("train", cpu=1, gpu=1), svc("web", cpu=1))
    decision = st.create_placement(name).calculate_initial_placement(APP, targets, requirements)
    check_valid(decision, targets, requirements)
    assert decision.placement["train"] == "gpu"


@pytest.mark.parametrize("name", ["milp", "greedy"])
def test_co_location_and_anti_affinity_are_kept(name: str) -> None:
    targets = [node(f"n{i}", cpu=4, memory=8) for i in range(4)]
    app = Application("shop", co_location=(("web", "cache"),),
                      anti_affinity=(("db-1", "db-2", "db-3"),))
    requirements = reqs(svc("web", cpu=2), svc("cache", cpu=1), svc("db-1"), svc("db-2"),
                        svc("db-3"))
    decision = st.create_placement(name).calculate_initial_placement(app, targets, requirements)
    check_valid(decision, targets, requirements, app)


@pytest.mark.parametrize("name", ["milp", "greedy"])
def test_pinned_and_eligible_targets_are_respected(name: str) -> None:
    targets = [node("a"), node("b"), node("c")]
    requirements = reqs(svc("p", pinned="c"), svc("e", eligible=frozenset({"b"})))
    decision = st.create_placement(name).calculate_initial_placement(APP, targets, requirements)
    assert decision.placement == {"p": "c", "e": "b"}


def test_re_placement_moves_nothing_that_still_fits() -> None:
    targets = [node(f"n{i}", cpu=4) for i in range(3)]
    requirements = reqs(*(svc(f"s{i}") for i in range(6)))
    current = {f"s{i}": f"n{i % 3}" for i in range(6)}
    decision = st.create_placement("milp", BLIND).decide_re_placement(
        APP, targets, requirements, current)
    assert decision.placement == current and decision.moves == []
    assert decision.objective == pytest.approx(0.0)


def test_re_placement_makes_the_fewest_moves_when_a_node_shrinks() -> None:
    # n0 now has room for 2 of its 4 services: exactly two move, the rest stays.
    targets = [node("n0", cpu=2), node("n1", cpu=8), node("n2", cpu=8)]
    requirements = reqs(*(svc(f"s{i}") for i in range(8)))
    current = {f"s{i}": ("n0" if i < 4 else "n1") for i in range(8)}
    decision = st.create_placement("milp", BLIND).decide_re_placement(
        APP, targets, requirements, current)
    check_valid(decision, targets, requirements)
    assert len(decision.moves) == 2
    assert all(m.source == "n0" for m in decision.moves)
    assert decision.objective == pytest.approx(2 * st.PlacementWeights().move)


def test_energy_aware_placement_prefers_clean_efficient_nodes() -> None:
    dirty = dict(pue=1.9, carbon_intensity=800, energy_source="fossil", idle_watts=100,
                 watts_per_cpu=10)
    clean = dict(pue=1.1, carbon_intensity=50, energy_source="renewable", idle_watts=100,
                 watts_per_cpu=10)
    targets = [node("dirty", cpu=16, **dirty), node("clean", cpu=16, **clean)]
    requirements = reqs(*(svc(f"s{i}", cpu=2) for i in range(4)))
    decision = st.create_placement("milp").calculate_initial_placement(APP, targets,
                                                                        requirements)
    assert set(decision.placement.values()) == {"clean"}
    assert decision.energy["targets_used"] == 1
    assert decision.energy["facility_watts"] == pytest.approx(1.1 * (100 + 8 * 10))
    assert decision.energy["carbon_g_per_h"] == pytest.approx(1.1 * 180 * 50 / 1000)


def test_energy_consolidates_onto_few_nodes_and_moves_cost_what_the_weight_says() -> None:
    profile = dict(pue=1.2, carbon_intensity=300, idle_watts=80, watts_per_cpu=8)
    targets = [node(f"n{i}", cpu=8, **profile) for i in range(4)]
    requirements = reqs(*(svc(f"s{i}", cpu=2) for i in range(4)))
    spread = {f"s{i}": f"n{i}" for i in range(4)}
    # Three idle nodes of 80 W at PUE 1.2 are worth far more than 3 moves of 10.
    decision = st.create_placement("milp").decide_re_placement(APP, targets, requirements,
                                                               spread)
    assert len(set(decision.placement.values())) == 1 and len(decision.moves) == 3
    # With moves made expensive the running placement stays.
    sticky = st.create_placement("milp", {"move": 10_000})
    assert sticky.decide_re_placement(APP, targets, requirements, spread).moves == []


def test_preferred_targets_win_a_tie() -> None:
    same = dict(pue=1.3, carbon_intensity=200, idle_watts=50, watts_per_cpu=5)
    targets = [node("a", **same), node("b", preferred=True, **same), node("c", **same)]
    decision = st.create_placement("milp").calculate_initial_placement(
        APP, targets, reqs(svc("x")))
    assert decision.placement == {"x": "b"}


def test_max_utilisation_leaves_headroom() -> None:
    targets = [node("a", cpu=4), node("b", cpu=4)]
    requirements = reqs(svc("x", cpu=3), svc("y", cpu=0.5))
    packed = st.create_placement("milp", {"max_utilisation": 0.8})
    decision = packed.calculate_initial_placement(APP, targets, requirements)
    assert decision.placement["x"] != decision.placement["y"]


@pytest.mark.parametrize("name", ["milp", "greedy"])
def test_infeasible_placement_says_which_resource_is_short(name: str) -> None:
    targets = [node("a", cpu=8, memory=2), node("b", cpu=8, memory=2)]
    requirements = reqs(svc("big", cpu=1, memory=3), svc("small"))
    decision = st.create_placement(name).calculate_initial_placement(APP, targets, requirements)
    assert not decision.feasible and decision.placement == {}
    assert decision.reason.startswith("infeasible: memory short on any eligible target")
    (shortage,) = decision.shortages
    assert shortage.to_json() == {"resource": "memory", "demand": 3.0, "available": 2.0,
                                  "where": "any eligible target", "services": ["big"]}


def test_infeasible_reasons_cover_totals_pins_and_groups() -> None:
    targets = [node("a", cpu=2), node("b", cpu=2)]
    app = Application("shop", anti_affinity=(("r1", "r2", "r3"),))
    requirements = reqs(svc("r1"), svc("r2"), svc("r3"), svc("p1", pinned="a"),
                        svc("p2", pinned="a"), svc("p3", pinned="a"), svc("lost", pinned="z"))
    p = build_problem(app, targets, requirements, {}, st.PlacementWeights())
    found = {(s.resource, s.where) for s in diagnose(p)}
    assert ("targets", "no eligible target") in found  # pinned to an unknown node
    assert ("targets", "targets for an anti-affinity group") in found  # 2 nodes, 3 members
    assert ("cpu", "all targets") in found  # 7 cores wanted, 4 free
    assert ("cpu", "a") in found  # three pinned to a, which has 2 cores
    decision = st.create_placement("milp").calculate_initial_placement(app, targets,
                                                                        requirements)
    assert "lost" in decision.reason and "cpu short on all targets" in decision.reason


def test_a_packing_that_only_the_solver_finds_infeasible_is_reported_as_such() -> None:
    # 3 services of 3 cores on 2 nodes of 5 cores: every count passes, packing fails.
    targets = [node("a", cpu=5), node("b", cpu=5)]
    requirements = reqs(*(svc(f"s{i}", cpu=3) for i in range(3)))
    decision = st.create_placement("milp").calculate_initial_placement(APP, targets,
                                                                        requirements)
    assert not decision.feasible and "do not pack" in decision.reason


def test_nothing_to_place_is_a_feasible_empty_decision() -> None:
    for name in ("milp", "greedy"):
        decision = st.create_placement(name).calculate_initial_placement(APP, [node("a")], {})
        assert decision.feasible and decision.placement == {}


def test_decision_status_is_plain_json() -> None:
    decision = st.create_placement("milp").calculate_initial_placement(
        APP, [node("a", cpu=math.inf)], reqs(svc("x")))
    status = decision.to_json()
    assert msgspec.json.decode(msgspec.json.encode(status)) == status
    assert status["moves"] == [{"service": "x", "from": None, "to": "a"}]
    assert status["solve_ms"] > 0 and status["feasible"]
    # Also when infeasible (numbers from numpy must come out as plain floats).
    for name in ("milp", "greedy"):
        infeasible = st.create_placement(name).calculate_initial_placement(
            APP, [node("a", memory=1)], reqs(svc("x", memory=2)))
        msgspec.json.encode(infeasible.to_json())
    scaled = decide(st.create_scaling("predictive"), reqs(profiled("web", hi=2)), {"web": 1},
                    {"web": rate(50)}, targets=[node("a", cpu=0.5)], placement={"web": "a"})
    msgspec.json.encode(scaled.to_json())
    msgspec.json.encode(scaled.memory)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.data())
def test_milp_is_valid_and_never_worse_than_greedy(data: Any) -> None:
    n_t = data.draw(hs.integers(1, 5))
    targets = [node(f"n{j}", cpu=data.draw(hs.sampled_from([2, 4, 8])),
                    memory=data.draw(hs.sampled_from([2, 4, 8])),
                    gpu=data.draw(hs.sampled_from([0, 0, 1])),
                    pue=data.draw(hs.sampled_from([1.1, 1.5, 2.0])),
                    carbon_intensity=data.draw(hs.sampled_from([50, 400, 800])),
                    idle_watts=data.draw(hs.sampled_from([0, 50, 100])), watts_per_cpu=10)
               for j in range(n_t)]
    n_s = data.draw(hs.integers(1, 8))
    requirements = reqs(*(svc(f"s{i}", cpu=data.draw(hs.sampled_from([0.5, 1, 2])),
                              memory=data.draw(hs.sampled_from([0.5, 1, 2])),
                              gpu=data.draw(hs.sampled_from([0, 0, 0, 1])))
                          for i in range(n_s)))
    current = {s: data.draw(hs.sampled_from([t.name for t in targets]))
               for s in requirements if data.draw(hs.booleans())}
    exact = st.create_placement("milp", {"mip_rel_gap": 0}).decide_re_placement(
        APP, targets, requirements, current)
    greedy = st.create_placement("greedy").decide_re_placement(APP, targets, requirements,
                                                               current)
    if greedy.feasible:
        check_valid(greedy, targets, requirements)
        assert exact.feasible
    if exact.feasible:
        check_valid(exact, targets, requirements)
        if greedy.feasible:
            assert exact.objective <= greedy.objective + 1e-6
    else:
        assert exact.reason.startswith("infeasible")


# --------------------------------------------------------------------------- scaling
def rate(value: float | None, **kw: Any) -> ServiceMetrics:
    return ServiceMetrics(rate=value, **kw)


def decide(strategy: st.ScalingStrategy, requirements: dict[str, ServiceRequirements],
           current: dict[str, int], rates: dict[str, ServiceMetrics], now: float = 1000.0,
           memory: dict[str, Any] | None = None, targets: list[Target] | None = None,
           placement: dict[str, str] | None = None) -> st.ScalingDecision:
    return strategy.decide_replicas(APP, targets or [], requirements, placement or {},
                                    current, rates, now=now, memory=memory)


def profiled(name: str, alpha: float = 10, beta: float = 0, lo: int = 1, hi: int = 10,
             cpu: float = 0.5, replicas: int = 1) -> ServiceRequirements:
    return svc(name, cpu=cpu, memory=0.25, replicas=replicas,
               profile=ScalingProfile(alpha, beta, lo, hi))


def test_capacity_model_gives_the_fewest_replicas_that_serve_the_rate() -> None:
    scaler = st.create_scaling("capacity")
    requirements = reqs(profiled("web", alpha=10, beta=5), profiled("api", alpha=20))
    decision = decide(scaler, requirements, {"web": 1, "api": 1},
                      {"web": rate(95), "api": rate(41)})
    assert decision.replicas == {"web": 9, "api": 3}  # 10*9+5 >= 95; 20*3 >= 41
    assert decision.feasible and decision.changes == {"web": (1, 9), "api": (1, 3)}
    assert decision.details["web"]["needed"] == 9


def test_replicas_never_exceed_the_maximum_and_the_shortage_is_named() -> None:
    decision = decide(st.create_scaling("capacity"), reqs(profiled("web", hi=4)), {"web": 2},
                      {"web": rate(100)})
    assert decision.replicas == {"web": 4} and not decision.feasible
    (shortage,) = decision.shortages
    assert (shortage.resource, shortage.demand, shortage.available) == ("max_replicas", 10, 4)
    assert "max_replicas short" in decision.reason


def test_host_capacity_bounds_the_replicas() -> None:
    targets = [node("a", cpu=2, memory=64)]  # room for 4 replicas of 0.5 cores
    decision = decide(st.create_scaling("capacity"), reqs(profiled("web")), {"web": 1},
                      {"web": rate(80)}, targets=targets, placement={"web": "a"})
    assert decision.replicas == {"web": 4}
    (shortage,) = decision.shortages
    assert (shortage.resource, shortage.where) == ("cpu", "a")


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    scaler = st.create_scaling("capacity", {"stabilisation_window": "30s"})
    requirements = reqs(profiled("web"))
    memory: dict[str, Any] = {}
    replicas = 8
    seen = []
    for t in range(0, 61, 5):  # the load falls from 80 to 20 req/s at t=0
        d = decide(scaler, requirements, {"web": replicas}, {"web": rate(20 if t else 80)},
                   now=1000 + t, memory=memory)
        memory, replicas = d.memory, d.replicas["web"]
        seen.append(replicas)
    # 8 replicas stay while the 80 req/s need is inside the 30 s window, then 2.
    assert seen[:7] == [8] * 7 and seen[7:] == [2] * 6


def test_an_oscillating_rate_does_not_flap() -> None:
    scaler = st.create_scaling("capacity", {"stabilisation_window": "60s"})
    requirements = reqs(profiled("web"))
    memory: dict[str, Any] = {}
    replicas, seen = 1, []
    for t in range(0, 300, 5):
        value = 75 if (t // 5) % 2 else 25
        d = decide(scaler, requirements, {"web": replicas}, {"web": rate(value)},
                   now=1000 + t, memory=memory)
        memory, replicas = d.memory, d.replicas["web"]
        seen.append(replicas)
    assert seen == [3] + [8] * 59  # up at once, then held: no flapping


def test_change_weight_above_utilisation_weight_keeps_spare_replicas() -> None:
    scaler = st.create_scaling("capacity", {"change": 2, "stabilisation_window": 0})
    decision = decide(scaler, reqs(profiled("web")), {"web": 6}, {"web": rate(10)})
    assert decision.replicas == {"web": 6}
    eager = st.create_scaling("capacity", {"stabilisation_window": 0})
    assert decide(eager, reqs(profiled("web")), {"web": 6}, {"web": rate(10)}).replicas == {
        "web": 1}


def test_services_without_a_rate_keep_their_replicas_within_bounds() -> None:
    decision = decide(st.create_scaling("capacity"),
                      reqs(profiled("web", hi=3), profiled("batch", lo=2)),
                      {"web": 5, "batch": 1}, {})
    assert decision.replicas == {"web": 3, "batch": 2}
    assert decision.reason.startswith("no request rate")


def test_manual_scaling_is_fixed() -> None:
    requirements = reqs(svc("web", profile=ScalingProfile(fixed=3)))
    decision = decide(st.create_scaling("capacity"), requirements, {"web": 1},
                      {"web": rate(500)})
    assert decision.replicas == {"web": 3} and decision.feasible


def test_predictive_scaling_allocates_ahead_of_a_ramp() -> None:
    reactive = st.create_scaling("capacity")
    predictive = st.create_scaling("predictive", {"horizon": "20s", "window": "60s"})
    requirements = reqs(profiled("web", hi=50))
    memory: dict[str, Any] = {}
    ahead = 0
    for step in range(12):  # +10 req/s every 10 s
        now, value = 1000.0 + 10 * step, 20.0 + 10 * step
        d = decide(predictive, requirements, {"web": 1}, {"web": rate(value, at=now)},
                   now=now, memory=memory)
        memory = d.memory
        if step >= 4:
            next_needed = math.ceil((value + 10) / 10)
            ahead += d.replicas["web"] >= next_needed
            assert decide(reactive, requirements, {"web": 1},
                          {"web": rate(value)}).replicas["web"] < next_needed
    assert ahead == 8
    assert d.details["web"]["prediction"] == "forecast"
    assert len(memory["rates"]["web"]) == 7  # the last 60 s of rates are kept


def test_predictive_scaling_uses_an_external_prediction_first() -> None:
    decision = decide(st.create_scaling("predictive"), reqs(profiled("web")), {"web": 1},
                      {"web": rate(10, predicted_rate=72)})
    assert decision.replicas == {"web": 8}
    assert decision.details["web"]["prediction"] == "external"


def test_forecast_extrapolates_a_trend_and_needs_points() -> None:
    options = st.ForecastOptions(horizon=10, window=100, margin=0, min_points=3)
    assert st.forecast([(0, 10), (10, 20), (20, 30)], options) == pytest.approx(40)
    assert st.forecast([(0, 10), (10, 20)], options) is None
    assert st.forecast([(0, 30), (10, 20), (20, 10)], options) == pytest.approx(0)


@pytest.mark.parametrize(("kind", "options", "match"), [
    ("placement", {"mvoe": 1}, "unknown option"),
    ("placement", {"move": "10"}, "must be a number"),
    ("placement", {"max_utilisation": 2}, "between"),
    ("scaling", {"stabilisation_window": "soon"}, "duration"),
    ("scaling", {"horizon": "30s"}, "unknown option"),
])
def test_bad_options_are_refused_with_the_key(kind: str, options: dict[str, Any],
                                              match: str) -> None:
    create = st.create_placement if kind == "placement" else st.create_scaling
    name = "milp" if kind == "placement" else "capacity"
    with pytest.raises(StrategyError, match=match):
        create(name, options)


# --------------------------------------------------------------------------- registry
@pytest.fixture
def clean_registry() -> Iterator[None]:
    registry._reset_for_tests()
    yield
    registry._reset_for_tests()


def test_built_ins_are_registered_and_unknown_names_list_them() -> None:
    assert {"milp", "greedy"} <= set(st.names("placement"))
    assert {"capacity", "predictive"} <= set(st.names("scaling"))
    with pytest.raises(StrategyError, match=r"unknown placement strategy 'nope' \(known: .*milp"):
        st.create_placement("nope")


def test_drop_in_files_are_discovered_reloaded_and_reported(tmp_path: Path,
                                                           clean_registry: None) -> None:
    st.discover([DROPINS])
    assert "spread" in st.names("placement")
    mine = tmp_path / "mine.py"
    mine.write_text(SCALER.format(name="always-three", replicas=3))
    st.discover([tmp_path])
    scaler = st.create_scaling("always-three")
    assert decide(scaler, reqs(svc("web")), {"web": 1}, {}).replicas == {"web": 3}
    # An edited file replaces what it registered.
    mine.write_text(SCALER.format(name="always-four", replicas=4))
    import os
    os.utime(mine, (mine.stat().st_atime, mine.stat().st_mtime + 5))
    st.discover([tmp_path])
    assert "always-three" not in st.names("scaling") and "always-four" in st.names("scaling")
    # A broken file or a stolen name is reported, never raised.
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    (tmp_path / "thief.py").write_text(SCALER.format(name="capacity", replicas=1))
    st.discover([tmp_path])
    errors = st.errors()
    assert "ModuleNotFoundError" in errors[str((tmp_path / "broken.py").resolve())]
    assert "already taken" in errors[str((tmp_path / "thief.py").resolve())]
    assert st.describe()["scaling"]["capacity"]["source"] == "builtin"


def test_entry_points_add_strategies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     clean_registry: None) -> None:
    (tmp_path / "ep_strategies.py").write_text(SCALER.format(name="from-package", replicas=2))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("from-package", "ep_strategies:Fixed",
                                       st.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == st.ENTRY_POINT_GROUP else [])
    st.discover()
    assert st.describe()["scaling"]["from-package"]["source"].startswith("entry point")
    sys.modules.pop("ep_strategies", None)


SCALER = '''
from mlsysops.strategies import ScalingDecision, ScalingStrategy

class Fixed(ScalingStrategy):
    name = "{name}"

    def decide_replicas(self, application, targets, requirements, current_placement,
                        current_replicas, metrics, *, now, memory=None):
        return ScalingDecision(self.name, True, {{s: {replicas} for s in requirements}},
                               dict(current_replicas))
'''


def test_the_spread_drop_in_is_energy_blind_and_valid(clean_registry: None) -> None:
    st.discover([DROPINS])
    targets = [node("a", cpu=8, idle_watts=100, watts_per_cpu=10),
               node("b", cpu=8, idle_watts=100, watts_per_cpu=10)]
    requirements = reqs(svc("x", cpu=2), svc("y", cpu=2))
    spread = st.create_placement("spread").calculate_initial_placement(APP, targets,
                                                                        requirements)
    check_valid(spread, targets, requirements)
    assert spread.energy["targets_used"] == 2
    packed = st.create_placement("milp").calculate_initial_placement(APP, targets, requirements)
    assert packed.energy["targets_used"] == 1


# --------------------------------------------------------------------------- inputs
SYSTEM = {
    "MLSysOpsCluster": {"cluster_id": "edge", "nodes": ["a", "b", "ghost"]},
    "MLSysOpsClusters": {"edge": {"cluster_id": "edge", "nodes": ["a", "b", "ghost"]},
                         "cloud": {"cluster_id": "cloud", "nodes": ["c"]}},
    "MLSysOpsNode": {
        "a": {"cluster_id": "edge", "continuum_layer": "edge", "labels": ["site:lab"],
              "hardware": {"cpu": {"cores": 4, "architecture": "amd64"}, "memory": 8}},
        "b": {"cluster_id": "edge", "continuum_layer": "far_edge",
              "hardware": {"cpu": {"cores": 2, "architecture": "arm64"}, "memory": 2}},
        "c": {"cluster_id": "cloud", "continuum_layer": "cloud",
              "hardware": {"cpu": {"cores": 64}, "memory": 256,
                           "gpu": {"model": "a100", "instances": 2}}},
    },
    "MLSysOpsEnergy": {"edge": {"pue": 1.6, "carbon_intensity": 400, "idle_watts": 20},
                       "a": {"pue": 1.2, "energy_source": "renewable"},
                       "cloud": {"pue": 1.1, "renewable_share": 0.9, "preferred": True}},
}


def test_node_targets_merge_hardware_and_energy_profiles() -> None:
    targets = {t.name: t for t in inputs.node_targets(SYSTEM, energy_defaults={
        "watts_per_cpu": 9})}
    assert sorted(targets) == ["a", "b", "c", "ghost"]
    a, b, c, ghost = targets["a"], targets["b"], targets["c"], targets["ghost"]
    assert a.capacity == Resources(4, 8, 0) and c.capacity == Resources(64, 256, 2)
    assert math.isinf(ghost.capacity.cpu)  # listed by a cluster, never described
    # a: its own pue and source over the cluster's carbon and idle power, over defaults.
    assert (a.energy.pue, a.energy.renewable_share, a.energy.carbon_intensity,
            a.energy.idle_watts, a.energy.watts_per_cpu) == (1.2, 1.0, 400, 20, 9)
    assert a.energy.known and (b.energy.pue, b.energy.known) == (1.6, True)
    assert c.energy.preferred and c.cluster == "cloud" and a.labels == ("site:lab",)
    edge_only = inputs.node_targets(SYSTEM, clusters=["cloud"])
    assert [t.name for t in edge_only] == ["c"]


def test_cluster_targets_add_up_their_nodes() -> None:
    clusters = {t.name: t for t in inputs.cluster_targets(SYSTEM)}
    assert clusters["cloud"].capacity == Resources(64, 256, 2)
    assert clusters["cloud"].energy.pue == 1.1 and clusters["cloud"].kind == "cluster"
    assert math.isinf(clusters["edge"].capacity.cpu)  # the undescribed node


APP_DOC = {"name": "shop", "spec": {
    "name": "shop",
    "cluster_placement": {"cluster_id": ["edge"]},
    "single_node": [{"components": ["web", "cache"]}],
    "components": [
        {"metadata": {"name": "web"},
         "node_placement": {"labels": ["site:lab"],
                            "scaling": {"scaling_mode": "auto", "instances": 6}},
         "containers": [
             {"image": "x", "platform_requirements": {"cpu": {"requests": "500m"},
                                                      "memory": {"requests": "256Mi"}}},
             {"image": "y", "platform_requirements": {"cpu": {"requests": "250m"}}}]},
        {"metadata": {"name": "cache"},
         "node_placement": {"scaling": {"scaling_mode": "manual", "instances": 2}},
         "containers": [{"image": "z", "platform_requirements": {
             "cpu": {"requests": "100m", "architecture": ["arm64"]}}}]},
        {"metadata": {"name": "db"}, "node_placement": {"node": "a"},
         "containers": [{"image": "d", "platform_requirements": {"gpu": {"requests": 1}}}]},
    ]}}


def test_requirements_come_from_the_description_and_the_configured_profiles() -> None:
    targets = inputs.node_targets(SYSTEM)
    requirements = inputs.requirements_of(
        APP_DOC, targets, replicas={"web": 3}, profiles={"web": {"alpha": 25}},
        profile_defaults={"alpha": 10, "max_replicas": 20})
    web, cache, db = requirements["web"], requirements["cache"], requirements["db"]
    assert web.per_replica.cpu == pytest.approx(0.75)
    assert web.per_replica.memory == pytest.approx(256 * 2**20 / 1e9)
    assert web.replicas == 3 and web.demand.cpu == pytest.approx(2.25)
    assert web.eligible == frozenset({"a"})  # edge cluster and label site:lab
    assert cache.eligible == frozenset({"b", "ghost"})  # arm64 (ghost: unknown arch)
    assert (web.profile.alpha, web.profile.max_replicas) == (25, 6)
    assert cache.profile.fixed == 2 and cache.replicas == 2
    assert db.pinned == "a" and db.per_replica.gpu == 1
    app = inputs.application_of(APP_DOC, anti_affinity=[["web", "db"]])
    assert app.co_location == (("web", "cache"),) and app.anti_affinity == (("web", "db"),)


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(StrategyError, match="unknown key"):
        inputs.requirements_of(APP_DOC, [], profiles={"web": {"alfa": 3}})
    with pytest.raises(StrategyError, match="alpha must be > 0"):
        inputs.requirements_of(APP_DOC, [], profiles={"web": {"alpha": 0}})


FLUIDITY = {"fluidity": {"state": {"applications": {
    "shop": {"web": [{"host": "a", "replicas": 2}], "cache": [{"host": "a", "replicas": 1},
                                                              {"host": "b", "replicas": 1}]},
    "other": {"api": [{"host": "b", "replicas": 3}]},
}}}}


def test_what_runs_and_what_others_use() -> None:
    hosts, replicas = inputs.fluidity_state(FLUIDITY, "shop")
    assert hosts == {"web": ["a"], "cache": ["a", "b"]} and replicas == {"web": 2, "cache": 2}
    assert inputs.fluidity_state({}, "shop") is None
    other = {"name": "other", "spec": {"components": [{"metadata": {"name": "api"},
             "containers": [{"image": "i", "platform_requirements": {
                 "cpu": {"requests": "200m"}, "memory": {"requests": "1G"}}}]}]}}
    used = inputs.usage_by_others(FLUIDITY, "shop", {"other": other}.get)
    assert used == {"b": Resources(pytest.approx(0.6), 3.0, 0.0)}


def test_rates_come_from_telemetry_with_history_and_predictions() -> None:
    def sample(value: float, component: str, ts: float, **labels: str) -> dict[str, Any]:
        return {"value": value, "ts": ts,
                "labels": {"app": "shop", "component": component, **labels}}

    telemetry = {
        "latest": {"app_request_rate": [sample(30, "web", 20), sample(12, "web", 20),
                                        sample(99, "web", 20, kind="predicted"),
                                        {"value": 5, "labels": {"app": "other",
                                                                "component": "web"}}]},
        "history": [{"collected_at": t, "metrics": {"app_request_rate": [
            sample(v, "web", t), sample(1, "db", t)]}} for t, v in ((0, 10), (10, 20))],
        "collected_at": 20.5,
    }
    metrics = inputs.rate_metrics(telemetry, "app_request_rate", "shop")
    assert metrics["web"].rate == 42 and metrics["web"].predicted_rate == 99
    assert metrics["web"].history == ((0.0, 10.0), (10.0, 20.0)) and metrics["web"].at == 20
    assert metrics["db"].rate == 1 and metrics["db"].at == 10  # only in the history


# --------------------------------------------------------------------------- policies
def load_policy(name: str) -> Any:
    path = POLICIES / f"policy-{name}.py"
    spec = importlib.util.spec_from_file_location(f"_policy_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.logger = get_logger(name)  # type: ignore[attr-defined]
    spec.loader.exec_module(module)
    return module


def system(*nodes: tuple[str, int, int], energy: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    names = [n for n, _, _ in nodes]
    return {"MLSysOpsCluster": {"cluster_id": "c1", "nodes": names},
            "MLSysOpsClusters": {"c1": {"cluster_id": "c1", "nodes": names}},
            "MLSysOpsNode": {n: {"cluster_id": "c1", "continuum_layer": "edge",
                                 "hardware": {"cpu": {"cores": c}, "memory": m}}
                             for n, c, m in nodes},
            "MLSysOpsEnergy": energy or {}}


def component(name: str, cpu: str = "500m", memory: str = "256Mi", **extra: Any
              ) -> dict[str, Any]:
    return {"metadata": {"name": name}, **extra, "containers": [
        {"image": "registry.local/x:1", "platform_requirements": {
            "cpu": {"requests": cpu}, "memory": {"requests": memory}}}]}


def fluidity(app: str, placement: dict[str, tuple[str, int]]) -> dict[str, Any]:
    return {"fluidity": {"state": {"applications": {app: {
        c: [{"host": h, "replicas": r}] for c, (h, r) in placement.items()}}}}}


NO_TELEMETRY: dict[str, Any] = {"latest": {}, "history": [], "collected_at": None,
                                "errors": {}}


@pytest.fixture
def placement_policy() -> Any:
    return load_policy("placement")


@pytest.fixture
def scaling_policy() -> Any:
    return load_policy("scaling")


def test_placement_policy_deploys_then_relocates_to_the_cleaner_node(
        placement_policy: Any) -> None:
    pol = placement_policy
    apps = [{"name": "shop", "spec": {"name": "shop", "components": [
        component("web"), component("db", node_placement={"node": "a"})]}}]
    energy = {"a": {"pue": 1.8, "carbon_intensity": 700, "idle_watts": 50, "watts_per_cpu": 8},
              "b": {"pue": 1.1, "carbon_intensity": 30, "idle_watts": 50, "watts_per_cpu": 8}}
    sysd = system(("a", 4, 8), ("b", 4, 8), energy=energy)
    ctx = pol.initialize()
    verdict, ctx = pol.analyze(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    assert verdict
    commands, ctx = pol.plan(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    steps = commands["fluidity"]["deployment_plan"]
    # db is pinned to a (which is on anyway), so web joins it rather than waking b.
    assert steps == {"db": [{"action": "deploy", "host": "a"}],
                     "web": [{"action": "deploy", "host": "a"}], "initial_plan": True}
    status = ctx["status"]
    assert status["active"] == {"placement": "milp"} and status["feasible"]
    assert status["solve_ms"] > 0 and status["energy"]["targets_used"] == 1

    # Running as planned: nothing to do until the re-evaluation interval.
    running = fluidity("shop", {"web": ("a", 1), "db": ("a", 1)})
    verdict, ctx = pol.analyze(ctx, apps, sysd, running, NO_TELEMETRY, None)
    assert not verdict
    # Unpinned, both would rather run on the clean node; a trigger makes moves cheap for
    # this application and plans at once.
    apps[0]["spec"]["components"][1].pop("node_placement")
    ctx["trigger"] = {"params": {"options": {"move": 0.1}}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, running, NO_TELEMETRY, None)
    assert "trigger" not in ctx and ctx["overrides"] == {"options": {"move": 0.1}}
    assert commands["fluidity"]["deployment_plan"] == {
        "db": [{"action": "move", "src_host": "a", "target_host": "b"}],
        "web": [{"action": "move", "src_host": "a", "target_host": "b"}],
        "initial_plan": False}
    assert ctx["status"]["triggered"] and ctx["status"]["overridden"] == ["options"]


def test_placement_policy_reports_infeasibility_and_refuses_bad_triggers(
        placement_policy: Any) -> None:
    pol = placement_policy
    apps = [{"name": "shop", "spec": {"name": "shop", "components": [
        component("web", memory="6Gi"), component("db", memory="6Gi")]}}]
    sysd = system(("a", 4, 8))
    ctx = pol.initialize()
    verdict, ctx = pol.analyze(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    assert not verdict and not ctx["status"]["feasible"]
    assert ctx["status"]["reason"].startswith("infeasible: memory short on all targets")
    assert ctx["status"]["shortages"][0]["resource"] == "memory"

    ctx["trigger"] = {"params": {"strategy": "nope"}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    assert commands == {} and ctx["overrides"] == {}
    assert "unknown placement strategy 'nope'" in ctx["status"]["error"]
    ctx["trigger"] = {"params": {"weights": {}}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    assert "unknown key(s) weights" in ctx["status"]["error"]
    ctx["trigger"] = {"params": {"replace_interval": "soon"}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, {}, NO_TELEMETRY, None)
    assert "replace_interval" in ctx["status"]["error"] and ctx["overrides"] == {}


def test_placement_policy_counts_what_other_applications_use(placement_policy: Any) -> None:
    pol = placement_policy
    other = {"components": [component("api", cpu="3800m")]}
    descriptions.set("app", "other", other)
    try:
        apps = [{"name": "shop", "spec": {"name": "shop", "components": [component("web")]}}]
        sysd = system(("a", 4, 8), ("b", 4, 8))
        state = {"fluidity": {"state": {"applications": {
            "other": {"api": [{"host": "a", "replicas": 1}]}}}}}
        ctx = pol.initialize()
        ctx["trigger"] = {"params": {"strategy": "greedy"}, "at": 0}
        commands, ctx = pol.plan(ctx, apps, sysd, state, NO_TELEMETRY, None)
        # a has 0.2 cores left: web (0.5) goes to b.
        assert commands["fluidity"]["deployment_plan"]["web"] == [
            {"action": "deploy", "host": "b"}]
        assert ctx["status"]["active"] == {"placement": "greedy"}
    finally:
        descriptions.set("app", "other", None)


def telemetry_with(rates: dict[str, float], app: str = "shop", at: float = 0.0
                   ) -> dict[str, Any]:
    samples = [{"value": v, "ts": at, "labels": {"app": app, "component": c}}
               for c, v in rates.items()]
    return {"latest": {"app_request_rate": samples}, "collected_at": at, "errors": {},
            "history": [{"collected_at": at, "source": "t",
                         "metrics": {"app_request_rate": samples}}]}


def test_scaling_policy_scales_running_components_from_telemetry(scaling_policy: Any) -> None:
    pol = scaling_policy
    apps = [{"name": "shop", "spec": {"name": "shop", "components": [
        component("web"), component("idle")]}}]
    sysd = system(("a", 8, 16))
    running = fluidity("shop", {"web": ("a", 1), "idle": ("a", 2)})
    ctx = pol.initialize()
    assert ctx["configuration"]["analyze_on_telemetry"] is True
    assert ctx["telemetry"]["metrics"] == ["app_request_rate"]
    verdict, ctx = pol.analyze(ctx, apps, sysd, running, telemetry_with({"web": 45}), None)
    assert verdict and ctx["pending"] == {"web": 5}
    commands, ctx = pol.plan(ctx, apps, sysd, running, telemetry_with({"web": 45}), None)
    assert commands == {"fluidity": {"name": "shop", "deployment_plan": {
        "web": [{"action": "scale", "replicas": 5, "host": "a"}], "initial_plan": False}}}
    status = ctx["status"]
    assert status["active"] == {"scaling": "capacity"} and status["replicas"] == {
        "web": 5, "idle": 2}
    assert status["details"]["web"]["rate"] == 45 and "memory" not in status

    # Per-application profile through a trigger: alpha 30 -> 2 replicas for 45 req/s.
    running = fluidity("shop", {"web": ("a", 5), "idle": ("a", 2)})
    ctx["trigger"] = {"params": {"profiles": {"web": {"alpha": 30}},
                                 "options": {"stabilisation_window": 0}}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, running, telemetry_with({"web": 45}), None)
    assert commands["fluidity"]["deployment_plan"]["web"] == [
        {"action": "scale", "replicas": 2, "host": "a"}]


def test_scaling_policy_waits_for_fluidity_and_refuses_bad_profiles(
        scaling_policy: Any) -> None:
    pol = scaling_policy
    apps = [{"name": "shop", "spec": {"name": "shop", "components": [component("web")]}}]
    sysd = system(("a", 8, 16))
    ctx = pol.initialize()
    verdict, ctx = pol.analyze(ctx, apps, sysd, {}, telemetry_with({"web": 45}), None)
    assert not verdict and "waiting for Fluidity" in ctx["status"]["reason"]
    running = fluidity("shop", {"web": ("a", 1)})
    ctx["trigger"] = {"params": {"profiles": {"web": {"alpha": -1}}}, "at": 0}
    commands, ctx = pol.plan(ctx, apps, sysd, running, telemetry_with({"web": 45}), None)
    assert commands == {} and "refused" in ctx["status"]["error"]
    assert ctx["overrides"] == {}
