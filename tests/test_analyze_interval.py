"""A policy changes its own analysis interval at run time, as upstream policies do.

Upstream re-reads ``context["configuration"]["analyze_interval"]`` on every pass, and
policies slow down or speed up by editing it (fast while watching, slow while a change
takes effect). The analyzer follows the live context, not only what ``initialize()`` said.
"""

from __future__ import annotations

import json
from typing import Any

import nats
import pytest

from tests import loopkit as kit

# Starts slow (one minute); the first analysis asks for 300 ms from then on.
SPEEDS_UP = '''
def initialize():
    return {"configuration": {"analyze_interval": "60s"}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    context["configuration"]["analyze_interval"] = "300ms"
    context["passes"] = context.get("passes", 0) + 1
    return False, context

def plan(context, *args):
    return {}, context
'''


async def _passes(url: str) -> int:
    nc = await nats.connect(url)
    try:
        try:
            kv = await nc.jetstream().key_value("mlsysops-context")
            entry = await kv.get("speedy.shop")
        except Exception:
            return 0
        context: dict[str, Any] = json.loads(entry.value or b"{}")["context"]
        return int(context.get("passes", 0))
    finally:
        await nc.close()


@pytest.mark.slow
async def test_an_interval_changed_by_analyze_takes_effect(loop_, cfg, plugin_dirs) -> None:
    (plugin_dirs[0] / "policy-speedy.py").write_text(SPEEDS_UP)
    loop_.start("monitor", "analyzer")
    assert (await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop")))["accepted"]
    # with the initial interval a second pass would come after a minute
    await kit.wait_for(lambda: _passes_at_least(cfg.nats_url, 5), timeout=20,
                       what="five passes at the interval analyze asked for")


async def _passes_at_least(url: str, n: int) -> bool:
    return await _passes(url) >= n


# Keeps whatever interval its context holds (as most policies do: they return the context
# they were given); the file is edited from a slow interval to a fast one.
KEEPS = '''
def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}}}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    context["passes"] = context.get("passes", 0) + 1
    return False, context

def plan(context, *args):
    return {{}}, context
'''


@pytest.mark.slow
async def test_an_interval_edited_in_the_policy_file_applies_to_existing_contexts(
        loop_, cfg, plugin_dirs) -> None:
    path = plugin_dirs[0] / "policy-speedy.py"
    path.write_text(KEEPS.format(interval="60s"))
    loop_.start("monitor", "analyzer")
    assert (await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop")))["accepted"]
    await kit.wait_for(lambda: _passes_at_least(cfg.nats_url, 1), timeout=20, what="a pass")
    path.write_text(KEEPS.format(interval="300ms"))  # the stored context still says 60s
    await kit.wait_for(lambda: _passes_at_least(cfg.nats_url, 5), timeout=20,
                       what="passes at the interval the edited file sets")
