"""Placement: run every component of an application where a placement strategy says.

The strategy (default ``milp``, an integer program over CPU, memory, accelerators,
co-location, anti-affinity, moves and energy) is chosen by name, with its options
(weights), in this policy's context; a trigger changes both for one application::

    mlsysops trigger placement shop --params '{"strategy": "greedy"}'
    mlsysops trigger placement shop --params '{"options": {"move": 50, "carbon": 2}}'
    mlsysops trigger placement shop --params '{"anti_affinity": [["db-a", "db-b"]]}'
    mlsysops trigger placement shop --params '{"reset": true}'   # back to the defaults

What it reads: the application's components (requests, ``node_placement`` node, layers,
labels, architectures, ``cluster_placement.cluster_id``, ``single_node`` groups), the
nodes' hardware and energy profiles (``MLSysOpsEnergy``), where Fluidity runs the
components and with how many replicas, and what other applications take on each node.

- ``analyze`` solves while a component runs nowhere (or Fluidity has not reported yet)
  and every ``replace_interval``; it asks for a plan when the decision deploys or moves
  something.
- ``plan`` solves again on the newest state (a trigger applies its params first) and
  sends Fluidity one ``deploy`` per component that runs nowhere, one ``move`` per
  component to relocate, and a ``remove`` for any extra instance.

``context["status"]`` holds the active strategy, the last decision (placement, moves,
objective, solve time, estimated power and carbon) and, when no placement fits, which
resources are short where.
"""

import time
from pathlib import Path

from mlsysops.plugin_api import descriptions, get_logger, setting
from mlsysops.plugin_api import strategies as st
from mlsysops.plugin_api import strategy_inputs as inputs

logger = get_logger("policy-placement")

# What a trigger's params may set (kept per application in context["overrides"]).
OVERRIDABLE = ("strategy", "options", "co_location", "anti_affinity", "energy_defaults",
               "replace_interval")


def initialize():
    return {
        "scope": "application",
        "core": False,
        "mechanisms": ["fluidity"],
        "configuration": {"analyze_interval": "10s"},
        # Deployment-wide configuration (MLSYSOPS_PLACEMENT_STRATEGY picks the default).
        "strategy": setting("placement_strategy", st.DEFAULT_PLACEMENT),
        "options": {},  # strategy options, e.g. {"move": 10, "energy": 1, "carbon": 1}
        "energy_defaults": {},  # energy profile fields assumed where none is published
        "co_location": [],  # extra groups of components that must share a node
        "anti_affinity": [],  # groups of components no two of which may share a node
        "replace_interval": "60s",  # how often a running placement is re-evaluated
        "strategy_dirs": [],  # more directories of drop-in strategy files
        # State
        "overrides": {},  # per-application configuration set by triggers
        "initial_planned": False,
        "last_solved": 0.0,
        "status": {},
    }


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    app = application_description[0]
    running = inputs.fluidity_state(mechanisms, app["name"])
    if running is None and context.get("initial_planned"):
        return False, context  # planned once; wait for Fluidity to report
    hosts = running[0] if running is not None else {}
    missing = [c for c in _components(app) if not hosts.get(c)]
    config = _config(context)
    try:
        interval = st.duration(config["replace_interval"], "replace_interval")
    except st.StrategyError as exc:
        _error(context, str(exc))
        return False, context
    due = time.time() - context.get("last_solved", 0.0) >= interval
    if not missing and not due:
        return False, context
    decision = _decide(context, config, app, system_description, mechanisms, telemetry)
    if decision is None or not decision.feasible:
        return False, context
    return bool(_deployment_plan(decision, hosts)), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]
    trigger = context.pop("trigger", None)
    if trigger is not None and not _apply_trigger(context, trigger.get("params") or {}):
        return {}, context
    running = inputs.fluidity_state(mechanisms, app["name"])
    hosts = running[0] if running is not None else {}
    decision = _decide(context, _config(context), app, system_description, mechanisms,
                       telemetry, triggered=trigger is not None)
    context["initial_planned"] = True
    if decision is None or not decision.feasible:
        return {}, context
    steps = _deployment_plan(decision, hosts)
    if not steps:
        return {}, context
    logger.info("placement", app=app["name"], strategy=decision.strategy,
                moves=[(m.service, m.source, m.target) for m in decision.moves],
                objective=decision.objective, solve_ms=round(decision.solve_ms, 2))
    steps["initial_plan"] = running is None or not any(hosts.values())
    return {"fluidity": {"name": app["name"], "deployment_plan": steps}}, context


# --------------------------------------------------------------------------- helpers
def _components(app):
    return [inputs.component_name(c) for c in app["spec"].get("components") or []
            if inputs.component_name(c)]


def _config(context):
    """The deployment configuration with this application's overrides on top."""
    return st.configuration(context, OVERRIDABLE)


def _apply_trigger(context, params):
    """Keep a trigger's params as this application's overrides; False if refused."""
    def check(config):  # a bad name, weight or interval must not stick
        _strategy(context, config)
        st.duration(config["replace_interval"], "replace_interval")

    refused = st.apply_overrides(context, params, OVERRIDABLE, check)
    if refused:
        _error(context, refused)
    return refused is None


def _strategy(context, config):
    dirs = [Path(__file__).resolve().parent.parent / "strategies"]
    dirs += [Path(d) for d in setting("strategy_dir", "").split(":") if d]
    dirs += [Path(d) for d in context.get("strategy_dirs") or []]
    st.discover(dirs)
    return st.create_placement(str(config.get("strategy") or st.DEFAULT_PLACEMENT),
                               config.get("options") or {})


def _decide(context, config, app, system_description, mechanisms, telemetry,
            triggered=False):
    """Run the strategy on the current state; the decision also goes into the status."""
    now = time.time()
    context["last_solved"] = now
    try:
        strategy = _strategy(context, config)
        running = inputs.fluidity_state(mechanisms, app["name"])
        hosts, replicas = running if running is not None else ({}, {})
        used = inputs.usage_by_others(mechanisms, app["name"], descriptions.app)
        targets = inputs.node_targets(system_description, used=used,
                                      energy_defaults=config.get("energy_defaults"))
        requirements = inputs.requirements_of(app, targets, replicas=replicas)
        application = inputs.application_of(app, co_location=config.get("co_location") or [],
                                            anti_affinity=config.get("anti_affinity") or [])
        current = {c: h[0] for c, h in hosts.items() if h and c in requirements}
        if current:
            decision = strategy.decide_re_placement(application, targets, requirements,
                                                    current, {})
        else:
            decision = strategy.calculate_initial_placement(application, targets, requirements)
    except st.StrategyError as exc:
        _error(context, str(exc))
        return None
    context["status"] = {
        "active": {"placement": strategy.name},
        "options": config.get("options") or {},
        "overridden": sorted(context.get("overrides") or {}),
        "decided_at": now,
        "triggered": triggered,
        **decision.to_json(),
        "strategy_errors": st.errors(),
    }
    if not decision.feasible:
        logger.warning("no feasible placement", app=app["name"], reason=decision.reason)
    return decision


def _error(context, message):
    logger.warning("placement configuration error", error=message)
    status = dict(context.get("status") or {})
    status.update({"error": message, "error_at": time.time()})
    context["status"] = status


def _deployment_plan(decision, hosts):
    """Fluidity actions from where the components run to where the decision puts them."""
    steps = {}
    for component, target in sorted(decision.placement.items()):
        where = list(hosts.get(component) or [])
        actions = []
        if not where:
            actions.append({"action": "deploy", "host": target})
        elif target not in where:
            actions.append({"action": "move", "src_host": where[0], "target_host": target})
            where = where[1:]
        actions += [{"action": "remove", "host": h} for h in where if h != target]
        if actions:
            steps[component] = actions
    return steps
