"""The loop on a three-node JetStream cluster (replicas 3) while its nodes die.

Three nats-server processes on loopback (``tests/faults/cluster.py``); the five services
as real processes connected with all three URLs, every stream and bucket with 3
replicas. Under the steady load of the other fault tests: kill -9 the meta leader, then
restart it; kill -9 the leader of ``MLSYSOPS_PLANS``, then restart it; then a rolling
restart of all three nodes (SIGTERM, one at a time, waiting for the cluster to be
healthy in between). After each fault every application must be applied again, by
itself. After draining, the checks of the other fault tests: every acked plan applied
exactly once, nothing twice, every plan decided, first plan per conflict key wins, no
service exited, and no error event (what a user sees on ``mlsysops.error.>``) for what
was only a leader election.

The smaller tests at the end check the retries of ``mlsysops/bus.py`` one by one on a
single server: a write whose reply was lost (stored all the same), and "no responders"
while no one leads a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from mlsysops import bus as bus_mod
from mlsysops import layout, subjects, wire
from mlsysops import settings as settings_mod
from mlsysops.bus import Bus
from mlsysops.lease import Lease
from tests import loopkit as kit
from tests.faults import harness as h
from tests.faults.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

APPS = {f"app-{i}" for i in range(4)}
DOWN = 2.0  # seconds a node stays down before its restart
FIRST_APPLY_WITHIN = 30.0  # generous: an election, a 10-s JetStream request, a lease TTL
EVERY_APP_WITHIN = 45.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path / "nats")
    try:
        await c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def cfg(cluster: Cluster, plugin_dirs: tuple[Path, Path]) -> settings_mod.Settings:
    """The services' settings: every node's URL, and 3 replicas of everything."""
    return settings_mod.load(env={
        "MLSYSOPS_NATS_URL": cluster.url,
        "MLSYSOPS_STREAM_REPLICAS": "3",
        "MLSYSOPS_POLICY_DIR": str(plugin_dirs[0]),
        "MLSYSOPS_MECHANISM_DIR": str(plugin_dirs[1]),
        "MLSYSOPS_HTTP_PORT": "0",
        "MLSYSOPS_CALL_TIMEOUT": "3",
        "MLSYSOPS_STATUS_INTERVAL": "0.5",
        "MLSYSOPS_EXEC_TIMEOUT": "30",
    })


async def _replicas(cluster: Cluster, cfg: settings_mod.Settings) -> dict[str, tuple[int, int]]:
    """Per stream and bucket of the layout: (configured replicas, peers in its group)."""
    names = [s.name or "" for s in layout.streams(cfg)]
    names += [f"KV_{b.bucket}" for _, b in layout.buckets(cfg)]
    out = {}
    for name in names:
        info = await cluster.stream_info(name)
        peers = 1 + len(info.cluster.replicas or []) if info.cluster else 0
        out[name] = (info.config.num_replicas, peers)
    return out


async def _led_by(cluster: Cluster, node: str, cfg: settings_mod.Settings) -> list[str]:
    """The layout's streams and buckets whose leader is ``node`` (for the report)."""
    names = [s.name or "" for s in layout.streams(cfg)]
    names += [f"KV_{b.bucket}" for _, b in layout.buckets(cfg)]
    return [n for n in names if await cluster.stream_leader(n) == node]


async def test_loop_survives_nats_node_failures(cluster, cfg, process_loop,
                                                plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    process_loop.cfg = h.fast(cfg)
    rec = h.recorder(mechanisms)
    policy = h.steady_policy(policies)
    process_loop.start()
    first = cluster.urls[0]
    assert (await kit.publish_desc(first, "cluster", "c1", kit.cluster_doc()))["accepted"]
    for app in sorted(APPS):
        assert (await kit.publish_desc(first, "app", app, kit.app_doc(app)))["accepted"]
    await h.wait_apps(rec, APPS, 0, timeout=60)

    # every stream and bucket of the layout really is replicated on all three nodes
    replicas = await _replicas(cluster, cfg)
    assert all(r == (3, 3) for r in replicas.values()), replicas

    load = h.Load(cluster.url, new_apps=4, app_every=4.0)
    await load.start()
    figures: dict[str, Any] = {}
    try:
        await asyncio.sleep(3)
        meta = cluster.meta_leader()
        assert meta is not None
        figures["kill -9 the meta leader"] = await _fault(
            cluster, cfg, rec, load, meta, kill=True)
        plans = await cluster.stream_leader("MLSYSOPS_PLANS")
        assert plans is not None
        figures["kill -9 the MLSYSOPS_PLANS leader"] = await _fault(
            cluster, cfg, rec, load, plans, kill=True)
        for node in cluster.nodes:
            figures[f"rolling restart: {node.name}"] = await _fault(
                cluster, cfg, rec, load, node.name, kill=False)
        h.assert_alive(process_loop)
    finally:
        await load.stop()

    summary = await _finish(cluster, process_loop, rec, policy, load)
    h.report("a three-node NATS cluster, replicas 3: nodes killed and restarted",
             {**figures, "run": summary})


async def _fault(cluster: Cluster, cfg: settings_mod.Settings, rec: h.Recorder,
                 load: h.Load, name: str, *, kill: bool) -> dict[str, Any]:
    """Kill (SIGKILL) or stop (SIGTERM) node ``name``, restart it after ``DOWN`` s, wait
    until the cluster is healthy, and measure how the loop came back."""
    apps = APPS | set(load.accepted)
    row: dict[str, Any] = {"node": name, "it led": await _led_by(cluster, name, cfg)}
    at = time.time()
    if kill:
        cluster.kill(name)
    else:
        cluster.node(name).stop()
    await asyncio.sleep(DOWN)
    cluster.restart(name)
    row["cluster healthy after restart (s)"] = round(await cluster.wait_healthy(60), 2)
    first = await kit.wait_for(lambda: rec.first_after(at), timeout=FIRST_APPLY_WITHIN,
                               what=f"an apply after {name} went down")
    await h.wait_apps(rec, apps, at, timeout=EVERY_APP_WITHIN)
    after = rec.apps_after(at)
    row["first apply after the fault (s)"] = round(first, 2)
    row["every application applied again after (s)"] = round(
        max(v for a, v in after.items() if a in apps), 2)
    row["longest gap between applies (s)"] = round(_longest_gap(rec, at), 2)
    h.report(f"{'kill -9' if kill else 'SIGTERM'} {name}", row)
    await asyncio.sleep(1.0)
    return row


def _longest_gap(rec: h.Recorder, since: float) -> float:
    times = sorted(r["t"] for r in rec.lines() if r["t"] >= since)
    return max((b - a for a, b in zip([since, *times], times, strict=False)), default=0.0)


async def _finish(cluster: Cluster, process_loop: Any, rec: h.Recorder, policy: Path,
                  load: h.Load) -> dict[str, Any]:
    h.assert_alive(process_loop)
    accepted = dict(load.accepted)
    await kit.wait_for(lambda: all(any(r["command"]["app"] == app and r["t"] > at
                                       for r in rec.lines()) for app, at in accepted.items()),
                       timeout=20, what="a plan for every accepted description")
    nc = await cluster.client()
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        stored = {k.partition(".")[2] for k in await kv.keys() if k.startswith("app.")}
    finally:
        await nc.close()
    assert set(accepted) | APPS <= stored, (sorted(accepted), sorted(stored))
    draining = time.time()  # from here the removed policy's verdicts are dropped, reported
    trace = await h.drain(cluster.url, rec, [policy])
    problems, summary = h.exactly_once(trace, rec)
    assert not problems, "\n".join(problems[:20]) + "\n" + process_loop.logs()
    order = h.decided_in_stream_order(trace)
    assert not [p for p in order if "never decided" in p], order
    clash = h.conflicts(trace, rec, process_loop.cfg.exec_timeout)
    assert not clash, "\n".join(clash[:20])
    summary["decided out of stream order"] = len(order)
    if order:
        summary["first out of order"] = order[0]
    # a leader election is not something a user should hear about
    errors = [e for e in (await h.read_trace(cluster.url, errors=True)).errors
              if e["at"] < draining]
    assert not errors, "error events:\n" + "\n".join(
        f"{e['subject']}: {e.get('message')}" for e in errors[:20])
    summary.update(descriptions_accepted=len(accepted),
                   description_attempts_unanswered=len(load.refused),
                   telemetry_sent=load.telemetry_sent, telemetry_failed=load.telemetry_failed)
    assert any(r["command"].get("load") for r in rec.lines())
    return summary


# ------------------------------------------------------------------ the retries, one by one
# What a NATS leader election does to one request, on a single server: a reply lost
# (the write was stored, the client timed out), or "no responders" while no one leads.

@pytest.fixture
async def bus(nats_server: Any, plugin_dirs: tuple[Path, Path]) -> AsyncIterator[Bus]:
    settings = settings_mod.load(env={"MLSYSOPS_NATS_URL": nats_server.url,
                                      "MLSYSOPS_POLICY_DIR": str(plugin_dirs[0]),
                                      "MLSYSOPS_MECHANISM_DIR": str(plugin_dirs[1])})
    b = Bus(settings, "executor")
    await b.connect()
    yield b
    await b.close()


def _reply_lost_once(target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``target.name`` do its work, then time out, the first time it is called."""
    real, calls = getattr(target, name), []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        result = await real(*args, **kwargs)
        if len(calls) == 1:
            raise nats.errors.TimeoutError  # stored, but the reply never came
        return result

    monkeypatch.setattr(target, name, flaky)
    return calls


async def test_an_apply_whose_ledger_entry_reply_was_lost_still_runs(bus, monkeypatch) -> None:
    """The executor creates the ledger entry before ``apply``: had the retry of a create
    whose reply was lost been a conflict, the executor would take its own entry for an
    earlier attempt and report the execution "interrupted" without applying it."""
    ledger = bus.kv(subjects.BUCKET_LEDGER)
    _reply_lost_once(ledger.raw, "_update", monkeypatch)
    revision = await ledger.create("p-1.rec", b'{"state": "started"}')
    entry = await ledger.get("p-1.rec")
    assert (entry.revision, entry.value) == (revision, b'{"state": "started"}')
    # and the next compare-and-set write, whose reply is lost too, is not a conflict
    calls = _reply_lost_once(ledger.raw, "update", monkeypatch)
    assert await ledger.update("p-1.rec", b'{"state": "applied"}', last=revision) > revision
    assert calls == ["update", "update"]
    assert (await ledger.get("p-1.rec")).value == b'{"state": "applied"}'


async def test_a_real_conflict_stays_a_conflict_after_a_retry(bus, monkeypatch) -> None:
    kv = bus.kv(subjects.BUCKET_SCHED)
    first = await kv.create("claim.rec.k", b"plan-1")
    await kv.update("claim.rec.k", b"plan-2", last=first)  # another scheduler's claim
    real, calls = kv.raw.update, []

    async def unavailable_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise nats.js.errors.ServiceUnavailableError
        return await real(*args, **kwargs)

    monkeypatch.setattr(kv.raw, "update", unavailable_once)
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.update("claim.rec.k", b"plan-3", last=first)
    assert len(calls) == 2
    assert (await kv.get("claim.rec.k")).value == b"plan-2"


async def test_a_lease_renewal_whose_reply_was_lost_keeps_the_lease(bus, monkeypatch) -> None:
    """A renewal is a compare-and-set publish with a TTL (``put_with_ttl``)."""
    taken = await bus.put_with_ttl(subjects.BUCKET_LEASES, "leader.x", b"me", 5, last=0)
    _reply_lost_once(bus.js, "publish", monkeypatch)
    renewed = await bus.put_with_ttl(subjects.BUCKET_LEASES, "leader.x", b"me", 5, last=taken)
    assert renewed > taken
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):  # not ours any more
        await bus.put_with_ttl(subjects.BUCKET_LEASES, "leader.x", b"other", 5, last=taken)


async def test_a_scheduler_whose_renewal_failed_is_active_again_at_once(bus) -> None:
    """A renewal that failed (JetStream electing for longer than the renewal may retry)
    stops the holder's work; its key is still its own, so it takes it back at once
    instead of waiting out its own TTL (5 s without decisions on every election)."""
    mine = Lease(bus, "leader.t", ttl=5)
    first = await mine._take()
    assert await mine._take() > first  # renewal lost: taken back over our own key
    other = Lease(bus, "leader.t", ttl=5)
    other._value = wire.encode({"instance": "another replica"})
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await other._take()


async def test_a_publish_while_no_one_leads_the_stream_is_stored_once(bus, monkeypatch) -> None:
    """No responders (503) twice, then a lost reply: the message is stored once, and
    nothing is reported; only after ``RETRY_FOR`` s does the publish fail."""
    real, calls = bus.js.publish, []

    async def electing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise nats.js.errors.NoStreamResponseError
        ack = await real(*args, **kwargs)
        if len(calls) == 3:
            raise nats.errors.TimeoutError
        return ack

    monkeypatch.setattr(bus.js, "publish", electing)
    event = wire.ErrorEvent(kind="service", name="x", message="m", at=wire.now())
    ack = await bus.publish(bus.subjects.error("service", "x"), event)
    assert len(calls) == 4 and ack.duplicate
    assert await kit.stored(bus.js, "EVENTS", "mlsysops.error.service.x") == 1
    monkeypatch.setattr(bus_mod, "RETRY_FOR", 0.5)

    async def never(*args: Any, **kwargs: Any) -> Any:
        raise nats.js.errors.NoStreamResponseError

    monkeypatch.setattr(bus.js, "publish", never)
    with pytest.raises(bus_mod.Unavailable):
        await bus.publish(bus.subjects.error("service", "x"), event)
