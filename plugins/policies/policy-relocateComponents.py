"""Relocation: keep moving a freely placed component between two nodes (a demo).

- The first plan deploys the first component that names no node on the first node of
  the cluster.
- Then, every ``moving_interval``, the component moves to the other of the first two
  nodes (Fluidity starts the new instance before it stops the old one).

Everything the policy remembers is in the context, so it survives a restart of the
service and works with several analyzer/planner replicas.
"""

import re
import time

from mlsysops.plugin_api import get_logger

logger = get_logger("policy-relocateComponents")


def initialize():
    return {
        # framework settings
        "telemetry": {"metrics": ["node_load1"], "system_scrape_interval": "5s"},
        "mechanisms": ["fluidity_proxy"],  # the framework knows it as "fluidity"
        "packages": [],
        "configuration": {"analyze_interval": "10s"},
        "scope": "application",
        "core": False,
        # this policy's own state
        "moving_interval": "30s",
        "latest_timestamp": None,
        "initial_deployment_finished": False,
        "component": None,  # the component this policy moves
        "nodes": [],  # the two nodes it moves between
        "current_placement": None,
    }


def parse_interval(text):
    """Seconds in a duration like "30s", "5m", "2h" or "1d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not match:
        raise ValueError(f"moving_interval {text!r} is not a duration like '30s' or '5m'")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    now = time.time()
    # The first call plans the initial deployment; later ones wait for moving_interval.
    if context["latest_timestamp"] is None or (
        now - context["latest_timestamp"] >= parse_interval(context["moving_interval"])
    ):
        context["latest_timestamp"] = now
        return True, context
    return False, context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]
    if not context["initial_deployment_finished"]:
        return initial_plan(context, app, system_description["MLSysOpsCluster"]["nodes"])

    component, nodes = context["component"], context["nodes"]
    if component is None or len(nodes) < 2:
        return {}, context  # nothing to move, or nowhere to move it to

    # Where is it now? Prefer what Fluidity reports; else trust our own memory.
    source = _running_on(mechanisms, app["name"], component) or context["current_placement"]
    target = nodes[1] if source == nodes[0] else nodes[0]
    context["current_placement"] = target
    logger.info("relocating", app=app["name"], component=component, src=source, dst=target)
    move = {"action": "move", "src_host": source, "target_host": target}
    return _fluidity(app, {component: [move], "initial_plan": False}), context


def initial_plan(context, app, nodes):
    context["initial_deployment_finished"] = True
    free = [
        c["metadata"]["name"]
        for c in app["spec"].get("components", [])
        if not (c.get("node_placement") or {}).get("node")
    ]
    if not free or not nodes:
        logger.info("nothing to relocate", app=app["name"], nodes=nodes)
        return {}, context
    context["component"] = free[0]
    context["nodes"] = list(nodes[:2])
    context["current_placement"] = nodes[0]
    deploy = {"action": "deploy", "host": nodes[0]}
    return _fluidity(app, {free[0]: [deploy], "initial_plan": True}), context


def _running_on(mechanisms, app, component):
    """The single host Fluidity reports the component on, if it reports exactly one."""
    state = (mechanisms.get("fluidity") or {}).get("state") or {}
    instances = (state.get("applications") or {}).get(app, {}).get(component, [])
    hosts = [i.get("host") for i in instances]
    return hosts[0] if len(hosts) == 1 else None


def _fluidity(app, deployment_plan):
    return {"fluidity": {"name": app["name"], "deployment_plan": deployment_plan}}
