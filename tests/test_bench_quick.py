"""The benchmark harness at small sizes: every figure is produced and behaves.

Performance is a benchmark, never a timed test: nothing here asserts a duration or a
rate beyond "positive". What is asserted is behaviour the figures rely on: each sample
reaches ``apply`` exactly once through the five services, the scheduler keeps the order
and applies the conflict rule, each (policy, app) pair is evaluated by exactly one
analyzer replica once per interval, and every table is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.requirements import missing

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    try:
        from mlsysops.local import nats_server_binary

        nats_server_binary()
    except Exception as exc:  # reported as a missing requirement
        missing(str(exc))
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSYSOPS_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out / "results.json"),
         "--out", str(out / "benchmarks.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    results["_markdown"] = (out / "benchmarks.md").read_text()
    results["_log"] = proc.stderr
    return results


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(300)
def test_reaction_every_sample_applied_once(quick: dict) -> None:
    rows = quick["reaction"]["rows"]
    assert [r["apps"] for r in rows] == [5, 20]
    for r in rows:
        assert r["missed"] == 0, r
        assert r["samples"] == 6, r
        assert r["applied_twice"] == 0, r
        # every sample sent reached apply once (but a probe the unmodified analyzer ignored)
        assert r["sent_total"] - r["probe_unanswered"] <= r["applied_total"] <= r["sent_total"]
        for key in ("p50_ms", "p99_ms", "hop_p50_ms", "hop_p99_ms", "baseline_p50_ms"):
            assert _finite(r[key]), (key, r)
        assert r["p50_ms"] <= r["p99_ms"]
        assert set(r["stages_p50_ms"]) == {"telemetry->verdict", "verdict->plan",
                                           "plan->decision", "decision->apply"}
        assert all(_finite(v) for v in r["stages_p50_ms"].values()), r
    assert len(quick["reaction"]["latencies_ms"]["20"]) == 6


@pytest.mark.timeout(300)
def test_footprint_of_every_service(quick: dict) -> None:
    services = quick["footprint"]["services"]
    assert set(services) == {"monitor", "analyzer", "planner", "scheduler", "executor"}
    for name, s in services.items():
        for key in ("idle_rss", "loaded_rss", "loaded_peak"):
            assert _finite(s[key]), (name, key, s)
        assert s["loaded_peak"] >= s["loaded_rss"] * 0.99


@pytest.mark.timeout(300)
def test_scheduler_keeps_order_and_applies_the_rule(quick: dict) -> None:
    mixes = {s["mix"]: s for s in quick["scheduler"]}
    assert set(mixes) == {"distinct", "conflict"}
    for s in mixes.values():
        assert s["in_order"], s
        assert s["rule_applied"], s
        assert s["decisions"] == s["plans"], s
        for key in ("rate", "raw_ack_rate", "raw_ack_sync_rate", "ratio"):
            assert _finite(s[key]), (key, s)


@pytest.mark.timeout(300)
def test_each_pair_evaluated_by_exactly_one_replica_per_interval(quick: dict) -> None:
    scale = quick["scaleout"]
    assert _finite(scale["one_replica_rate"]) and _finite(scale["two_replica_rate"])
    assert len(scale["per_replica"]) == 2 and min(scale["per_replica"]) > 0, scale
    for check in (scale["saturated_check"], scale["below_capacity_check"]):
        assert check["pairs"] == scale["apps"], check
        assert check["pairs_on_two_replicas"] == 0, check
        assert check["pairs_evaluated_twice_within_interval"] == 0, check
    below = scale["below_capacity_check"]
    assert below["pairs_missing_an_interval"] == 0, below
    assert below["calls_per_pair_min"] >= below["intervals"] - 1, below
    assert below["calls_per_pair_max"] <= below["intervals"] + 1, below
    assert scale["exactly_once"] is True


@pytest.mark.timeout(300)
def test_policy_arguments_at_fleet_size(quick: dict) -> None:
    rows = {r["apps"]: r for r in quick["state"]}
    assert set(rows) == {100, 1_000}
    for r in rows.values():
        assert r["under_limit"] and r["largest_piece"] < 1024
        assert _finite(r["new_ms"]) and _finite(r["old_ms"])
    # the whole status grows with the fleet; no stored message does
    assert rows[1_000]["whole_bytes"] > 5 * rows[100]["whole_bytes"]
    assert rows[1_000]["largest_piece"] < rows[100]["largest_piece"] + 16


def test_storage_per_plan_is_measured_against_the_raw_plan_messages(quick: dict) -> None:
    r = quick["storage"]
    assert r["plans"] >= 100 and r["raw_per_plan"] > 0
    assert r["per_plan"] > r["raw_per_plan"]  # a plan leaves more than itself behind
    assert r["bytes"]["MLSYSOPS_PLANS"] > 0 and r["bytes"]["KV_mlsysops-ledger"] > 0


def test_codec_and_report(quick: dict) -> None:
    codec = {c["type"]: c for c in quick["codec"]}
    assert {"Telemetry (10 samples)", "Verdict", "Plan", "Decision (Event)", "ExecRequest",
            "ExecResult (Event)", "ContextRecord (with outbox)"} <= set(codec)
    assert all(_finite(c["ns"]) and _finite(c["stdlib_ns"]) for c in codec.values())
    assert _finite(quick["codec_hop_us"])
    assert quick["machine"]["cores"] and quick["versions"]["nats-server"] != "?"
    figures = {t["figure"] for t in quick["targets"]}
    assert figures == {"1. reaction latency", "2. scheduler throughput",
                       "3. analyzer scale-out", "4. footprint", "6. policy arguments"}
    md = quick["_markdown"]
    for heading in ("### 1. Reaction latency", "### 2. Scheduler throughput",
                    "### 3. Analyzer scale-out", "### 4. Footprint", "### 5. Codec",
                    "### 6. Policy arguments", "### 7. JetStream storage", "### Targets"):
        assert heading in md, heading
