"""Cleanup: remove what Fluidity still runs for applications whose description is gone.

A global policy (``scope: "global"``): it receives every application description at
once. Deleting a description removes nothing by itself; this policy notices the
difference between what Fluidity reports it runs and what is described, and plans the
removal explicitly, so that it is recorded, scheduled and executed like any other plan.

An application must stay undescribed for ``grace_period`` (5 s) before it is removed.
The grace is there for two things that are quick: a description being replaced (deleted
and published again, say by a script), and an analyzer replica that has not read the
newest descriptions yet (its KV watch lags the others by milliseconds) seeing an
application Fluidity already runs. Neither needs a minute; a removal is prompt: about
the grace plus one analysis interval (1 s) after the deletion.

A plan holds one command per mechanism, so each plan removes one application; the next
analysis (a second later) finds the next one. Fluidity's reported state lags by up to
the executor's status interval, so an application whose removal was planned is not
planned again for ``retry_after`` (30 s), and is planned again after that if Fluidity
still reports it (the removal failed).
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
        "configuration": {"analyze_interval": "1s"},
        "grace_period": "5s",
        "retry_after": "30s",
        "missing_since": {},  # application -> when it was first seen undescribed
        "requested": {},  # application -> when its removal was planned
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
    grace = parse_interval(context.get("grace_period", "5s"))
    retry = parse_interval(context.get("retry_after", "30s"))
    # Forget planned removals of applications gone from Fluidity's report, or long ago.
    requested = {app: at for app, at in (context.get("requested") or {}).items()
                 if app in since and now - at < retry}
    context["missing_since"] = since
    context["requested"] = requested
    context["orphans"] = sorted(app for app, first in since.items()
                                if now - first >= grace and app not in requested)
    return bool(context["orphans"]), context


def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    # Look again: an application described again meanwhile is not removed.
    still = set(_undescribed(application_description, mechanisms))
    orphans = [app for app in context.get("orphans", []) if app in still]
    if not orphans:
        return {}, context
    logger.info("removing an application without description", app=orphans[0])
    context.setdefault("requested", {})[orphans[0]] = time.time()
    return {"fluidity": {"name": orphans[0], "remove_app": True}}, context


def _undescribed(application_description, mechanisms):
    """Applications Fluidity runs that have no description, sorted."""
    state = (mechanisms.get("fluidity") or {}).get("state")
    if not isinstance(state, dict):
        return []  # Fluidity has not reported (yet): assume nothing
    running = set(state.get("applications") or {})
    described = {app["name"] for app in application_description}
    return sorted(running - described)
