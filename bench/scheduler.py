"""Figure 2: plans per second through the scheduler, strictly in order, conflict rule on.

The plans stream is filled first with M plans (``plan.<app>.<policy>``, one command for
the recording mechanism each). Then, on the same stream:

- baseline: a raw nats-py durable pull consumer with the scheduler's consumer settings
  (explicit ack, ``max_ack_pending=64``, ``fetch(64)``) reads the M messages in order and
  acks each one (``ack()``; ``ack_sync()``, which the scheduler uses, is also measured);
- the scheduler (``python -m services.scheduler``, alone) consumes them and publishes one
  decision per plan; the rate is taken between the first and the last decision seen on
  ``decision.>``.

Two mixes: ``distinct`` (every plan names its own conflict key, so every plan claims the
key and is scheduled: the full path) and ``conflict`` (every plan names the same key:
the first is scheduled, every later one is discarded naming the holder).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.js.api as api

from bench import plugins
from bench.common import PREFIX, Fleet, NatsServer, Workdir, connect, cpu_seconds, wait_for
from mlsysops import settings as settings_mod
from mlsysops import subjects, wire
from mlsysops.bus import Bus

PLANS_STREAM = f"{PREFIX.upper()}_PLANS"


async def _fill(js: Any, count: int, mix: str) -> None:
    now = wire.now()

    async def one(i: int) -> None:
        app = f"app-{i:05d}"
        key = app if mix == "distinct" else "shared"
        plan = wire.Plan(plan_id=f"p-bench-{i:06d}", app=app, policy="bench",
                         created_at=now, commands={"bench_recorder": {"key": key, "seq": i}},
                         verdict_id=f"v-bench-{i:06d}")
        await js.publish(f"{PREFIX}.plan.{app}.bench", wire.encode(plan),
                         headers={"Nats-Msg-Id": plan.plan_id})

    # in order: publish acks come back in order on one connection, so batches keep it
    for start in range(0, count, 256):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 256))))


async def _describe(bus: Bus, count: int) -> None:
    """Store a description for every application (the scheduler discards plans of
    applications that have none), as the monitor would have stored them."""
    kv = bus.kv(subjects.BUCKET_DESC)
    for start in range(0, count, 256):
        await asyncio.gather(*(kv.put(f"app.app-{i:05d}", wire.encode(wire.StoredDescription(
            kind="app", name=f"app-{i:05d}", spec={}, accepted_at=wire.now())))
            for i in range(start, min(count, start + 256))))


async def raw_consume(js: Any, count: int, durable: str, *, sync: bool) -> float:
    """Messages per second of an in-order pull consumer acking each message."""
    config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                ack_wait=5.0, max_ack_pending=64,
                                deliver_policy=api.DeliverPolicy.ALL)
    sub = await js.pull_subscribe("", durable=durable, stream=PLANS_STREAM, config=config)
    got = 0
    first = last = 0.0
    previous = ""
    while got < count:
        try:
            batch = await sub.fetch(64, timeout=2)
        except asyncio.CancelledError:
            raise
        except Exception:  # timeout: fetch again
            continue
        for msg in batch:
            if got == 0:
                first = time.perf_counter()
            if msg.subject < previous and len(msg.subject) == len(previous):
                raise AssertionError("raw consumer saw plans out of order")
            previous = msg.subject
            if sync:
                await msg.ack_sync()
            else:
                await msg.ack()
            got += 1
            last = time.perf_counter()
    await sub.unsubscribe()
    return (count - 1) / (last - first)


async def measure(count: int, mix: str, *, keep: bool = False,
                  profile_dir: Path | None = None, progress: Any = print) -> dict[str, Any]:
    with Workdir(f"scheduler-{mix}", keep) as work:
        server = NatsServer(work)
        server.start()
        policies, mechanisms = work / "policies", work / "mechanisms"
        policies.mkdir()
        mechanisms.mkdir()
        plugins.write_recorder(mechanisms, work / "applied.jsonl")
        fleet = Fleet(server, work, policies, mechanisms, profile_dir=profile_dir)
        nc = await connect(server.url)
        try:
            cfg = settings_mod.load(env={"MLSYSOPS_NATS_URL": server.url,
                                         "MLSYSOPS_STORAGE": "file"})
            bus = Bus(cfg, "bench")
            await bus.connect()  # creates the streams and buckets as the services do
            await _describe(bus, count)
            await bus.close()
            js = nc.jetstream()
            await _fill(js, count, mix)
            raw_ack = await raw_consume(js, count, "bench_raw", sync=False)
            raw_sync = await raw_consume(js, count, "bench_raw_sync", sync=True)

            decisions: list[tuple[float, str, str]] = []

            async def on_decision(msg: Any) -> None:
                d = wire.EVENT.decode(msg.data)
                if isinstance(d, wire.Decision):
                    decisions.append((time.perf_counter(), d.plan_id, d.outcome))

            await nc.subscribe(f"{PREFIX}.decision.>", cb=on_decision)
            proc = fleet.start("scheduler")
            server_pid = server.proc.pid  # type: ignore[union-attr]
            cpu_at: dict[str, float] = {}

            def first_decision() -> bool:
                if decisions and not cpu_at:
                    cpu_at.update(scheduler=cpu_seconds([proc.pid]),
                                  server=cpu_seconds([server_pid]))
                return bool(decisions)

            await wait_for(first_decision, timeout=60, what="a first decision", every=0.005,
                           alive=fleet.check_alive)
            if profile_dir is not None:
                await asyncio.sleep(0.3)
                fleet.profile(f"scheduler-{mix}")
            await wait_for(lambda: len(decisions) >= count, timeout=max(60, count / 20),
                           what=f"{count} decisions", every=0.05, alive=fleet.check_alive)
            elapsed = decisions[count - 1][0] - decisions[0][0]
            cpu = {"scheduler": (cpu_seconds([proc.pid]) - cpu_at["scheduler"]) / elapsed,
                   "nats-server": (cpu_seconds([server_pid]) - cpu_at["server"]) / elapsed}
            rate = (count - 1) / elapsed
            ids = [plan_id for _, plan_id, _ in decisions[:count]]
            in_order = ids == sorted(ids)
            outcomes = [outcome for _, _, outcome in decisions[:count]]
            if mix == "distinct":
                rule_ok = all(o == "scheduled" for o in outcomes)
            else:
                rule_ok = outcomes[0] == "scheduled" and all(o == "discarded"
                                                             for o in outcomes[1:])
            progress(f"  scheduler {mix}: {rate:.0f} plans/s vs raw {raw_ack:.0f} msg/s "
                     f"(ack) / {raw_sync:.0f} msg/s (ack_sync)")
            return {"mix": mix, "plans": count, "rate": rate, "raw_ack_rate": raw_ack,
                    "raw_ack_sync_rate": raw_sync, "ratio": rate / raw_ack,
                    "ratio_sync": rate / raw_sync, "in_order": in_order,
                    "rule_applied": rule_ok, "decisions": len(decisions), "cpu": cpu}
        finally:
            await nc.close()
            fleet.stop_all()
            server.stop()
