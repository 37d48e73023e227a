"""``python -m bench.strategies [--quick] [--only ...] [--json FILE]``: strategy figures.

Four measurements, each on a documented synthetic input (seeded, so reruns give the
same problems; see docs/strategies.md for the results and the machine):

- ``solve``: placement solve time for 10, 100 and 500 services on 10 and 50 targets:
  the default ``milp`` (full objective with energy), ``milp`` energy-blind (moves only:
  the reference objective), ``greedy``, and the reference formulation in CVXPY (SMO's
  ``decide_placement``: binary matrix, per-element constraints built on each call,
  solved with HiGHS through CVXPY). CVXPY is a benchmark extra: without it that column
  reads "not installed".
- ``energy``: facility energy and carbon of the energy-aware placement against
  energy-blind ones (Kubernetes-like spreading, first fit as SMO's naive placement, and
  the reference objective) on a heterogeneous 12-node cluster.
- ``predictive``: on a synthetic staircase trace, the share of the steps that need more
  capacity for which the scaler had allocated it before the step (predictive against
  the reactive default), and what it costs in spare replicas.
- ``elasticity``: the five services in one process on a private nats-server, Fluidity
  against kmock's Kubernetes emulator: time from a telemetry snapshot carrying a step
  in the request rate to the emulator holding the new replica count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlsysops import strategies as st
from mlsysops.strategies import (
    Application,
    EnergyProfile,
    Resources,
    ScalingProfile,
    ServiceMetrics,
    ServiceRequirements,
    Target,
)

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- instances
# Three kinds of node: an old server room, an efficient renewable-powered site, a
# grid-connected mid-range site. Figures are typical public orders of magnitude.
KINDS = {
    "old": (Resources(16, 64, 0), {"pue": 1.8, "carbon_intensity": 700,
                                   "energy_source": "fossil", "idle_watts": 120,
                                   "watts_per_cpu": 12}),
    "green": (Resources(32, 128, 0), {"pue": 1.15, "carbon_intensity": 60,
                                      "energy_source": "renewable", "renewable_share": 0.85,
                                      "idle_watts": 70, "watts_per_cpu": 7}),
    "grid": (Resources(24, 96, 0), {"pue": 1.4, "carbon_intensity": 350,
                                    "energy_source": "grid_mix", "idle_watts": 95,
                                    "watts_per_cpu": 9}),
}
CPU_MENU = (0.25, 0.5, 1.0, 2.0)
MEMORY_MENU = (0.5, 1.0, 2.0, 4.0)


def instance(n_services: int, n_targets: int, seed: int = 7
             ) -> tuple[list[Target], dict[str, ServiceRequirements]]:
    """Targets cycling old/green/grid (every fifth with GPUs; capacity and GPUs times
    services / (10 * targets) when that exceeds 1), services with requests
    drawn from the menus, 1-2 replicas, one in 50 needing a GPU (with 1 replica)."""
    rng = random.Random(seed)
    size = max(1, round(n_services / (10 * n_targets)))  # bigger targets when crowded
    targets = []
    for j in range(n_targets):
        kind = ("old", "green", "grid")[j % 3]
        capacity, energy = KINDS[kind]
        gpus = float(size) if j % 5 == 0 else 0.0
        targets.append(Target(f"{kind}-{j:03d}",
                              Resources(capacity.cpu * size, capacity.memory * size, gpus),
                              energy=EnergyProfile.from_dict(energy)))
    requirements = {}
    for i in range(n_services):
        name = f"svc-{i:03d}"
        gpu = 1.0 if i % 50 == 0 else 0.0
        requirements[name] = ServiceRequirements(
            name, Resources(rng.choice(CPU_MENU), rng.choice(MEMORY_MENU), gpu),
            replicas=1 if gpu else rng.choice((1, 2)))
    return targets, requirements


def shrink(targets: list[Target], placement: dict[str, str]) -> list[Target]:
    """The re-placement case: the busiest target loses half its CPU and memory."""
    load: dict[str, int] = {}
    for t in placement.values():
        load[t] = load.get(t, 0) + 1
    busiest = max(load, key=lambda t: (load[t], t)) if load else targets[0].name
    return [Target(t.name, Resources(t.capacity.cpu / 2, t.capacity.memory / 2, t.capacity.gpu)
                   if t.name == busiest else t.capacity, energy=t.energy) for t in targets]


# --------------------------------------------------------------------------- reference
def reference_cvxpy(targets: list[Target], requirements: dict[str, ServiceRequirements],
                    current: dict[str, str]) -> dict[str, str] | None:
    """SMO's ``decide_placement`` formulation, rebuilt in CVXPY on each call as there:
    ``min w_dep * sum(x) + w_re * sum(y * (y - x))`` (the first term is constant, so the
    objective is the number of moves), one row per service, CPU limit times replicas
    against each cluster's CPU capacity (no memory), an element-wise accelerator
    constraint per (service, cluster), and its trivially true "dependency" rows."""
    import cvxpy as cp  # the benchmark extra

    services = list(requirements)
    n_s, n_t = len(services), len(targets)
    cpu_caps = [t.capacity.cpu for t in targets]
    gpu_caps = [1 if t.capacity.gpu > 0 else 0 for t in targets]
    cpu_limits = [requirements[s].per_replica.cpu for s in services]
    replicas = [requirements[s].replicas for s in services]
    acceleration = [1 if requirements[s].per_replica.gpu > 0 else 0 for s in services]
    names = [t.name for t in targets]
    y = np.array([[1 if current.get(s) == e else 0 for e in names] for s in services])
    x = cp.Variable((n_s, n_t), boolean=True)
    w_dep = w_re = 1
    objective = cp.Minimize(w_dep * cp.sum(x) + w_re * cp.sum(cp.multiply(y, (y - x))))
    constraints = [cp.sum(x[s, :]) == 1 for s in range(n_s)]
    demand = [cpu_limits[s] * replicas[s] for s in range(n_s)]
    constraints += [cp.sum(cp.multiply(x[:, e], demand)) <= cpu_caps[e] for e in range(n_t)]
    constraints += [x[s, e] * acceleration[s] <= gpu_caps[e]
                    for s in range(1, n_s) for e in range(n_t)]
    d = [0] * n_s
    constraints += [x[i, e] + x[i - 1, e] >= d[i - 1] for i in range(1, n_s)
                    for e in range(n_t)]
    problem = cp.Problem(objective, constraints)
    problem.solve(solver=cp.HIGHS)
    if x.value is None:
        return None
    return {s: names[int(np.argmax(x.value[i]))] for i, s in enumerate(services)}


def first_fit(targets: list[Target], requirements: dict[str, ServiceRequirements]
              ) -> dict[str, str]:
    """SMO's naive placement: each service, in order, on the first target it fits."""
    free = {t.name: t.free for t in targets}
    out = {}
    for s, req in requirements.items():
        for t in targets:
            left = free[t.name] - req.demand
            if left.cpu >= 0 and left.memory >= 0 and left.gpu >= 0:
                out[s], free[t.name] = t.name, left
                break
    return out


def cvxpy_version() -> str | None:
    try:
        import cvxpy
    except ImportError:
        return None
    return str(cvxpy.__version__)


# --------------------------------------------------------------------------- solve
def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times), result


def solve_times(sizes: list[tuple[int, int]], reps: int, reference_limit: int
                ) -> list[dict[str, Any]]:
    app = Application("bench")
    rows = []
    have_cvxpy = cvxpy_version() is not None
    for n_s, n_t in sizes:
        rows.append(_solve_row(app, n_s, n_t, reps, have_cvxpy and n_s * n_t <= reference_limit,
                               have_cvxpy))
        progress(f"solve {n_s}x{n_t}: {json.dumps(rows[-1], default=str)}")
    return rows


def _solve_row(app: Application, n_s: int, n_t: int, reps: int, reference: bool,
               have_cvxpy: bool) -> dict[str, Any]:
    targets, requirements = instance(n_s, n_t)
    milp = st.create_placement("milp")
    blind = st.create_placement("milp", {"energy": 0, "carbon": 0, "renewable": 0})
    greedy = st.create_placement("greedy")
    row: dict[str, Any] = {"services": n_s, "targets": n_t}
    ms, first = timed(lambda: milp.calculate_initial_placement(app, targets, requirements),
                      reps)
    row["milp_initial_ms"] = ms
    row["milp_initial_feasible"] = first.feasible
    row["milp_initial_note"] = first.reason
    shrunk = shrink(targets, first.placement)
    ms, again = timed(lambda: milp.decide_re_placement(app, shrunk, requirements,
                                                       first.placement), reps)
    row["milp_replace_ms"], row["milp_replace_moves"] = ms, len(again.moves)
    ms, moved = timed(lambda: blind.decide_re_placement(app, shrunk, requirements,
                                                        first.placement), reps)
    row["blind_replace_ms"], row["blind_replace_moves"] = ms, len(moved.moves)
    ms, quick = timed(lambda: greedy.decide_re_placement(app, shrunk, requirements,
                                                         first.placement), reps)
    row["greedy_replace_ms"], row["greedy_replace_moves"] = ms, len(quick.moves)
    if reference:
        ms, ref = timed(lambda: reference_cvxpy(shrunk, requirements, first.placement),
                        max(1, min(reps, 3)))
        row["reference_cvxpy_ms"] = ms
        row["reference_moves"] = (sum(1 for s, t in (ref or {}).items()
                                      if first.placement.get(s) != t)
                                  if ref is not None else None)
        row["reference_memory_overcommitted_targets"] = _memory_violations(
            shrunk, requirements, ref or {})
    else:
        row["reference_cvxpy_ms"] = None if have_cvxpy else "not installed"
    return row


def _memory_violations(targets: list[Target], requirements: dict[str, ServiceRequirements],
                       placement: dict[str, str]) -> int:
    used: dict[str, float] = {}
    for s, t in placement.items():
        used[t] = used.get(t, 0.0) + requirements[s].demand.memory
    return sum(1 for t in targets if used.get(t.name, 0.0) > t.capacity.memory + 1e-9)


# --------------------------------------------------------------------------- energy
def energy_scenario(seed: int = 11) -> dict[str, Any]:
    """12 nodes (4 of each kind, listed old, green, grid, ...), 120 services of the menus,
    1-2 replicas (about half of the CPU). Energy of a placement over 24 h: facility power
    (idle power of the nodes it uses plus watts per requested core, times PUE)."""
    app = Application("energy")
    targets, requirements = instance(120, 12, seed)
    targets = [Target(t.name, Resources(t.capacity.cpu, t.capacity.memory, 0), energy=t.energy)
               for t in targets]
    requirements = {s: ServiceRequirements(s, Resources(r.per_replica.cpu,
                                                        r.per_replica.memory, 0),
                                           replicas=r.replicas)
                    for s, r in requirements.items()}
    st.discover([ROOT / "plugins" / "strategies"])
    placements: dict[str, dict[str, str]] = {}
    solve_ms: dict[str, float] = {}
    for label, name, options in (
            ("energy-aware milp (default weights)", "milp", {}),
            ("energy-aware greedy", "greedy", {}),
            ("spread (Kubernetes LeastAllocated-like)", "spread", {}),
            ("milp, reference objective (moves only)", "milp",
             {"energy": 0, "carbon": 0, "renewable": 0})):
        decision = st.create_placement(name, options).calculate_initial_placement(
            app, targets, requirements)
        assert decision.feasible, decision.reason
        placements[label] = decision.placement
        solve_ms[label] = decision.solve_ms
    placements["first fit (SMO naive placement)"] = first_fit(targets, requirements)
    if cvxpy_version() is not None:
        ref = reference_cvxpy(targets, requirements, first_fit(targets, requirements))
        if ref is not None:
            placements["reference CVXPY formulation from first fit"] = ref
    figures = {}
    for label, placement in placements.items():
        e = st.placement_energy(placement, targets, requirements)
        figures[label] = {"kwh_per_day": e["facility_watts"] * 24 / 1000,
                          "kg_co2_per_day": e["carbon_g_per_h"] * 24 / 1000,
                          "nodes_used": int(e["targets_used"]),
                          "solve_ms": solve_ms.get(label)}
    aware = figures["energy-aware milp (default weights)"]["kwh_per_day"]
    for row in figures.values():
        row["aware_saves_pct"] = 100.0 * (1 - aware / row["kwh_per_day"])
    progress(f"energy: {json.dumps(figures)}")
    return {"nodes": len(targets), "services": len(requirements),
            "cpu_share": sum(r.demand.cpu for r in requirements.values())
            / sum(t.capacity.cpu for t in targets), "figures": figures}


# --------------------------------------------------------------------------- predictive
def staircase(seed: int = 5, cycles: int = 3, step_s: int = 15, up: int = 20, hold: int = 4,
              base: float = 40.0, delta: float = 12.0, noise: float = 0.03
              ) -> tuple[list[float], list[float]]:
    """Per-second rates and per-step nominal levels: ``cycles`` of ``up`` steps of
    +``delta`` req/s, ``hold`` steps flat, ``up`` steps of -``delta``, ``hold`` flat; each
    step lasts ``step_s`` s; each second's rate is the level times 1 +- ``noise``."""
    rng = random.Random(seed)
    levels = []
    for _ in range(cycles):
        levels += [base + delta * k for k in range(up)]
        levels += [base + delta * up] * hold
        levels += [base + delta * (up - k) for k in range(up)]
        levels += [base] * hold
    per_second = [lv * (1 + rng.uniform(-noise, noise)) for lv in levels for _ in range(step_s)]
    return per_second, levels


def predictive_trace(options: dict[str, Any], lead_s: int = 10) -> dict[str, Any]:
    """Each second the scaler decides on that second's rate (as the policy does on each
    snapshot); new replicas serve ``lead_s`` seconds after the decision (start-up)."""
    rates, levels = staircase()
    step_s = len(rates) // len(levels)
    profile = ScalingProfile(alpha=10.0, beta=0.0, min_replicas=1, max_replicas=100)
    requirements = {"web": ServiceRequirements("web", Resources(0.25, 0.25), profile=profile)}
    app = Application("trace")
    out: dict[str, Any] = {"trace": {"steps": len(levels), "step_s": step_s,
                                     "seconds": len(rates)}}
    for label, name, opts in (("reactive (capacity)", "capacity", {}),
                              ("predictive", "predictive", options)):
        scaler = st.create_scaling(name, opts)
        memory: dict[str, Any] = {}
        replicas, allocated, history = 1, [], []
        t0 = 1_000_000.0
        for second, rate in enumerate(rates):
            now = t0 + second
            history.append((now, rate))
            metrics = {"web": ServiceMetrics(rate=rate, at=now)}
            d = scaler.decide_replicas(app, [], requirements, {}, {"web": replicas}, metrics,
                                       now=now, memory=memory)
            memory, replicas = d.memory, d.replicas["web"]
            allocated.append(replicas)
        ahead = needing = 0
        for k in range(1, len(levels)):
            need_now, need_before = profile.needed(levels[k]), profile.needed(levels[k - 1])
            if need_now > need_before:
                needing += 1
                ahead += allocated[k * step_s - 1] >= need_now
        need = [profile.needed(r) for r in rates]
        ready = [min(allocated[t], allocated[max(0, t - lead_s)]) for t in range(len(rates))]
        spare = sum(a - n for a, n in zip(allocated, need, strict=True) if a > n)
        short = sum(1 for a, n in zip(ready, need, strict=True) if a < n)
        out[label] = {"steps_needing_more": needing, "allocated_ahead": ahead,
                      "ahead_pct": 100.0 * ahead / needing if needing else 0.0,
                      "spare_replicas_mean": spare / len(rates),
                      "seconds_short_with_lead_time": short,
                      "peak_replicas": max(allocated)}
    out["predictive_options"] = options
    out["lead_time_s"] = lead_s
    progress(f"predictive: {json.dumps(out)}")
    return out


# --------------------------------------------------------------------------- elasticity
async def elasticity(samples: int, window: str = "5s") -> dict[str, Any]:
    """The shipped placement and scaling policies in the in-process loop; the copy of
    the scaling policy has a ``window`` stabilisation window (60 s shipped) so that the
    scale-down steps finish within the run. Up and down steps are reported apart: up is
    the elasticity figure, down includes the window by design."""
    import kmock
    import msgspec
    import nats
    import yaml

    from mlsysops import logs, runtime, wire
    from mlsysops import settings as settings_mod
    from mlsysops.bus import Bus
    from mlsysops.local import nats_server_binary

    logs.configure(level="warning")  # to stderr: stdout is the results
    work = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    policies, mechanisms = work / "policies", work / "mechanisms"
    policies.mkdir()
    mechanisms.mkdir()
    for name in ("placement", "scaling"):
        text = (ROOT / "plugins" / "optional" / f"policy-{name}.py").read_text()
        text = text.replace('"strategy_dirs": [],',
                            f'"strategy_dirs": [{str(ROOT / "plugins" / "strategies")!r}],')
        if name == "scaling":
            old = '"options": {},'
            assert text.count(old) == 1, "policy-scaling.py: options not found"
            text = text.replace(old, f'"options": {{"stabilisation_window": {window!r}}},')
        (policies / f"policy-{name}.py").write_text(text)
    shutil.copy(ROOT / "plugins" / "mechanisms" / "fluidity.py", mechanisms / "fluidity.py")
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
        str(work / "js"), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    emulator = kmock.KubernetesEmulator()
    emulator.resources["apps/v1/deployments"] = {}
    emulator.resources["v1/services"] = {}
    tasks: list[asyncio.Task[Any]] = []
    latencies: list[float] = []
    downs: list[float] = []
    try:
        async with emulator, kmock.Server(emulator) as kube:
            import os
            os.environ["MLSYSOPS_KUBE_API_URL"] = str(kube.url)
            os.environ["MLSYSOPS_FLUIDITY_NAMESPACE"] = "bench"
            cfg = settings_mod.load(env={
                "MLSYSOPS_NATS_URL": url, "MLSYSOPS_POLICY_DIR": str(policies),
                "MLSYSOPS_MECHANISM_DIR": str(mechanisms), "MLSYSOPS_HTTP_PORT": "0",
                "MLSYSOPS_STATUS_INTERVAL": "0.5", "MLSYSOPS_LOG_LEVEL": "error"})
            for name in ("monitor", "analyzer", "planner", "scheduler", "executor"):
                module = __import__(f"services.{name}.service", fromlist=["x"])
                settings = settings_mod.Settings(**{**cfg.__dict__, "instance": f"{name}-b"})
                tasks.append(asyncio.ensure_future(runtime.run(
                    Bus(settings, name), getattr(module, name.capitalize()))))
            nc = await _connect(nats, url)
            try:
                async def publish(kind: str, name: str, doc: Any) -> None:
                    payload = (json.dumps(doc) if kind == "energy" else yaml.safe_dump(doc))
                    for _ in range(200):
                        try:
                            msg = await nc.request(f"mlsysops.desc.{kind}.{name}",
                                                   payload.encode(), timeout=5)
                            assert json.loads(msg.data)["accepted"], msg.data
                            return
                        except nats.errors.NoRespondersError:
                            await asyncio.sleep(0.1)

                await publish("cluster", "c1", {"MLSysOpsCluster": {
                    "cluster_id": "c1", "nodes": ["n1", "n2"]}})
                for node in ("n1", "n2"):
                    await publish("node", node, {"MLSysOpsNode": {
                        "name": node, "cluster_id": "c1", "continuum_layer": "edge",
                        "environment": {"node_type": "native", "os": "ubuntu"},
                        "hardware": {"cpu": {"cores": 16}, "memory": 64}}})
                await publish("app", "shop", {"MLSysOpsApp": {"name": "shop", "components": [
                    {"metadata": {"name": "web"}, "containers": [{
                        "image": "registry.local/web:1", "platform_requirements": {
                            "cpu": {"requests": "250m"}, "memory": {"requests": "128Mi"}}}]}]}})

                def current() -> int | None:
                    for (res, _ns, _name), obj in list(emulator.objects.items()):
                        if res.plural == "deployments" and not obj.deleted:
                            return int(obj.raw["spec"]["replicas"])
                    return None

                deadline = time.monotonic() + 60
                while current() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                rng = random.Random(3)
                levels = [15, 85, 35, 95, 25, 65, 5, 75, 45, 100]
                for i in range(samples):
                    await asyncio.sleep(rng.uniform(2.5, 4.5))  # random phase to the timer
                    rate = levels[i % len(levels)]
                    want = max(1, min(10, math.ceil(rate / 10)))
                    before = current()
                    if before == want or before is None:
                        continue
                    at = time.time()
                    snap = wire.Telemetry(id=f"b-{i}", source="loadgen", collected_at=at,
                                          samples=[wire.Sample("app_request_rate", rate, {
                                              "app": "shop", "component": "web"}, at)])
                    started = time.monotonic()
                    await nc.publish("mlsysops.telemetry.loadgen", msgspec.json.encode(snap))
                    await nc.flush()
                    while current() != want and time.monotonic() - started < 30:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    took = time.monotonic() - started
                    (latencies if want > before else downs).append(took)
                    progress(f"elasticity step {i}: {rate} req/s, {before} -> {want} replicas "
                             f"in {took:.2f} s")
            finally:
                await nc.close()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        server.terminate()
        await server.wait()
        shutil.rmtree(work, ignore_errors=True)
    ordered = sorted(latencies)
    down = sorted(downs)
    return {"up_steps": len(latencies), "p50_s": _pct(ordered, 50), "p95_s": _pct(ordered, 95),
            "max_s": ordered[-1] if ordered else None,
            "under_5s": sum(1 for x in latencies if x < 5.0),
            "stabilisation_window": window, "down_steps": len(down),
            "down_p50_s": _pct(down, 50), "down_max_s": down[-1] if down else None}


def _pct(ordered: list[float], pct: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _connect(nats: Any, url: str) -> Any:
    for _ in range(100):
        try:
            return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        except Exception:
            await asyncio.sleep(0.1)
    raise RuntimeError("nats-server did not start")


# --------------------------------------------------------------------------- main
def machine_info() -> dict[str, Any]:
    try:
        from bench.common import machine

        return dict(machine())
    except Exception:
        import os

        return {"cpus": os.cpu_count(), "processor": platform.processor(),
                "python": platform.python_version()}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


PREDICTIVE = {"horizon": "15s", "window": "45s", "margin": 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.strategies")
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--only", default="", help="solve,energy,predictive,elasticity")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else {"solve", "energy", "predictive",
                                                         "elasticity"}
    import scipy

    results: dict[str, Any] = {"machine": machine_info(), "versions": {
        "python": platform.python_version(), "scipy": scipy.__version__,
        "numpy": np.__version__, "cvxpy": cvxpy_version() or "not installed"}}
    progress(f"machine: {results['machine']}; versions: {results['versions']}")
    if "solve" in only:
        sizes = [(10, 10), (100, 10)] if args.quick else [
            (10, 10), (10, 50), (100, 10), (100, 50), (500, 10), (500, 50)]
        results["solve"] = solve_times(sizes, reps=3 if args.quick else 7,
                                       reference_limit=1000 if args.quick else 25_000)
    if "energy" in only:
        results["energy"] = energy_scenario()
    if "predictive" in only:
        results["predictive"] = predictive_trace(PREDICTIVE)
    if "elasticity" in only:
        results["elasticity"] = asyncio.run(elasticity(4 if args.quick else 20))
    text = json.dumps(results, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
