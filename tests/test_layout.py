"""One owner of the state layout: `mlsysops init` creates and changes it, nothing else does.

Driven from the outside, as an operator would: the documented commands (`mlsysops init`,
`mlsysops status`) against a real nats-server, and what the server then holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from mlsysops import settings as settings_mod
from mlsysops.bus import Bus

ROOT = Path(__file__).resolve().parent.parent


def _cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLSYSOPS_")}
    return subprocess.run([sys.executable, "-m", "mlsysops.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd=str(ROOT),
                          env={**clean, "MLSYSOPS_NATS_URL": url, "PYTHONPATH": str(ROOT), **env})


async def _streams(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        return {s.config.name: s.config for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def test_status_against_a_fresh_server_creates_nothing(nats_server) -> None:
    out = await asyncio.to_thread(_cli, nats_server.url, "status")
    assert out.returncode == 2
    assert "no control plane found under prefix 'mlsysops'" in out.stderr
    assert await _streams(nats_server.url) == {}


async def test_a_wrong_prefix_says_no_control_plane_instead_of_an_empty_one(nats_server) -> None:
    assert (await asyncio.to_thread(_cli, nats_server.url, "init")).returncode == 0
    out = await asyncio.to_thread(_cli, nats_server.url, "status", "--prefix", "other")
    assert out.returncode == 2 and "no control plane found under prefix 'other'" in out.stderr
    out = await asyncio.to_thread(_cli, nats_server.url, "plans", "--prefix", "other")
    assert out.returncode == 2 and "prefix 'other'" in out.stderr
    assert not [n for n in await _streams(nats_server.url) if "OTHER" in n or "other" in n]


async def test_init_creates_every_stream_and_bucket_bounded(nats_server) -> None:
    out = await asyncio.to_thread(_cli, nats_server.url, "init")
    assert out.returncode == 0, out.stderr
    streams = await _streams(nats_server.url)
    assert len(streams) == 12  # 6 streams, 6 buckets
    assert out.stdout.count(": created") == 12
    per_plan = {"KV_mlsysops-sched", "KV_mlsysops-ledger"}  # bounded by age, not size
    for name, config in streams.items():
        assert config.num_replicas == 1, name
        if name not in per_plan:
            assert (config.max_bytes or 0) > 0, name  # a size limit
        if not name.startswith("KV_"):
            assert (config.max_age or 0) > 0, name  # loop streams also expire by age
    assert streams["KV_mlsysops-ledger"].max_age == 7 * 86400  # per-plan records expire
    again = await asyncio.to_thread(_cli, nats_server.url, "init")
    assert again.returncode == 0 and "as the settings say" in again.stdout


async def test_services_never_change_the_layout_and_init_reports_what_it_changes(
        nats_server, cfg) -> None:
    assert (await asyncio.to_thread(_cli, nats_server.url, "init")).returncode == 0
    shorter = settings_mod.Settings(**{**cfg.__dict__, "stream_max_age": 3600.0})
    bus = Bus(shorter, "analyzer")  # a service started with other settings
    await bus.connect()
    await bus.close()
    assert {c.name for c in bus.changes if c.action == "differs"} >= {"MLSYSOPS_PLANS"}
    assert (await _streams(nats_server.url))["MLSYSOPS_PLANS"].max_age == 7 * 86400
    out = await asyncio.to_thread(_cli, nats_server.url, "init", "--stream-max-age", "1h")
    assert out.returncode == 0, out.stderr
    assert "MLSYSOPS_PLANS: updated (max_age 604800.0 -> 3600.0)" in out.stdout
    assert (await _streams(nats_server.url))["MLSYSOPS_PLANS"].max_age == 3600
    as_json = await asyncio.to_thread(_cli, nats_server.url, "init", "--stream-max-age", "1h",
                                      "--json")
    assert json.loads(as_json.stdout) == []  # nothing left to change


@pytest.mark.parametrize("storage", ["memory"])
async def test_init_says_what_it_cannot_change(nats_server, storage: str) -> None:
    assert (await asyncio.to_thread(_cli, nats_server.url, "init")).returncode == 0
    out = await asyncio.to_thread(_cli, nats_server.url, "init", "--storage", storage)
    assert out.returncode == 1
    assert "MLSYSOPS_PLANS: cannot change (storage" in out.stdout


async def test_a_layout_the_server_has_no_room_for_is_refused_with_the_reason(
        nats_server) -> None:
    out = await asyncio.to_thread(_cli, nats_server.url, "init", "--stream-max-bytes",
                                  str(1 << 60))  # far more than any store reserves
    assert out.returncode == 2, out.stdout + out.stderr
    assert "JetStream refused the layout" in out.stderr and "Traceback" not in out.stderr
