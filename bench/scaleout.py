"""Figure 3: analyzer scale-out, and exactly one evaluation per pair per interval.

N applications are published through the monitor (which is then stopped, so that only
the analyzers and the nats-server share the machine). A policy that says no and records
every ``analyze`` call (application, time, process) runs at the shortest interval the
framework allows (100 ms), so that N / interval is far above what the analyzers can do:
the analyzers are saturated and their evaluation rate is their capacity.

1. one replica: analyze calls per second over a window;
2. a second replica joins (same policy, same streams and buckets): once both are members
   of the rendezvous hashing, calls per second of both over the same window; every pair
   must be evaluated by one replica only and never twice within 0.9 x interval;
3. the policy's interval is raised so that the two replicas are well below capacity:
   every pair must then be evaluated exactly once per interval (consecutive calls of a
   pair 0.9 to 1.5 intervals apart) by exactly one replica.

Baseline, in the same run on the same server: raw nats-py compare-and-set updates of N
KV keys per second (``kv.update(key, value, last=revision)`` from one and from two
processes' worth of connections), the one JetStream operation every evaluation makes.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from pathlib import Path
from typing import Any

from bench import plugins
from bench.common import (
    PREFIX,
    Fleet,
    NatsServer,
    Workdir,
    connect,
    cpu_seconds,
    kv_keys,
    percentile,
    publish_apps,
    stream_messages,
    wait_for,
    wait_loaded,
)

FAST = 0.1  # the framework's minimum analyze_interval


def _calls(logdir: Path) -> list[tuple[float, str, int]]:
    out = []
    for path in logdir.glob("calls-*.log"):
        pid = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            app, _, t = line.rpartition(" ")
            if app:
                out.append((float(t), app, pid))
    out.sort()
    return out


def _window(calls: list[tuple[float, str, int]], start: float, end: float
            ) -> list[tuple[float, str, int]]:
    return [c for c in calls if start <= c[0] < end]


def check_once(calls: list[tuple[float, str, int]], interval: float, *,
               upper: float | None) -> dict[str, Any]:
    """Per pair: one replica only; consecutive calls >= 0.9 interval apart (and at most
    ``upper`` intervals apart when given: no interval skipped)."""
    by_pair: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    for t, app, pid in calls:
        by_pair[app].append((t, pid))
    two_replicas = too_close = too_far = 0
    all_gaps: list[float] = []
    for events in by_pair.values():
        if len({pid for _, pid in events}) > 1:
            two_replicas += 1
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
        all_gaps.extend(g / interval for g in gaps)
        if any(g < 0.9 * interval - 0.005 for g in gaps):
            too_close += 1
        if upper is not None and any(g > upper * interval for g in gaps):
            too_far += 1
    return {"pairs": len(by_pair), "pairs_on_two_replicas": two_replicas,
            "pairs_evaluated_twice_within_interval": too_close,
            "pairs_missing_an_interval": too_far,
            "gap_over_interval": {q: round(percentile(all_gaps, q), 3) for q in (0, 1, 50, 99, 100)}
            if all_gaps else {}}


async def raw_cas(url: str, n_keys: int, seconds: float, clients: int) -> float:
    """Compare-and-set updates per second on a file KV bucket, ``clients`` connections
    each updating its own half of the keys one at a time (64 in flight per client, as
    the analyzer's concurrency)."""
    ncs = [await connect(url) for _ in range(clients)]
    try:
        js = ncs[0].jetstream()
        kv = await js.create_key_value(bucket="bench-cas", history=1)
        revisions = {}
        for i in range(n_keys):
            revisions[f"k{i}"] = await kv.put(f"k{i}", b'{"context":{}}')
        done = 0
        stop = time.monotonic() + seconds

        async def worker(nc: Any, keys: list[str]) -> None:
            nonlocal done
            bucket = await nc.jetstream().key_value("bench-cas")
            while time.monotonic() < stop:
                for key in keys:
                    revisions[key] = await bucket.update(key, b'{"context":{"n":1}}',
                                                         last=revisions[key])
                    done += 1
                    if time.monotonic() >= stop:
                        return

        keys = list(revisions)
        workers = min(64, n_keys) * clients  # 64 in flight per client, as the analyzer
        started = time.monotonic()
        await asyncio.gather(*(worker(ncs[i % clients], keys[i::workers])
                               for i in range(workers)))
        rate = done / (time.monotonic() - started)
        await js.delete_key_value("bench-cas")
        return rate
    finally:
        for nc in ncs:
            await nc.close()


async def measure(n_apps: int, *, window: float, keep: bool = False,
                  profile_dir: Path | None = None, progress: Any = print,
                  quick: bool = False) -> dict[str, Any]:
    with Workdir(f"scaleout-{n_apps}", keep) as work:
        server = NatsServer(work)
        server.start()
        policies, mechanisms, calls_dir = work / "policies", work / "mechanisms", work / "calls"
        for d in (policies, mechanisms, calls_dir):
            d.mkdir()
        plugins.write_recorder(mechanisms, work / "applied.jsonl")
        plugins.write_scale_policy(policies, calls_dir, "100ms")
        fleet = Fleet(server, work, policies, mechanisms, profile_dir=profile_dir)
        nc = await connect(server.url)
        try:
            js = nc.jetstream()
            fleet.start("monitor")
            names = [f"app-{i:04d}" for i in range(n_apps)]
            await publish_apps(nc, names)
            fleet.stop("monitor-0")
            raw1 = await raw_cas(server.url, n_apps, min(window, 3.0), 1)
            raw2 = await raw_cas(server.url, n_apps, min(window, 3.0), 2)

            # 1. one replica
            fleet.start("analyzer", "analyzer-0")
            await wait_loaded(js, {"analyzer": ["policy.bench_scale"]}, timeout=60,
                              alive=fleet.check_alive)
            await wait_for(lambda: _all_evaluated(js, n_apps), timeout=120,
                           what="every pair evaluated once", every=0.2,
                           alive=fleet.check_alive)
            fleet.profile("scaleout", "analyzer-0")
            await asyncio.sleep(1.0)
            pids = {"analyzer-0": fleet.procs["analyzer-0"].pid,
                    "nats-server": server.proc.pid}  # type: ignore[union-attr]
            cpu = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            start1 = time.time()
            await asyncio.sleep(window)
            end1 = time.time()
            cpu1 = {name: (cpu_seconds([pid]) - cpu[name]) / (end1 - start1)
                    for name, pid in pids.items()}
            one = len(_window(_calls(calls_dir), start1, end1)) / (end1 - start1)

            # 2. a second replica joins
            joined = time.time()
            fleet.start("analyzer", "analyzer-1")
            await wait_for(lambda: _members(js, 2), timeout=60, what="two analyzer members",
                           every=0.1, alive=fleet.check_alive)
            fleet.profile("scaleout", "analyzer-1")
            await asyncio.sleep(2.0)
            pids["analyzer-1"] = fleet.procs["analyzer-1"].pid
            cpu = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            start2 = time.time()
            await asyncio.sleep(window)
            end2 = time.time()
            cpu2 = {name: (cpu_seconds([pid]) - cpu[name]) / (end2 - start2)
                    for name, pid in pids.items()}
            calls = _calls(calls_dir)
            in_window = _window(calls, start2, end2)
            two = len(in_window) / (end2 - start2)
            per_replica = collections.Counter(pid for _, _, pid in in_window)
            saturated = check_once(in_window, FAST, upper=None)
            join = check_once(_window(calls, joined, start2), FAST, upper=None)
            progress(f"  scale-out N={n_apps}: 1 replica {one:.0f}/s, 2 replicas {two:.0f}/s "
                     f"({two / one:.2f}x); raw CAS {raw1:.0f}/s, {raw2:.0f}/s")

            # 3. below capacity: exactly once per interval
            slow = max(1.0, round(2 * n_apps / (0.25 * two)) / 2)  # ~25% of capacity
            plugins.write_scale_policy(policies, calls_dir, f"{slow:g}s")
            reloaded = time.time()
            intervals = 3 if quick else 4
            # the rescan (1 s) reloads the policy, then the old due times drain
            await asyncio.sleep(1.5 + slow if quick else 2.0 + 2 * slow)
            start3 = time.time()
            await asyncio.sleep(intervals * slow)
            end3 = time.time()
            fleet.check_alive()
            steady = _window(_calls(calls_dir), start3, end3)
            below = check_once(steady, slow, upper=1.5)
            counts = collections.Counter(app for _, app, _ in steady)
            below["calls_per_pair_min"] = min(counts.values()) if counts else 0
            below["calls_per_pair_max"] = max(counts.values()) if counts else 0
            below["pairs_expected"] = n_apps
            below["intervals"] = intervals
            exactly_once = (below["pairs"] == n_apps and not below["pairs_on_two_replicas"]
                            and not below["pairs_evaluated_twice_within_interval"]
                            and not below["pairs_missing_an_interval"]
                            and not saturated["pairs_on_two_replicas"]
                            and not saturated["pairs_evaluated_twice_within_interval"])
            return {
                "apps": n_apps, "interval_s": FAST, "window_s": window,
                "one_replica_rate": one, "two_replica_rate": two, "speedup": two / one,
                "per_replica": sorted(per_replica.values(), reverse=True),
                "raw_cas_1": raw1, "raw_cas_2": raw2,
                "cpu_one": cpu1, "cpu_two": cpu2,
                "saturated_check": saturated, "join_check": join,
                "below_capacity_interval_s": slow, "below_capacity_check": below,
                "exactly_once": exactly_once, "reloaded_at": reloaded,
            }
        finally:
            await nc.close()
            fleet.stop_all()
            server.stop()


async def _all_evaluated(js: Any, n: int) -> bool:
    return await stream_messages(js, f"KV_{PREFIX}-context") >= n


async def _members(js: Any, n: int) -> bool:
    return len(await kv_keys(js, "leases", "members.analyzer.*")) >= n
