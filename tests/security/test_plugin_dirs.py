"""Plugins load only from the configured directories; a path outside them is refused.

The running services (not only the loader) are checked: a symlink in the policy or
mechanism directory that resolves outside it, a file in a subdirectory, and names that
look like paths in a trigger or a plan never make a service import code from elsewhere.
The import itself would leave a marker file, so "refused" means "never executed".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
import pytest

from tests import loopkit as kit

pytestmark = pytest.mark.slow

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

def initialize():
    return {{"configuration": {{"analyze_interval": "200ms"}}}}

def analyze(context, *args):
    return True, context

def plan(context, *args):
    return {{"recorder": {{"evil": True}}}}, context

def apply(command):
    Path({marker!r}).write_text("applied")
'''


async def _plugin_status(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        out = {}
        for key in await kv.keys():
            if key.startswith("plugin."):
                out[key] = json.loads((await kv.get(key)).value or b"{}")
        return out
    finally:
        await nc.close()


async def test_plugins_outside_the_configured_directories_are_never_loaded(
        loop_, cfg, plugin_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    policies, mechanisms = plugin_dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "marker"
    (outside / "policy-evil.py").write_text(EVIL.format(marker=str(marker)))
    (outside / "evilmech.py").write_text(EVIL.format(marker=str(marker)))
    (policies / "policy-evil.py").symlink_to(outside / "policy-evil.py")
    (policies / "policy-dots.py").symlink_to(Path("..") / "outside" / "policy-evil.py")
    (mechanisms / "evilmech.py").symlink_to(outside / "evilmech.py")
    (policies / "sub").mkdir()
    (policies / "sub" / "policy-nested.py").write_text(EVIL.format(marker=str(marker)))
    (policies / "sub.py").symlink_to(policies / "sub")  # a directory, not a file
    applied = kit.recorder(mechanisms)
    kit.once_policy(policies)
    loop_.start()
    url = cfg.nats_url
    assert (await kit.publish_desc(url, "app", "shop", kit.app_doc("shop")))["accepted"]
    await kit.wait_for(lambda: kit.applied(applied), what="the legitimate policy's apply")
    status = await kit.wait_for(lambda: _loaded_everywhere(url), what="plugin status")
    names = {(s["kind"], s["name"]) for s in status.values()}
    assert ("policy", "once") in names and ("mechanism", "recorder") in names
    assert not {n for _, n in names} & {"evil", "dots", "nested", "sub", "evilmech"}, names
    # names that look like paths reach no loader either (a token cannot hold "." or "..")
    nc = await nats.connect(url)
    try:
        for subject in ("mlsysops.trigger.evil.shop", "mlsysops.trigger.~evil.shop",
                        "mlsysops.trigger./tmp/evil.shop", "mlsysops.trigger.%2E%2E%2Fevil.shop"):
            reply = json.loads((await nc.request(subject, b"{}", timeout=5)).data)
            assert reply["accepted"] is False and "not loaded" in reply["error"], reply
    finally:
        await nc.close()
    assert not marker.exists(), marker.read_text()
    assert [r["command"]["app"] for r in kit.applied(applied)] == ["shop"]


async def _loaded_everywhere(url: str) -> dict[str, Any] | None:
    status = await _plugin_status(url)
    services = {(s["service"], s["kind"]) for s in status.values()}
    want = {("analyzer", "policy"), ("planner", "policy"), ("scheduler", "mechanism"),
            ("executor", "mechanism")}
    return status if want <= services else None
