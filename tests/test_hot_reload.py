"""Hot reload without races (issue 12, item 2).

- A plugin file is imported off the event loop, so a slow import stalls nothing else
  (the scheduler keeps renewing its lease, the analyzer keeps analysing).
- A changed file replaces its plugin atomically: the old version serves until the new one
  is imported (and, for a policy, initialised); a new version that fails to load leaves
  the old one serving, with the error reported; calls in flight finish on the version
  they started on.
- A verdict carries the digest of the policy version that made it; the planner plans it
  with that version, waiting a bounded time for a version it has not loaded yet.

Plugins that "take long" wait for a marker file that the test writes from the event
loop, with a bound: if the loop were blocked the marker would never come in time, and
the plugin records that it did not see it. So these tests assert what happened, not how
long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlsysops import runtime, wire
from mlsysops import settings as settings_mod
from mlsysops.bus import Bus
from mlsysops.mechhost import MechanismHost
from mlsysops.plugins import PluginDirectory
from mlsysops.policyhost import PolicyHost
from tests import loopkit as kit

ARGS: tuple[Any, ...] = ({}, [{"name": "app"}], {}, {}, {}, None)

# Module code that waits (blocking, as a heavy import does) for MARKER, at most 8 s.
WAITS_FOR_MARKER = """
import os, time
STARTED, MARKER = {started!r}, {marker!r}
open(STARTED, "w").close()
_deadline = time.monotonic() + 8
while not os.path.exists(MARKER) and time.monotonic() < _deadline:
    time.sleep(0.02)
SAW_MARKER = os.path.exists(MARKER)
"""

POLICY = """
VERSION = {version}

def analyze(context, *args):
    return True, context

def plan(context, *args):
    return {{"m": {{"version": VERSION}}}}, context
"""

MECHANISM = """
VERSION = {version}

def apply(command):
    return VERSION
"""


class _KV:
    async def put(self, key: str, value: bytes) -> int:
        return 1


class FakeBus:
    """What the hosts use of a Bus: settings, the service name, error reports, KV puts."""

    def __init__(self, **env: str) -> None:
        self.settings = settings_mod.load(None, env={f"MLSYSOPS_{k.upper()}": v
                                                     for k, v in env.items()})
        self.service = "planner"
        self.reports: list[wire.ErrorEvent] = []
        self.statuses: list[wire.PluginStatus] = []
        bus = self

        class KV(_KV):
            async def put(self, key: str, value: bytes) -> int:
                bus.statuses.append(wire.PLUGIN_STATUS.decode(value))
                return 1

        self._kv = KV()

    async def report(self, event: wire.ErrorEvent) -> None:
        self.reports.append(event)

    def kv(self, bucket: str) -> _KV:
        return self._kv


def write(path: Path, *parts: str) -> Path:
    path.write_text("".join(textwrap.dedent(part) for part in parts))
    return path


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    policies, mechanisms = tmp_path / "policies", tmp_path / "mechanisms"
    policies.mkdir()
    mechanisms.mkdir()
    return policies, mechanisms


@pytest.fixture
async def policy_host(dirs: tuple[Path, Path]) -> AsyncIterator[PolicyHost]:
    host = PolicyHost(FakeBus(policy_dir=str(dirs[0]), call_timeout="20"))  # type: ignore[arg-type]
    yield host
    host.directory.close()


@pytest.fixture
async def mechanism_host(dirs: tuple[Path, Path]) -> AsyncIterator[MechanismHost]:
    host = MechanismHost(FakeBus(mechanism_dir=str(dirs[1]),  # type: ignore[arg-type]
                                 apply_timeout="20"))
    yield host
    host.directory.close()


async def marker_written_once_started(started: Path, marker: Path) -> None:
    """What the rest of a service does meanwhile: it runs, and so writes the marker."""
    await kit.wait_for(started.exists, timeout=15, what="the import to start")
    marker.touch()


# ================================================================ imports off the loop


async def test_a_policy_file_that_takes_long_to_import_does_not_stall_the_service(
    policy_host: PolicyHost, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    started, marker = tmp_path / "started", tmp_path / "marker"
    write(dirs[0] / "policy-heavy.py",
          WAITS_FOR_MARKER.format(started=str(started), marker=str(marker)),
          POLICY.format(version=1))
    meanwhile = asyncio.create_task(marker_written_once_started(started, marker))
    await policy_host.rescan()
    await asyncio.wait_for(meanwhile, 15)
    policy = policy_host.get("heavy")
    assert policy is not None, policy_host.directory.plugins["heavy"].error
    # The loop ran while the file was imported: the marker came before the import ended.
    assert policy.plugin.module.SAW_MARKER is True  # type: ignore[union-attr]


async def test_a_mechanism_file_that_takes_long_to_import_does_not_stall_the_service(
    mechanism_host: MechanismHost, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    started, marker = tmp_path / "started", tmp_path / "marker"
    write(dirs[1] / "heavy.py", WAITS_FOR_MARKER.format(started=str(started),
                                                        marker=str(marker)),
          MECHANISM.format(version=1))
    meanwhile = asyncio.create_task(marker_written_once_started(started, marker))
    await mechanism_host.rescan()
    await asyncio.wait_for(meanwhile, 15)
    plugin = mechanism_host.get("heavy")
    assert plugin is not None, mechanism_host.directory.plugins["heavy"].error
    assert plugin.module.SAW_MARKER is True  # type: ignore[union-attr]
    assert mechanism_host.names() == ["heavy"]


SLOW_IMPORT = """
import os, time
open({started!r}, "w").close()
time.sleep({seconds})  # longer than the scheduler's lease lives without renewal
open({done!r}, "w").close()

def apply(command):
    return None
"""


async def test_the_scheduler_keeps_its_lease_while_a_mechanism_file_takes_long_to_import(
    process_loop: Any, cfg: settings_mod.Settings, plugin_dirs: tuple[Path, Path],
    tmp_path: Path
) -> None:
    from services.scheduler import service as scheduler

    _, mechanisms = plugin_dirs
    kit.recorder(mechanisms)
    process_loop.start("scheduler")
    await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), timeout=30,
                       what="the scheduler to take its lease")
    started, done = tmp_path / "import-started", tmp_path / "import-done"
    (mechanisms / "heavy.py").write_text(SLOW_IMPORT.format(
        started=str(started), done=str(done), seconds=scheduler.LEASE_TTL + 3))
    await kit.wait_for(started.exists, timeout=15, what="the slow import to start")
    held = []
    while not done.exists():
        held.append(await kit.scheduler_active(cfg.nats_url))
        await asyncio.sleep(0.25)
    assert held and all(held), held
    await asyncio.sleep(1.5)  # a renewal after the import: it would fail had the lease lapsed
    assert await kit.scheduler_active(cfg.nats_url)
    assert "lease lost" not in process_loop.logs()


async def test_scanning_off_the_loop_finds_what_a_plain_scan_finds(tmp_path: Path) -> None:
    for name, text in {"policy-a.py": POLICY.format(version=1), "b.py": POLICY.format(version=2),
                       "policy-broken.py": "def analyze(:\n", "_skip.py": "raise SystemExit",
                       "notes.txt": "x"}.items():
        write(tmp_path / name, text)
    plain = PluginDirectory("policy", tmp_path, ("analyze", "plan"))
    off_loop = PluginDirectory("policy", tmp_path, ("analyze", "plan"))
    try:
        expected = {n: (p.loaded, p.digest, p.error) if p else None for n, p in plain.scan()}
        changes = await off_loop.prepare()
        found = {c.name: (c.plugin.loaded, c.plugin.digest, c.plugin.error) if c.plugin else None
                 for c in changes}
        for change in changes:
            off_loop.commit(change)
        assert found == expected and set(found) == {"a", "b", "broken"}
    finally:
        plain.close()
        off_loop.close()


# ================================================================ atomic replacement

SLOW_INITIALIZE = """
import os, time
STARTED, MARKER = {started!r}, {marker!r}

def initialize():
    open(STARTED, "w").close()
    deadline = time.monotonic() + 8
    while not os.path.exists(MARKER) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {{"configuration": {{"analyze_interval": "1s"}}}}
"""


async def test_a_changed_policy_keeps_serving_until_its_new_version_is_initialized(
    policy_host: PolicyHost, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    path = write(dirs[0] / "policy-p.py", POLICY.format(version=1))
    await policy_host.rescan()
    old = policy_host.get("p")
    assert old is not None
    changed: list[str] = []
    policy_host.listeners.append(changed.append)

    started, marker = tmp_path / "started", tmp_path / "marker"
    write(path, SLOW_INITIALIZE.format(started=str(started), marker=str(marker)),
          POLICY.format(version=2))
    rescan = asyncio.create_task(policy_host.rescan())
    await kit.wait_for(started.exists, timeout=15, what="the new initialize() to start")
    # While the new version initialises, the old one is still there and plans.
    serving = policy_host.get("p")
    assert serving is old and changed == []
    result = await serving.plugin.call("plan", *ARGS, timeout=5)
    assert result == ({"m": {"version": 1}}, {})
    marker.touch()
    await asyncio.wait_for(rescan, 15)

    new = policy_host.get("p")
    assert new is not None and new is not old and new.settings.interval == 1.0
    assert await new.plugin.call("plan", *ARGS, timeout=5) == ({"m": {"version": 2}}, {})
    assert changed == ["p"]
    assert not policy_host.bus.reports  # type: ignore[attr-defined]


@pytest.mark.parametrize(("broken", "needle"), [
    ("def analyze(:\n", "SyntaxError"),
    ("def analyze(*a):\n    return True, {}\n", "does not define plan()"),
    ("def initialize():\n    raise RuntimeError('typo')\n" + POLICY.format(version=2),
     "initialize() raised RuntimeError: typo"),
    ("def initialize():\n    return {'configuration': {'analyze_interval': 'often'}}\n"
     + POLICY.format(version=2), "analyze_interval"),
])
async def test_a_typo_in_a_changed_policy_keeps_the_running_version_and_says_so(
    policy_host: PolicyHost, dirs: tuple[Path, Path], broken: str, needle: str
) -> None:
    path = write(dirs[0] / "policy-p.py", POLICY.format(version=1))
    await policy_host.rescan()
    old = policy_host.get("p")
    assert old is not None
    bus: FakeBus = policy_host.bus  # type: ignore[assignment]

    write(path, broken)
    await policy_host.rescan()
    assert policy_host.get("p") is old  # still serving
    assert await old.plugin.call("plan", *ARGS, timeout=5) == ({"m": {"version": 1}}, {})
    (event,) = bus.reports
    assert needle in event.message and "still serves" in event.message, event.message
    status = bus.statuses[-1]
    assert status.loaded and needle in status.error and "still serves" in status.error
    # Reported once, not at every scan.
    await policy_host.rescan()
    assert len(bus.reports) == 1

    # Fixed: the fixed version replaces the old one; the error is gone from the status.
    write(path, POLICY.format(version=3))
    await policy_host.rescan()
    new = policy_host.get("p")
    assert new is not None and new is not old
    assert await new.plugin.call("plan", *ARGS, timeout=5) == ({"m": {"version": 3}}, {})
    assert bus.statuses[-1].loaded and bus.statuses[-1].error == ""


async def test_a_policy_reverted_to_its_running_version_clears_the_load_error(
    policy_host: PolicyHost, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0] / "policy-p.py", POLICY.format(version=1))
    await policy_host.rescan()
    write(path, "def analyze(:\n")
    await policy_host.rescan()
    write(path, POLICY.format(version=1))  # the edit undone
    await policy_host.rescan()
    policy = policy_host.get("p")
    assert policy is not None
    assert await policy.plugin.call("plan", *ARGS, timeout=5) == ({"m": {"version": 1}}, {})
    bus: FakeBus = policy_host.bus  # type: ignore[assignment]
    assert bus.statuses[-1].loaded and bus.statuses[-1].error == ""


async def test_a_removed_policy_is_unloaded_at_once(
    policy_host: PolicyHost, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0] / "policy-p.py", POLICY.format(version=1))
    await policy_host.rescan()
    path.unlink()
    await policy_host.rescan()
    assert policy_host.get("p") is None
    bus: FakeBus = policy_host.bus  # type: ignore[assignment]
    assert not bus.statuses[-1].loaded and bus.statuses[-1].error == "removed"


async def test_a_plan_running_when_its_policy_is_replaced_finishes_on_the_old_version(
    policy_host: PolicyHost, dirs: tuple[Path, Path], release: threading.Event
) -> None:
    path = write(dirs[0] / "policy-p.py", POLICY.format(version=1), """
        RELEASE = None

        def slow_plan(context, *args):
            RELEASE.wait(15)
            return plan(context, *args)
        """)
    await policy_host.rescan()
    old = policy_host.get("p")
    assert old is not None and old.plugin.module is not None
    old.plugin.module.RELEASE = release  # type: ignore[attr-defined]
    running = asyncio.create_task(old.plugin.call("slow_plan", *ARGS, timeout=20))
    await asyncio.sleep(0.1)

    write(path, POLICY.format(version=2))
    await policy_host.rescan()
    new = policy_host.get("p")
    assert new is not None and new is not old
    assert await new.plugin.call("plan", *ARGS, timeout=5) == ({"m": {"version": 2}}, {})
    assert not running.done()  # not cut short by the replacement
    release.set()
    assert await asyncio.wait_for(running, 10) == ({"m": {"version": 1}}, {})
    # Once its last call ended, the old version is unloaded.
    assert old.plugin.closed


# ================================================================ mechanisms


async def test_a_typo_in_a_changed_mechanism_keeps_the_running_version(
    mechanism_host: MechanismHost, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[1] / "m.py", MECHANISM.format(version=1))
    await mechanism_host.rescan()
    old = mechanism_host.get("m")
    assert old is not None
    write(path, "def apply(:\n")
    await mechanism_host.rescan()
    assert mechanism_host.get("m") is old and mechanism_host.names() == ["m"]
    assert await old.call("apply", {}, timeout=5) == 1
    bus: FakeBus = mechanism_host.bus  # type: ignore[assignment]
    (event,) = bus.reports
    assert "SyntaxError" in event.message and "still serves" in event.message
    assert bus.statuses[-1].loaded and "SyntaxError" in bus.statuses[-1].error


async def test_an_apply_running_when_its_mechanism_file_changes_completes(
    mechanism_host: MechanismHost, dirs: tuple[Path, Path], release: threading.Event
) -> None:
    """Its outcome is known (applied), not "unknown" as for an apply cut by an unload."""
    path = write(dirs[1] / "m.py", MECHANISM.format(version=1), """
        import asyncio
        RELEASE = None

        async def slow_apply(command):
            while not RELEASE.is_set():
                await asyncio.sleep(0.02)
            return VERSION
        """)
    await mechanism_host.rescan()
    old = mechanism_host.get("m")
    assert old is not None and old.module is not None
    old.module.RELEASE = release  # type: ignore[attr-defined]
    running = asyncio.create_task(old.call("slow_apply", {}, timeout=20))
    await asyncio.sleep(0.1)
    write(path, MECHANISM.format(version=2))
    await mechanism_host.rescan()
    new = mechanism_host.get("m")
    assert new is not None and new is not old
    assert await new.call("apply", {}, timeout=5) == 2
    release.set()
    assert await asyncio.wait_for(running, 10) == 1
    assert old.closed


# ================================================================ versions across services

VERSIONED = """
VERSION = {version}

def initialize():
    return {{"configuration": {{"analyze_interval": "300ms"}}}}

def analyze(context, *args):
    context["n"] = context.get("n", 0) + 1
    context["analyzed_by"] = VERSION
    return True, context

def plan(context, *args):
    return {{"recorder": {{"version": VERSION, "analyzed_by": context["analyzed_by"],
                          "n": context["n"]}}}}, context
"""


class Services:
    """The five services in this process, each with settings of its own (its policy dir)."""

    def __init__(self, cfg: settings_mod.Settings) -> None:
        self.cfg = cfg
        self.tasks: list[asyncio.Task[int]] = []

    def start(self, name: str, **overrides: Any) -> None:
        settings = settings_mod.Settings(**{**self.cfg.__dict__, "instance": f"{name}-h",
                                            **overrides})
        module = importlib.import_module(f"services.{name}.service")
        build = getattr(module, name.capitalize())
        self.tasks.append(asyncio.ensure_future(runtime.run(Bus(settings, name), build)))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@pytest.fixture
async def services(cfg: settings_mod.Settings) -> AsyncIterator[Services]:
    running = Services(cfg)
    yield running
    await running.stop()


@pytest.fixture
def version_dirs(tmp_path: Path, plugin_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    """The analyzer's and the planner's policy directories (two pods, two mounts)."""
    kit.recorder(plugin_dirs[1])
    analyzer, planner = tmp_path / "analyzer-policies", tmp_path / "planner-policies"
    analyzer.mkdir()
    planner.mkdir()
    return analyzer, planner


def versioned(directory: Path, version: int, *extra: str) -> None:
    write(directory / "policy-v.py", VERSIONED.format(version=version), *extra)


async def start_loop(services: Services, cfg: settings_mod.Settings,
                     dirs: tuple[Path, Path], events: list[dict[str, Any]]) -> Any:
    services.start("monitor")
    services.start("analyzer", policy_dir=str(dirs[0]))
    services.start("planner", policy_dir=str(dirs[1]))
    services.start("scheduler")
    services.start("executor")
    nc = await kit.collect(cfg.nats_url, events, families=("verdict", "plan", "error"))
    assert (await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop")))[
        "accepted"]
    return nc


def of(events: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    return [e for e in events if e["subject"].split(".")[1] == family]


def plans(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["commands"]["recorder"] for e in of(events, "plan")]


def digest_of(directory: Path) -> str:
    import hashlib
    return hashlib.sha256((directory / "policy-v.py").read_bytes()).hexdigest()[:16]


async def test_a_verdict_made_by_a_newer_policy_version_is_planned_by_that_version(
    services: Services, cfg: settings_mod.Settings, version_dirs: tuple[Path, Path]
) -> None:
    """The analyzer's pod saw the ConfigMap update first; the planner's sees it later."""
    analyzer, planner = version_dirs
    versioned(analyzer, 2)
    versioned(planner, 1)
    events: list[dict[str, Any]] = []
    nc = await start_loop(services, cfg, version_dirs, events)
    try:
        await kit.wait_for(lambda: of(events, "verdict"), what="a verdict")
        assert of(events, "verdict")[0]["policy_digest"] == digest_of(analyzer)
        await asyncio.sleep(2)  # the planner has had time to plan it with version 1
        shutil.copy(analyzer / "policy-v.py", planner / "policy-v.py")  # the update arrives
        await kit.wait_for(lambda: plans(events), what="a plan")
    finally:
        await nc.close()
    assert plans(events)[0]["version"] == 2, plans(events)
    assert all(p["version"] == 2 for p in plans(events)), plans(events)
    assert not of(events, "error"), of(events, "error")


async def test_a_verdict_whose_version_never_reaches_the_planner_is_planned_after_a_bound(
    services: Services, cfg: settings_mod.Settings, version_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.planner import service as planner_service

    monkeypatch.setattr(planner_service, "VERSION_WAIT", 2.0, raising=False)
    analyzer, planner = version_dirs
    versioned(analyzer, 2)
    versioned(planner, 1)
    events: list[dict[str, Any]] = []
    nc = await start_loop(services, cfg, version_dirs, events)
    try:
        await kit.wait_for(lambda: plans(events), what="a plan")
        await kit.wait_for(lambda: of(events, "error"), what="the mismatch reported")
    finally:
        await nc.close()
    assert plans(events)[0] == {"version": 1, "analyzed_by": 2, "n": 1}
    error = of(events, "error")[0]
    assert error["subject"] == "mlsysops.error.policy.v" and error["app"] == "shop"
    assert digest_of(analyzer) in error["message"] and digest_of(planner) in error["message"]
    assert error["details"]["verdict_digest"] == digest_of(analyzer)
    assert error["details"]["plan_digest"] == digest_of(planner)


async def test_a_verdict_made_by_an_older_version_is_planned_by_the_newer_one(
    services: Services, cfg: settings_mod.Settings, version_dirs: tuple[Path, Path]
) -> None:
    """The planner's pod was updated first: it does not wait for the analyzer's."""
    analyzer, planner = version_dirs
    versioned(analyzer, 1)
    versioned(planner, 1)
    events: list[dict[str, Any]] = []
    nc = await start_loop(services, cfg, version_dirs, events)
    try:
        await kit.wait_for(lambda: plans(events), what="a plan by version 1")
        versioned(planner, 2)
        await kit.wait_for(lambda: [p for p in plans(events) if p["version"] == 2],
                           timeout=15, what="a plan by version 2")
    finally:
        await nc.close()
    assert {p["analyzed_by"] for p in plans(events)} == {1}
    assert not of(events, "error"), of(events, "error")


async def test_verdicts_arriving_while_the_planner_initialises_a_new_version_are_planned(
    services: Services, cfg: settings_mod.Settings, version_dirs: tuple[Path, Path],
    tmp_path: Path
) -> None:
    analyzer, planner = version_dirs
    versioned(analyzer, 1)
    versioned(planner, 1)
    events: list[dict[str, Any]] = []
    nc = await start_loop(services, cfg, version_dirs, events)
    started, marker = tmp_path / "init-started", tmp_path / "init-marker"
    try:
        await kit.wait_for(lambda: plans(events), what="a first plan")
        # The planner's copy changes (a comment, say) and its initialize() takes a while.
        versioned(planner, 1, SLOW_INITIALIZE.format(started=str(started), marker=str(marker)))
        await kit.wait_for(started.exists, timeout=15, what="the new initialize() to start")
        before = len(of(events, "plan"))
        await kit.wait_for(lambda: len(of(events, "plan")) > before, timeout=6,
                           what="a plan while the new version initialises")
        marker.touch()
    finally:
        marker.touch()
        await nc.close()
    assert not [e for e in of(events, "error") if "not loaded" in e["message"]], events


async def test_an_apply_running_while_its_mechanism_file_changes_is_applied_not_unknown(
    loop_: Any, cfg: settings_mod.Settings, plugin_dirs: tuple[Path, Path]
) -> None:
    policies, mechanisms = plugin_dirs
    log = kit.recorder(mechanisms)
    kit.once_policy(policies, sleep=3)  # its apply takes 3 s
    events: list[dict[str, Any]] = []
    loop_.start()
    nc = await kit.collect(cfg.nats_url, events, families=("exec", "result"))
    try:
        assert (await kit.publish_desc(cfg.nats_url, "app", "shop", kit.app_doc("shop")))[
            "accepted"]
        await kit.wait_for(lambda: of(events, "exec"), what="the execution request")
        await asyncio.sleep(0.5)  # the apply is running
        recorder = mechanisms / "recorder.py"
        recorder.write_text(recorder.read_text() + "\n# edited\n")
        await kit.wait_for(lambda: of(events, "result"), timeout=15, what="the result")
    finally:
        await nc.close()
    (result,) = of(events, "result")
    assert result["outcome"] == "applied", result
    assert len(kit.applied(log)) == 1
