"""Scaling: set the replicas of each running component with a pluggable scaling strategy.

The strategy (default ``capacity``: ``alpha * replicas + beta >= rate`` per component,
bounded, scale-down after a stabilisation window; ``predictive`` provisions for a
short-horizon forecast) is chosen by name with its options in this policy's context;
a trigger changes them for one application::

    mlsysops trigger scaling shop --params '{"strategy": "predictive"}'
    mlsysops trigger scaling shop --params '{"profiles": {"web": {"alpha": 25, "max_replicas": 6}}}'
    mlsysops trigger scaling shop --params '{"options": {"stabilisation_window": "2m"}}'

Request rates come from telemetry: the metric ``rate_metric`` (default
``app_request_rate``, requests per second) with the labels ``app`` and ``component``; a
sample also labelled ``kind="predicted"`` is an externally predicted rate. The policy
analyses on every telemetry snapshot (and every ``analyze_interval``), so a step in the
rate is acted on at once.

Each component's profile: ``profile_defaults``, then its description's
``node_placement.scaling`` (manual: that many instances, always; auto: ``instances`` is
the maximum), then ``profiles[component]`` (alpha, beta, min_replicas, max_replicas).
Per-replica CPU and memory are the containers' requests; the free capacity of the node a
component runs on bounds its replicas.

The plan is one Fluidity ``scale`` per component whose replicas change (per host when a
component runs on several). ``context["status"]`` holds the active strategy, the last
decision (replicas, rates, forecasts, objective, solve time) and any shortage.
"""

import time
from pathlib import Path

from mlsysops.plugin_api import descriptions, get_logger, setting
from mlsysops.plugin_api import strategies as st
from mlsysops.plugin_api import strategy_inputs as inputs

logger = get_logger("policy-scaling")

RATE_METRIC = setting("scaling_rate_metric", "app_request_rate")
OVERRIDABLE = ("strategy", "options", "profiles", "profile_defaults")


def initialize():
    return {
        "scope": "application",
        "core": False,
        "mechanisms": ["fluidity"],
        "configuration": {"analyze_interval": "5s", "analyze_on_telemetry": True},
        "telemetry": {"metrics": [RATE_METRIC], "system_scrape_interval": "5s"},
        # Deployment-wide configuration (MLSYSOPS_SCALING_STRATEGY picks the default).
        "strategy": setting("scaling_strategy", st.DEFAULT_SCALING),
        "options": {},  # e.g. {"utilisation": 1, "change": 0.25, "stabilisation_window": "60s"}
        "rate_metric": RATE_METRIC,
        "app_label": "app",
        "component_label": "component",
        "profile_defaults": {"alpha": 10.0, "beta": 0.0, "min_replicas": 1, "max_replicas": 10},
        "profiles": {},  # component -> {"alpha", "beta", "min_replicas", "max_replicas"}
        "strategy_dirs": [],
        # State
        "overrides": {},  # per-application configuration set by triggers
        "memory": {},  # what the strategy keeps between decisions
        "pending": {},  # component -> replicas, decided by the last analysis
        "status": {},
    }


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    app = application_description[0]
    decision = _decide(context, app, system_description, mechanisms, telemetry)
    context["pending"] = _wanted(decision)
    return bool(context["pending"]), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]
    trigger = context.pop("trigger", None)
    wanted = context.get("pending") or {}
    if trigger is not None:
        if not _apply_trigger(context, trigger.get("params") or {}):
            return {}, context
        decision = _decide(context, app, system_description, mechanisms, telemetry,
                           triggered=True)
        wanted = _wanted(decision)
    context["pending"] = {}
    running = inputs.fluidity_state(mechanisms, app["name"])
    if running is None or not wanted:
        return {}, context
    hosts, replicas = running
    steps = {}
    for component, target in sorted(wanted.items()):
        where = hosts.get(component) or []
        if not where or replicas.get(component) == target:
            continue  # gone meanwhile, or already there
        share, extra = divmod(target, len(where))
        steps[component] = [{"action": "scale", "replicas": share + (i < extra), "host": h}
                            for i, h in enumerate(where)]
    if not steps:
        return {}, context
    logger.info("scaling", app=app["name"], replicas=wanted)
    steps["initial_plan"] = False
    return {"fluidity": {"name": app["name"], "deployment_plan": steps}}, context


# --------------------------------------------------------------------------- helpers
def _config(context):
    """The deployment configuration with this application's overrides on top."""
    return st.configuration(context, OVERRIDABLE)


def _apply_trigger(context, params):
    """Keep a trigger's params as this application's overrides; False if refused."""
    def check(config):  # a bad name, weight or profile must not stick
        _strategy(context, config)
        inputs.check_profiles(config.get("profiles"), config.get("profile_defaults"))

    refused = st.apply_overrides(context, params, OVERRIDABLE, check)
    if refused:
        _error(context, refused)
    return refused is None


def _strategy(context, config):
    dirs = [Path(__file__).resolve().parent.parent / "strategies"]
    dirs += [Path(d) for d in setting("strategy_dir", "").split(":") if d]
    dirs += [Path(d) for d in context.get("strategy_dirs") or []]
    st.discover(dirs)
    return st.create_scaling(str(config.get("strategy") or st.DEFAULT_SCALING),
                             config.get("options") or {})


def _decide(context, app, system_description, mechanisms, telemetry, triggered=False):
    running = inputs.fluidity_state(mechanisms, app["name"])
    if running is None or not any(running[0].values()):
        context["status"] = {**(context.get("status") or {}),
                             "reason": "waiting for Fluidity to run the application"}
        return None
    hosts, replicas = running
    config = _config(context)
    now = time.time()
    try:
        strategy = _strategy(context, config)
        used = inputs.usage_by_others(mechanisms, app["name"], descriptions.app)
        targets = inputs.node_targets(system_description, used=used)
        requirements = inputs.requirements_of(app, targets, replicas=replicas,
                                              profiles=config.get("profiles") or {},
                                              profile_defaults=config.get("profile_defaults"))
        requirements = {c: r for c, r in requirements.items() if hosts.get(c)}
        metrics = inputs.rate_metrics(telemetry, context.get("rate_metric") or RATE_METRIC,
                                      app["name"], app_label=context.get("app_label", "app"),
                                      component_label=context.get("component_label",
                                                                  "component"))
        placement = {c: hosts[c][0] for c in requirements}
        decision = strategy.decide_replicas(
            inputs.application_of(app), targets, requirements, placement,
            {c: replicas.get(c, 0) for c in requirements}, metrics, now=now,
            memory=context.get("memory") or {})
    except st.StrategyError as exc:
        _error(context, str(exc))
        return None
    context["memory"] = decision.memory
    context["status"] = {
        "active": {"scaling": strategy.name},
        "options": config.get("options") or {},
        "overridden": sorted(context.get("overrides") or {}),
        "decided_at": now,
        "triggered": triggered,
        **decision.to_json(),
        "strategy_errors": st.errors(),
    }
    return decision


def _wanted(decision):
    if decision is None:
        return {}
    return {c: new for c, (old, new) in decision.changes.items()}


def _error(context, message):
    logger.warning("scaling configuration error", error=message)
    status = dict(context.get("status") or {})
    status.update({"error": message, "error_at": time.time()})
    context["status"] = status
