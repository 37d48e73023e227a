"""Cleanup: remove what Fluidity still runs for applications whose description is gone.

A global policy (``scope: "global"``): it receives every application description at
once. Deleting a description removes nothing by itself; this policy notices the
difference between what Fluidity reports it runs and what is described, and plans the
removal explicitly, so that it is recorded, scheduled and executed like any other plan.

An application must stay undescribed for ``grace_period`` before it is removed, so that
a description being replaced, or a service that has not read the descriptions yet,
never costs a running application.

A plan holds one command per mechanism, so each plan removes one application; the next
analysis finds the next one.
"""

import re
import time

from mlsysops.plugin_api import get_logger

logger = get_logger("policy-appCleanup")


def initialize():
    return {
        "scope": "global",
        "core": False,
        "mechanisms": ["fluidity"],
        "configuration": {"analyze_interval": "30s"},
        "grace_period": "60s",
        "missing_since": {},  # application -> when it was first seen undescribed
        "orphans": [],  # applications to remove
    }


def parse_interval(text):
    """Seconds in a duration like "30s", "5m", "2h" or "1d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not match:
        raise ValueError(f"grace_period {text!r} is not a duration like '30s' or '5m'")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    now = time.time()
    known = context.get("missing_since", {})
    # Keep the first time each undescribed application was seen; forget the others.
    since = {app: known.get(app, now) for app in _undescribed(application_description, mechanisms)}
    grace = parse_interval(context.get("grace_period", "60s"))
    context["missing_since"] = since
    context["orphans"] = sorted(app for app, first in since.items() if now - first >= grace)
    return bool(context["orphans"]), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    # Look again: an application described again meanwhile is not removed.
    still = set(_undescribed(application_description, mechanisms))
    orphans = [app for app in context.get("orphans", []) if app in still]
    if not orphans:
        return {}, context
    logger.info("removing an application without description", app=orphans[0])
    return {"fluidity": {"name": orphans[0], "remove_app": True}}, context


def _undescribed(application_description, mechanisms):
    """Applications Fluidity runs that have no description, sorted."""
    state = (mechanisms.get("fluidity") or {}).get("state")
    if not isinstance(state, dict):
        return []  # Fluidity has not reported (yet): assume nothing
    running = set(state.get("applications") or {})
    described = {app["name"] for app in application_description}
    return sorted(running - described)
