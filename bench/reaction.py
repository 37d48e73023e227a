"""Figure 1 (reaction latency) and figure 4 (footprint), on the five services.

For N managed applications: start a nats-server (JetStream file storage) and the five
services as processes, publish N app descriptions through the monitor, let the analyzer
evaluate every pair once, then send telemetry snapshots one at a time. Each snapshot
carries one ``bench_signal`` sample above the threshold for one application (the
"marker", drawn at random among the N so that its place in the analyzer's sweep is
random too). The policy, evaluated on every snapshot for every application, says yes for
the marker only; the plan goes to the scheduler and the executor calls the recording
mechanism's ``apply``, which writes ``time.time()``. Latency = that time minus the time
just before the snapshot was published. The next snapshot is sent once the services are
idle again, so samples never queue behind each other.

Baseline, measured on the same server in the same run: the latency of one raw JetStream
hop (``js.publish`` to a durable pull consumer fetching as the services do, file
storage) times the four hops of the path (telemetry -> analyzer, verdict -> planner,
plan -> scheduler, exec request -> executor).

Memory (figure 4) is read from the same processes: idle (plugins loaded, no
application) and after the samples with N applications.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.api as api

from bench import plugins
from bench.common import (
    PREFIX,
    SERVICES,
    Fleet,
    NatsServer,
    Workdir,
    connect,
    memory,
    publish_apps,
    quiesce,
    stream_messages,
    summary_ms,
    wait_for,
    wait_loaded,
    wait_scheduler_active,
)
from mlsysops import wire

HOPS = 4
SHIM_ARGV = ["-m", "bench.svc", "analyzer", "--telemetry-shim"]


@dataclass
class ReactionResult:
    apps: int
    latencies: list[float]
    missed: int
    raw_hop: list[float]
    shim: bool
    idle_rss: dict[str, tuple[float, float]] = field(default_factory=dict)
    loaded_rss: dict[str, tuple[float, float]] = field(default_factory=dict)
    settle_s: float = 0.0
    duration_s: float = 0.0
    stages: dict[str, list[float]] = field(default_factory=dict)
    sent_total: int = 0  # samples sent, probe and warm-up included
    applied_total: int = 0  # apply calls recorded
    probe_unanswered: int = 0  # 1 when the unmodified analyzer ignored the probe sample
    applied_twice: int = 0
    stage_samples: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        got = summary_ms(self.latencies)
        hop = summary_ms(self.raw_hop)
        return {
            "apps": self.apps, "samples": got["n"], "missed": self.missed,
            "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"], "mean_ms": got["mean_ms"],
            "max_ms": got["max_ms"],
            "hop_p50_ms": hop["p50_ms"], "hop_p99_ms": hop["p99_ms"],
            "baseline_p50_ms": hop["p50_ms"] * HOPS, "baseline_p99_ms": hop["p99_ms"] * HOPS,
            "shim": self.shim, "settle_s": self.settle_s, "duration_s": self.duration_s,
            "sent_total": self.sent_total, "applied_total": self.applied_total,
            "probe_unanswered": self.probe_unanswered, "applied_twice": self.applied_twice,
            "stages_p50_ms": {k: summary_ms(v)["p50_ms"] for k, v in self.stages.items()},
            "stages_p99_ms": {k: summary_ms(v)["p99_ms"] for k, v in self.stages.items()},
        }


# ------------------------------------------------------------------------- baseline
async def raw_hop(url: str, count: int) -> list[float]:
    """Publish-to-consumer latency of raw JetStream, one message at a time."""
    pub, sub = await connect(url), await connect(url)
    try:
        js, jss = pub.jetstream(), sub.jetstream()
        await js.add_stream(name="BENCH_HOP", subjects=["bench.hop"],
                            storage=api.StorageType.FILE)
        config = api.ConsumerConfig(durable_name="hop", ack_policy=api.AckPolicy.EXPLICIT,
                                    max_ack_pending=1000, deliver_policy=api.DeliverPolicy.NEW)
        psub = await jss.pull_subscribe("bench.hop", durable="hop", stream="BENCH_HOP",
                                        config=config)
        received: asyncio.Queue[float] = asyncio.Queue()
        stop = False

        async def consume() -> None:
            while not stop:
                try:
                    batch = await psub.fetch(64, timeout=2)  # as mlsysops.consumer does
                except asyncio.CancelledError:
                    raise
                except Exception:  # timeout: fetch again
                    await asyncio.sleep(0)
                    continue
                for msg in batch:
                    received.put_nowait(time.perf_counter() - float(msg.data))
                    await msg.ack()

        task = asyncio.ensure_future(consume())
        out = []
        try:
            await asyncio.sleep(0.2)  # the first pull request is waiting
            for _ in range(count):
                await js.publish("bench.hop", repr(time.perf_counter()).encode())
                out.append(await asyncio.wait_for(received.get(), 10))
                await asyncio.sleep(0.002)
        finally:
            stop = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await js.delete_stream("BENCH_HOP")
        return out
    finally:
        await pub.close()
        await sub.close()


# ------------------------------------------------------------------------- the loop
class ApplyLog:
    """Follows the recorder's JSON lines."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._buffer = path, 0, b""
        self.by_seq: dict[str, float] = {}
        self.count = 0
        self.duplicates = 0  # samples applied more than once

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._buffer + data
        *lines, self._buffer = data.split(b"\n")
        for line in lines:
            if line.strip():
                record = json.loads(line)
                self.count += 1
                if str(record["seq"]) in self.by_seq:
                    self.duplicates += 1
                self.by_seq.setdefault(str(record["seq"]), record["t"])


async def _send(js: Any, app: str, seq: int) -> float:
    t0 = time.time()
    snap = wire.Telemetry(id=f"bench-{seq}", source="bench", collected_at=t0, samples=[
        wire.Sample(metric="bench_signal", value=1.0, ts=t0,
                    labels={"app": app, "seq": str(seq), "t0": repr(t0)})])
    await js.publish(f"{PREFIX}.telemetry.bench", wire.encode(snap),
                     headers={"Nats-Msg-Id": snap.id})
    return t0


async def _wait_apply(log: ApplyLog, seq: int, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.poll()
        t = log.by_seq.get(str(seq))
        if t is not None:
            return t
        await asyncio.sleep(0.002)
    return None


async def measure(n_apps: int, *, samples: int, budget: float, hop_count: int,
                  shim: bool | None, warmup: int = 3, keep: bool = False,
                  profile_dir: Path | None = None,
                  progress: Any = print) -> ReactionResult:
    """One reaction run at ``n_apps``; ``shim=None`` probes whether the shim is needed."""
    started = time.monotonic()
    with Workdir(f"reaction-{n_apps}", keep) as work:
        server = NatsServer(work)
        server.start()
        policies, mechanisms = work / "policies", work / "mechanisms"
        policies.mkdir()
        mechanisms.mkdir()
        log_path = work / "applied.jsonl"
        plugins.write_recorder(mechanisms, log_path)
        plugins.write_reaction_policy(policies)
        fleet = Fleet(server, work, policies, mechanisms, profile_dir=profile_dir)
        nc = await connect(server.url)
        try:
            js = nc.jetstream()
            use_shim = bool(shim)
            for svc in SERVICES:
                fleet.start(svc, argv=SHIM_ARGV if svc == "analyzer" and use_shim else None)
            await wait_scheduler_active(js, timeout=60, alive=fleet.check_alive)
            await wait_loaded(js, {"analyzer": ["policy.bench_react"],
                                   "planner": ["policy.bench_react"],
                                   "scheduler": ["mechanism.bench_recorder"],
                                   "executor": ["mechanism.bench_recorder"]},
                              timeout=60, alive=fleet.check_alive)
            pids = [*fleet.pids().values(), server.proc.pid]  # type: ignore[union-attr]
            await asyncio.sleep(1.0)
            await quiesce(pids)
            idle = {name: memory(pid) for name, pid in fleet.pids().items()}

            names = [f"app-{i:04d}" for i in range(n_apps)]
            t = time.monotonic()
            await publish_apps(nc, names)
            try:
                await wait_for(lambda: _contexts(js, n_apps), timeout=120,
                               what=f"{n_apps} context records", every=0.2,
                               alive=fleet.check_alive)
            except TimeoutError as exc:
                have = await stream_messages(js, f"KV_{PREFIX}-context")
                raise TimeoutError(f"{exc} (have {have}); analyzer log:\n"
                                   + fleet.log_tail("analyzer-0")) from None
            settle = time.monotonic() - t
            await quiesce(pids, timeout=120)
            progress(f"  reaction N={n_apps}: {n_apps} apps loaded and evaluated in "
                     f"{settle:.1f} s")
            hops = await raw_hop(server.url, hop_count)

            log = ApplyLog(log_path)
            rng = random.Random(n_apps)
            order: list[str] = []
            latencies: list[float] = []
            missed = 0
            seq = 0
            sent: dict[str, float] = {}
            if shim is None:  # does a telemetry sample reach analyze() at all?
                seq += 1
                app = rng.choice(names)
                t0 = await _send(js, app, seq)
                got = await _wait_apply(log, seq, timeout=8)
                if got is None:
                    use_shim = True
                    progress("  reaction: the analyzer did not react to a telemetry sample "
                             "(interval guard); restarting it with the bench.svc shim")
                    fleet.stop("analyzer-0")
                    fleet.start("analyzer", argv=SHIM_ARGV)
                    await wait_loaded(js, {"analyzer": ["policy.bench_react"]}, timeout=60,
                                      alive=fleet.check_alive)
                    pids = [*fleet.pids().values(), server.proc.pid]  # type: ignore[union-attr]
                    await asyncio.sleep(1.0)
                    await quiesce(pids, timeout=120)
                else:
                    sent[str(seq)] = t0
                    latencies.append(got - t0)
                await quiesce(pids, timeout=120)
            for _ in range(warmup):  # not counted: first calls warm caches and threads
                seq += 1
                await _send(js, rng.choice(names), seq)
                await _wait_apply(log, seq, timeout=30)
                await quiesce(pids, timeout=120)
            fleet.profile(f"reaction{n_apps}")
            deadline = time.monotonic() + budget
            while len(latencies) + missed < samples and time.monotonic() < deadline:
                if not order:
                    order = rng.sample(names, len(names))
                app = order.pop()
                seq += 1
                t0 = await _send(js, app, seq)
                sent[str(seq)] = t0
                got = await _wait_apply(log, seq, timeout=30)
                if got is None:
                    missed += 1
                    fleet.check_alive()
                else:
                    latencies.append(got - t0)
                await quiesce(pids, timeout=120)
            log.poll()
            loaded = {name: memory(pid) for name, pid in fleet.pids().items()}
            stages = await _stages(js, sent, log)
            stage_samples = stages.pop("_samples")
            return ReactionResult(apps=n_apps, latencies=latencies, missed=missed,
                                  raw_hop=hops, shim=use_shim, idle_rss=_by_service(idle),
                                  loaded_rss=_by_service(loaded), settle_s=settle,
                                  duration_s=time.monotonic() - started, stages=stages,
                                  stage_samples=stage_samples,  # type: ignore[arg-type]
                                  sent_total=seq, applied_total=log.count,
                                  probe_unanswered=int(shim is None and use_shim),
                                  applied_twice=log.duplicates)
        finally:
            await nc.close()
            fleet.stop_all()
            server.stop()


async def _contexts(js: Any, n: int) -> bool:
    return await stream_messages(js, "KV_mlsysops-context") >= n


def _by_service(values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {name.rsplit("-", 1)[0]: value for name, value in values.items()}


async def _stream(js: Any, family: str) -> list[Any]:
    stream = f"{PREFIX.upper()}_{family.upper()}"
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            out.append(await js.get_msg(stream, seq))
        except Exception:  # a gap
            continue
    return out


async def _stages(js: Any, sent: dict[str, float], log: ApplyLog) -> dict[str, list[float]]:
    """Where the time of each measured sample went, from the timestamps the services put
    in the messages they publish (verdict, plan and decision) and the recorder's."""
    verdicts = {}
    for raw in await _stream(js, "verdicts"):
        v = wire.VERDICT.decode(raw.data)
        seq = str((v.context.get("trigger") or {}).get("seq"))
        if seq in sent:
            verdicts[v.verdict_id] = (seq, v.created_at)
    plans = {}
    for raw in await _stream(js, "plans"):
        p = wire.PLAN.decode(raw.data)
        if p.verdict_id in verdicts:
            plans[p.plan_id] = (*verdicts[p.verdict_id], p.created_at)
    names = ("telemetry->verdict", "verdict->plan", "plan->decision", "decision->apply")
    stages: dict[str, list[float]] = {name: [] for name in names}
    per_sample: list[dict[str, Any]] = []
    for raw in await _stream(js, "events"):
        if not raw.subject.startswith(f"{PREFIX}.decision."):
            continue
        d = wire.EVENT.decode(raw.data)
        if not isinstance(d, wire.Decision) or d.plan_id not in plans:
            continue
        seq, verdict_at, plan_at = plans[d.plan_id]
        applied = log.by_seq.get(seq)
        if applied is None:
            continue
        values = (verdict_at - sent[seq], plan_at - verdict_at, d.decided_at - plan_at,
                  applied - d.decided_at)
        for name, value in zip(names, values, strict=True):
            stages[name].append(value)
        per_sample.append({"seq": int(seq), "app": d.app, "sent": sent[seq],
                           **{name: round(v * 1000, 3) for name, v in zip(names, values,
                                                                          strict=True)}})
    stages["_samples"] = per_sample  # type: ignore[assignment]
    return stages
