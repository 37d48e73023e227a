"""Static placement: run each component that names its node, once, on that node.

The smallest useful policy. It has no ``initialize()``, so it starts with an empty
context and the framework defaults (scope "application": one context per application).

- ``analyze`` asks for a plan only while the initial deployment has not been planned.
- ``plan`` sends Fluidity a ``deploy`` for every component whose description names a
  node in ``node_placement.node``, and records in the context that it is done.

Components without a fixed node are left to other policies (see relocateComponents).
"""

from mlsysops.plugin_api import get_logger

logger = get_logger("policy-staticPlacement")


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    # True exactly until plan() has run once for this application.
    return not context.get("initial_deployment_finished", False), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]  # scope "application": the one application
    if context.get("initial_deployment_finished"):
        return {}, context  # placed already: an empty plan means "nothing to do"
    context["initial_deployment_finished"] = True

    deployment_plan = {}
    for component in app["spec"].get("components", []):
        name = component["metadata"]["name"]
        node = (component.get("node_placement") or {}).get("node")
        if node:
            deployment_plan[name] = [{"action": "deploy", "host": node}]
            logger.info("static placement", app=app["name"], component=name, node=node)

    if not deployment_plan:
        return {}, context  # no component names a node: nothing to do

    deployment_plan["initial_plan"] = True
    return {"fluidity": {"name": app["name"], "deployment_plan": deployment_plan}}, context
