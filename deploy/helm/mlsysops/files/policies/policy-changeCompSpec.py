"""Spec change: rotate the runtime class, the image and the resources of a component.

Every ``change_interval`` the policy changes one more thing of the application's first
component, in turn: its runtime class, then its container image, then its cpu/memory
requests and limits, then the runtime class again, and so on. Fluidity applies each
``change_spec`` as a rolling update of the running instance.

Two deliberate differences from the upstream MLSysOps example, which keeps its rotation
in module-level iterators and rebuilds the spec from the description each time:

- the rotation lives in the context, so its position survives a restart of the service
  and is shared by all of its replicas (module globals are neither);
- the changes accumulate (the image change keeps the new runtime class), so the running
  spec is always the description plus every change made so far.
"""

import copy
import re
import time

from mlsysops.plugin_api import get_logger

logger = get_logger("policy-changeCompSpec")

CHANGES = ["runtime_class_name", "image", "resources"]


def initialize():
    return {
        "telemetry": {"metrics": ["node_load1"], "system_scrape_interval": "1s"},
        "mechanisms": ["fluidity_proxy"],
        "packages": [],
        "configuration": {"analyze_interval": "30s"},
        "scope": "application",
        "core": False,
        "change_interval": "30s",
        "latest_timestamp": None,
        # What to rotate through. An empty "images" list means: the component's image
        # with the tag "latest", then its own image again.
        "runtime_classes": ["crun", "nvidia"],
        "images": [],
        "resources": [
            {"cpu": {"requests": "100m", "limits": "300m"},
             "memory": {"requests": "64Mi", "limits": "128Mi"}},
            {"cpu": {"requests": "250m", "limits": "400m"},
             "memory": {"requests": "128Mi", "limits": "256Mi"}},
        ],
        "step": 0,  # how many changes were planned so far
        "applied": {},  # the current value of each kind of change
    }


def parse_interval(text):
    """Seconds in a duration like "30s", "5m", "2h" or "1d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not match:
        raise ValueError(f"change_interval {text!r} is not a duration like '30s' or '5m'")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    # One change per change_interval (the first analysis asks for one at once).
    now = time.time()
    if context["latest_timestamp"] is None or (
        now - context["latest_timestamp"] >= parse_interval(context["change_interval"])
    ):
        context["latest_timestamp"] = now
        return True, context
    return False, context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    app = application_description[0]
    component = copy.deepcopy(app["spec"]["components"][0])  # the first one, for the demo
    name = component["metadata"]["name"]

    # Which change is next, and its value: kind by kind, each kind cycling its values.
    step = context["step"]
    kind = CHANGES[step % len(CHANGES)]
    turn = step // len(CHANGES)  # how many times this kind was changed before
    if kind == "runtime_class_name":
        values = context["runtime_classes"]
    elif kind == "image":
        values = context["images"] or _default_images(component)
    else:
        values = context["resources"]
    context["applied"][kind] = values[turn % len(values)]
    context["step"] = step + 1

    new_spec = _with_changes(component, context["applied"])
    node = _host(component, app["name"], mechanisms, system_description)
    logger.info("changing spec", app=app["name"], component=name, change=kind,
                value=context["applied"][kind], host=node)
    action = {"action": "change_spec", "new_spec": new_spec, "host": node}
    command = {"name": app["name"], "deployment_plan": {name: [action], "initial_plan": False}}
    return {"fluidity": command}, context


def _with_changes(component, applied):
    """The component as described, with every change made so far."""
    if "runtime_class_name" in applied:
        component["runtime_class_name"] = applied["runtime_class_name"]
    for container in component["containers"]:
        if "image" in applied:
            container["image"] = applied["image"]
        if "resources" in applied:
            requirements = container.setdefault("platform_requirements", {})
            for resource, values in applied["resources"].items():
                requirements.setdefault(resource, {}).update(values)
    return component


def _default_images(component):
    image = component["containers"][0]["image"]
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return [repository + ":latest", image]


def _host(component, app, mechanisms, system_description):
    """Where the component runs: its fixed node, else where Fluidity reports it, else the
    first node of the cluster."""
    fixed = (component.get("node_placement") or {}).get("node")
    if fixed:
        return fixed
    state = (mechanisms.get("fluidity") or {}).get("state") or {}
    instances = (state.get("applications") or {}).get(app, {}).get(
        component["metadata"]["name"], []
    )
    if instances:
        return instances[0]["host"]
    return system_description["MLSysOpsCluster"]["nodes"][0]
