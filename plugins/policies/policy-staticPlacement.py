"""Static placement: run each component that names its node on that node.

The smallest useful policy. It has no ``initialize()``, so it starts with an empty
context and the framework defaults (scope "application": one context per application,
analysed every 10 s).

- ``analyze`` asks for a plan while a component whose description names a node
  (``node_placement.node``) is not running there. It reads where components run from
  Fluidity's status (``mechanisms["fluidity"]["state"]``); while Fluidity reports
  nothing, it asks exactly once, for the initial deployment.
- ``plan`` sends Fluidity a ``deploy`` for each such component that is missing, and
  records in the context that the initial deployment was planned.

Looking at what runs, rather than only remembering that a plan was made, matters: the
scheduler discards a plan while another plan for the same application is executing (at
the start, the relocation policy's first plan often is), and a discarded or failed plan
is never retried by the framework. The next analysis sees the component missing and
plans it again; ``deploy`` is idempotent, so planning it twice is harmless.

Components without a fixed node are left to other policies (see relocateComponents).
"""

from mlsysops.plugin_api import get_logger

logger = get_logger("policy-staticPlacement")


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    app = application_description[0]  # scope "application": the one application
    missing = _missing(app, mechanisms)
    if missing is None:  # Fluidity has not reported: plan once, for the initial deployment
        return not context.get("initial_deployment_finished", False), context
    return bool(missing), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]
    initial = not context.get("initial_deployment_finished", False)
    context["initial_deployment_finished"] = True
    missing = _missing(app, mechanisms)
    if missing is None:
        missing = _pinned(app) if initial else {}

    if not missing:
        return {}, context  # nothing to place: an empty plan means "nothing to do"

    deployment_plan = {}
    for name, node in missing.items():
        deployment_plan[name] = [{"action": "deploy", "host": node}]
        logger.info("static placement", app=app["name"], component=name, node=node)
    deployment_plan["initial_plan"] = initial
    return {"fluidity": {"name": app["name"], "deployment_plan": deployment_plan}}, context


def _pinned(app):
    """component -> node, for every component whose description names its node."""
    pinned = {}
    for component in app["spec"].get("components", []):
        node = (component.get("node_placement") or {}).get("node")
        if node:
            pinned[component["metadata"]["name"]] = node
    return pinned


def _missing(app, mechanisms):
    """The pinned components Fluidity does not report on their node (None: no report)."""
    state = (mechanisms.get("fluidity") or {}).get("state")
    running = state.get("applications") if isinstance(state, dict) else None
    if not isinstance(running, dict):
        return None
    instances = running.get(app["name"]) or {}
    return {
        name: node
        for name, node in _pinned(app).items()
        if node not in {i.get("host") for i in instances.get(name, [])}
    }
