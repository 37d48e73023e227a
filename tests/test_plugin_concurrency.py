"""Plugin calls under load: concurrent blocking calls, deadlines, and what counts as failure.

The two reproductions of issue 11 (item 4) are here: five concurrent 1 s blocking applies
with a 2.5 s deadline were all reported as deadline failures though all five applied, and
64 concurrent 50 ms blocking analyses with a 3 s deadline failed 63 times and got their
policy quarantined. The plugins go through the hosts (``MechanismHost``/``PolicyHost``)
with settings read as a deployment gives them (``MLSYSOPS_PLUGIN_THREADS``), and failures
through ``PolicyHost.failed`` as the analyzer and planner count them. Nothing needs NATS:
the bus is a stand-in that records the error events.

Deadlines use real (short) timeouts. Timing bounds here only prove that a deadline was
(or was not) hit; they are not performance claims.
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlsysops import settings as settings_mod
from mlsysops import wire
from mlsysops.errors import CallAbandoned, PluginError
from mlsysops.mechhost import MechanismHost
from mlsysops.policies import check_result
from mlsysops.policyhost import Policy, PolicyHost

ARGS: tuple[Any, ...] = ({}, [{"name": "app"}], {}, {}, {}, None)


class _KV:
    async def put(self, key: str, value: bytes) -> int:
        return 1


class FakeBus:
    """What the hosts use of a Bus: settings, the service name, error reports, KV puts."""

    def __init__(self, **env: str) -> None:
        self.settings = settings_mod.load(None, env={f"MLSYSOPS_{k.upper()}": v
                                                     for k, v in env.items()})
        self.service = "analyzer"
        self.reports: list[wire.ErrorEvent] = []

    async def report(self, event: wire.ErrorEvent) -> None:
        self.reports.append(event)

    def kv(self, bucket: str) -> _KV:
        return _KV()


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown: plugins that hang wait on it, so their threads end with the test."""
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
async def make_policy_host(dirs: tuple[Path, Path]) -> AsyncIterator[Any]:
    hosts: list[PolicyHost] = []

    async def make(**env: str) -> PolicyHost:
        host = PolicyHost(FakeBus(policy_dir=str(dirs[0]), **env))  # type: ignore[arg-type]
        hosts.append(host)
        await host.rescan()
        return host

    yield make
    for host in hosts:
        host.directory.close()


@pytest.fixture
async def make_mechanism_host(dirs: tuple[Path, Path]) -> AsyncIterator[Any]:
    hosts: list[MechanismHost] = []

    def make(**env: str) -> MechanismHost:
        host = MechanismHost(FakeBus(mechanism_dir=str(dirs[1]), **env))  # type: ignore[arg-type]
        hosts.append(host)
        host.directory.scan()
        return host

    yield make
    for host in hosts:
        host.directory.close()


async def analyze_as_the_analyzer(host: PolicyHost, policy: Policy, app: str) -> bool:
    """One evaluation's plugin call and failure accounting, as services/analyzer does it."""
    try:
        result = await policy.plugin.call("analyze", *ARGS,
                                          timeout=host.bus.settings.call_timeout)
        check_result(policy.name, "analyze", result)
    except PluginError as exc:
        await host.failed(policy, app, "analyze", exc)
        return False
    await host.succeeded(policy)
    return True


# ================================================================ the reproductions


async def test_five_concurrent_blocking_applies_all_succeed_and_all_take_effect(
    dirs: tuple[Path, Path], make_mechanism_host: Any
) -> None:
    effects = dirs[1].parent / "applied.txt"
    write(dirs[1], "slow.py", f"""
        import time

        def apply(command):
            time.sleep(1)
            with open({str(effects)!r}, "a") as f:
                f.write(str(command["n"]) + "\\n")
        """)
    host = make_mechanism_host()
    plugin = host.get("slow")
    assert plugin is not None, host.directory.plugins["slow"].error

    results = await asyncio.gather(
        *(plugin.call("apply", {"n": n}, timeout=2.5) for n in range(5)),
        return_exceptions=True)

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sorted(effects.read_text().split()) == ["0", "1", "2", "3", "4"]


async def test_64_concurrent_blocking_analyses_all_succeed_and_the_policy_is_not_quarantined(
    dirs: tuple[Path, Path], make_policy_host: Any
) -> None:
    write(dirs[0], "policy-busy.py", """
        import time

        def analyze(context, *args):
            time.sleep(0.05)
            return False, context

        def plan(context, *args):
            return {}, context
        """)
    host = await make_policy_host(plugin_threads="8", call_timeout="3",
                                  quarantine_after="5")
    policy = host.get("busy")
    assert policy is not None, host.directory.plugins["busy"].error

    outcomes = await asyncio.gather(
        *(analyze_as_the_analyzer(host, policy, f"app-{i}") for i in range(64)))

    assert [e.message for e in host.bus.reports] == []
    assert all(outcomes)
    assert not policy.quarantined and policy.failures == 0
    assert host.active() == [policy]


# ================================================================ deadlines


async def test_calls_waiting_for_a_thread_do_not_use_up_their_deadline(
    dirs: tuple[Path, Path], make_mechanism_host: Any
) -> None:
    write(dirs[1], "single.py", """
        import time

        def apply(command):
            time.sleep(1)
            return command
        """)
    host = make_mechanism_host(plugin_threads="1")
    plugin = host.get("single")
    assert plugin is not None

    # One thread: the second call waits about 1 s for it, then runs its 1 s within 1.5 s.
    results = await asyncio.gather(plugin.call("apply", "first", timeout=1.5),
                                   plugin.call("apply", "second", timeout=1.5),
                                   return_exceptions=True)

    assert results == ["first", "second"]


async def test_call_abandoned_at_its_deadline_says_its_outcome_is_unknown(
    dirs: tuple[Path, Path], make_mechanism_host: Any, release: threading.Event
) -> None:
    write(dirs[1], "hangs.py", """
        RELEASE = None

        def apply(command):
            RELEASE.wait(30)
        """)
    host = make_mechanism_host()
    plugin = host.get("hangs")
    assert plugin is not None and plugin.module is not None
    plugin.module.RELEASE = release  # type: ignore[attr-defined]

    started = time.monotonic()
    with pytest.raises(CallAbandoned) as info:
        await plugin.call("apply", {}, timeout=0.3)
    assert time.monotonic() - started < 5  # abandoned, not waited for
    assert info.value.plugin == "hangs"
    assert info.value.message == ("apply exceeded its deadline of 0.3s, was abandoned, "
                                  "and its outcome is unknown")


async def test_abandoned_async_call_says_its_outcome_is_unknown(
    dirs: tuple[Path, Path], make_mechanism_host: Any
) -> None:
    write(dirs[1], "waits.py", """
        import asyncio

        async def apply(command):
            await asyncio.Event().wait()
        """)
    host = make_mechanism_host()
    plugin = host.get("waits")
    assert plugin is not None
    with pytest.raises(CallAbandoned, match=r"outcome is unknown"):
        await plugin.call("apply", {}, timeout=0.2)


async def test_blocking_calls_of_one_plugin_run_side_by_side(
    dirs: tuple[Path, Path], make_mechanism_host: Any, release: threading.Event
) -> None:
    write(dirs[1], "meet.py", """
        import threading
        BARRIER = threading.Barrier(3)

        def apply(command):
            BARRIER.wait(10)  # returns only once three calls are running at the same time
            return threading.current_thread().name
        """)
    host = make_mechanism_host(plugin_threads="3")
    plugin = host.get("meet")
    assert plugin is not None
    names = await asyncio.gather(*(plugin.call("apply", {}, timeout=5) for _ in range(3)))
    assert len(set(names)) == 3
    assert all(name.startswith("plugin-mechanism-meet") for name in names)


# ================================================================ what counts as a failure


async def test_a_policy_that_raises_or_overruns_is_still_quarantined(
    dirs: tuple[Path, Path], make_policy_host: Any, release: threading.Event
) -> None:
    write(dirs[0], "policy-bad.py", """
        RELEASE = None
        CALLS = []

        def analyze(context, *args):
            CALLS.append(1)
            if len(CALLS) == 1:
                raise RuntimeError("bad on purpose")
            RELEASE.wait(30)

        def plan(context, *args):
            return {}, context
        """)
    host = await make_policy_host(quarantine_after="2", call_timeout="0.3")
    policy = host.get("bad")
    assert policy is not None and policy.plugin.module is not None
    policy.plugin.module.RELEASE = release  # type: ignore[attr-defined]

    assert not await analyze_as_the_analyzer(host, policy, "a1")  # raised
    assert policy.failures == 1 and not policy.quarantined
    assert not await analyze_as_the_analyzer(host, policy, "a1")  # overran its deadline
    assert policy.quarantined
    messages = [e.message for e in host.bus.reports]
    assert messages[0] == "analyze: analyze() raised RuntimeError: bad on purpose"
    assert messages[1] == ("analyze: analyze exceeded its deadline of 0.3s, was abandoned, "
                           "and its outcome is unknown")
    assert messages[2].startswith("quarantined after 2 consecutive failures")


RELOADED = """
    RELEASE = None

    def analyze(context, *args):
        RELEASE.wait(30)
        return False, context

    def plan(context, *args):
        return {}, context
    """


async def test_calls_that_cannot_run_because_the_policy_was_removed_do_not_count(
    dirs: tuple[Path, Path], make_policy_host: Any, release: threading.Event
) -> None:
    # Was "...reloaded_do_not_count": a changed file no longer cuts its calls short (see
    # the next test); removing the file still does, and that is still not a failure.
    path = write(dirs[0], "policy-reloaded.py", RELOADED)
    host = await make_policy_host(quarantine_after="1", plugin_threads="1",
                                  call_timeout="20")
    old = host.get("reloaded")
    assert old is not None and old.plugin.module is not None
    old.plugin.module.RELEASE = release  # type: ignore[attr-defined]

    # One call runs (its only thread is held), one waits for the thread; then the file
    # is removed while both are in flight.
    running = asyncio.create_task(analyze_as_the_analyzer(host, old, "a1"))
    waiting = asyncio.create_task(analyze_as_the_analyzer(host, old, "a2"))
    await asyncio.sleep(0.2)
    path.unlink()
    started = time.monotonic()
    await host.rescan()
    outcomes = await asyncio.wait_for(asyncio.gather(running, waiting), 10)
    assert time.monotonic() - started < 5  # ended by the unload, not by the 20 s deadline
    assert outcomes == [False, False]
    # A caller still holding the old policy gets an error that does not count either.
    assert not await analyze_as_the_analyzer(host, old, "a3")

    assert old.failures == 0 and not old.quarantined
    assert not [e for e in host.bus.reports if "quarantined" in e.message]
    assert host.get("reloaded") is None


async def test_calls_in_flight_when_the_policy_is_replaced_finish_on_the_old_version(
    dirs: tuple[Path, Path], make_policy_host: Any, release: threading.Event
) -> None:
    path = write(dirs[0], "policy-reloaded.py", RELOADED)
    host = await make_policy_host(quarantine_after="1", plugin_threads="1",
                                  call_timeout="20")
    old = host.get("reloaded")
    assert old is not None and old.plugin.module is not None
    old.plugin.module.RELEASE = release  # type: ignore[attr-defined]

    running = asyncio.create_task(analyze_as_the_analyzer(host, old, "a1"))
    waiting = asyncio.create_task(analyze_as_the_analyzer(host, old, "a2"))
    await asyncio.sleep(0.2)
    path.write_text(path.read_text() + "\n# changed\n")
    await host.rescan()
    new = host.get("reloaded")
    assert new is not None and new is not old and not new.quarantined
    # A new call on the replaced version is refused, and that does not count.
    assert not await analyze_as_the_analyzer(host, old, "a3")
    assert not running.done() and not waiting.done()
    release.set()
    assert await asyncio.wait_for(asyncio.gather(running, waiting), 10) == [True, True]
    assert old.failures == 0 and not old.quarantined and not host.bus.reports
    assert old.plugin.closed  # unloaded once its last call ended


async def test_unloading_ends_running_and_waiting_calls_promptly(
    dirs: tuple[Path, Path], make_mechanism_host: Any, release: threading.Event
) -> None:
    marker = dirs[1].parent / "second-ran"
    write(dirs[1], "busy.py", f"""
        RELEASE = None

        def apply(command):
            if command == "second":
                open({str(marker)!r}, "w").close()
            RELEASE.wait(30)
        """)
    host = make_mechanism_host(plugin_threads="1")
    plugin = host.get("busy")
    assert plugin is not None and plugin.module is not None
    plugin.module.RELEASE = release  # type: ignore[attr-defined]

    first = asyncio.create_task(plugin.call("apply", "first", timeout=20))
    second = asyncio.create_task(plugin.call("apply", "second", timeout=20))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    plugin.close()
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True),
                                     10)
    assert time.monotonic() - started < 5
    running, waiting = results
    # The running call may still finish in its thread: its outcome is unknown.
    assert isinstance(running, CallAbandoned), running
    assert "unloaded" in running.message and "outcome is unknown" in running.message
    # The waiting call never ran.
    assert isinstance(waiting, PluginError) and not isinstance(waiting, CallAbandoned)
    assert waiting.message == "apply() cannot run: the plugin was unloaded"
    release.set()
    await asyncio.sleep(0.1)
    assert not marker.exists()


async def test_unloading_ends_calls_even_while_a_coroutine_blocks_the_plugin_loop(
    dirs: tuple[Path, Path], make_mechanism_host: Any, release: threading.Event
) -> None:
    write(dirs[1], "blocks.py", """
        RELEASE = None

        async def apply(command):
            RELEASE.wait(30)  # like time.sleep() inside async def: blocks the plugin's loop
        """)
    host = make_mechanism_host()
    plugin = host.get("blocks")
    assert plugin is not None and plugin.module is not None
    plugin.module.RELEASE = release  # type: ignore[attr-defined]

    first = asyncio.create_task(plugin.call("apply", "first", timeout=20))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(plugin.call("apply", "second", timeout=20))  # cannot start
    await asyncio.sleep(0.2)
    started = time.monotonic()
    plugin.close()
    running, waiting = await asyncio.wait_for(
        asyncio.gather(first, second, return_exceptions=True), 10)
    assert time.monotonic() - started < 5
    assert isinstance(running, CallAbandoned), running
    assert running.message == ("apply() was cancelled: the plugin was unloaded while it ran, "
                               "and its outcome is unknown")
    assert isinstance(waiting, PluginError) and not isinstance(waiting, CallAbandoned)
    assert waiting.message == "apply() cannot run: the plugin was unloaded"


async def test_a_cancelled_caller_waiting_for_a_thread_never_runs_its_call(
    dirs: tuple[Path, Path], make_mechanism_host: Any, release: threading.Event
) -> None:
    marker = dirs[1].parent / "second-ran"
    write(dirs[1], "busy.py", f"""
        RELEASE = None

        def apply(command):
            if command == "second":
                open({str(marker)!r}, "w").close()
                return
            RELEASE.wait(30)
        """)
    host = make_mechanism_host(plugin_threads="1")
    plugin = host.get("busy")
    assert plugin is not None and plugin.module is not None
    plugin.module.RELEASE = release  # type: ignore[attr-defined]

    first = asyncio.create_task(plugin.call("apply", "first", timeout=20))
    second = asyncio.create_task(plugin.call("apply", "second", timeout=20))
    await asyncio.sleep(0.2)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    release.set()
    assert await first is None
    assert await plugin.call("apply", "third", timeout=5) is None
    assert not marker.exists()


async def test_a_plugin_whose_every_thread_is_stuck_refuses_calls_at_once(
    dirs: tuple[Path, Path], make_policy_host: Any, release: threading.Event
) -> None:
    """Its threads are all held by calls that overran: later calls fail now, not never."""
    write(dirs[0], "policy-stuck.py", """
        RELEASE = None

        def analyze(context, *args):
            if not context.get("quick"):
                RELEASE.wait(30)
            return False, context

        def plan(context, *args):
            return {}, context
        """)
    host = await make_policy_host(plugin_threads="2", call_timeout="0.3",
                                  quarantine_after="100")
    policy = host.get("stuck")
    assert policy is not None and policy.plugin.module is not None
    policy.plugin.module.RELEASE = release  # type: ignore[attr-defined]
    plugin = policy.plugin

    # Two calls overrun and hold both threads; a third waits for a thread meanwhile.
    results = await asyncio.gather(*(plugin.call("analyze", *ARGS, timeout=0.3)
                                     for _ in range(3)), return_exceptions=True)
    assert [type(r) for r in results[:2]] == [CallAbandoned, CallAbandoned]
    refused = results[2]
    assert isinstance(refused, PluginError) and not isinstance(refused, CallAbandoned)
    assert refused.message == ("analyze() cannot run: all 2 of the plugin's threads are "
                               "held by calls that overran their deadline")
    started = time.monotonic()
    with pytest.raises(PluginError, match="cannot run: all 2"):
        await plugin.call("analyze", {"quick": True}, timeout=5)
    assert time.monotonic() - started < 2  # refused at once, not after its deadline
    # That is the plugin's own doing: it counts.
    assert not await analyze_as_the_analyzer(host, policy, "a1")
    assert policy.failures == 1

    # Once its calls return, the plugin runs calls again.
    release.set()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert await plugin.call("analyze", {"quick": True}, timeout=5) == (
                False, {"quick": True})
            break
        except PluginError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_plugin_threads_setting_is_range_checked() -> None:
    assert settings_mod.Settings().plugin_threads == 8
    assert settings_mod.load(None, env={"MLSYSOPS_PLUGIN_THREADS": "3"}).plugin_threads == 3
    for raw in ("0", "-1", "100000"):
        with pytest.raises(Exception, match="--plugin-threads / MLSYSOPS_PLUGIN_THREADS"):
            settings_mod.load(None, env={"MLSYSOPS_PLUGIN_THREADS": raw})


async def test_failures_of_a_replaced_version_do_not_quarantine_the_new_one(
    dirs: tuple[Path, Path], make_policy_host: Any, release: threading.Event
) -> None:
    path = write(dirs[0], "policy-replaced.py", """
        RELEASE = None

        def analyze(context, *args):
            RELEASE.wait(30)
            raise RuntimeError("the old version fails")

        def plan(context, *args):
            return {}, context
        """)
    host = await make_policy_host(quarantine_after="1", call_timeout="20")
    old = host.get("replaced")
    assert old is not None and old.plugin.module is not None
    old.plugin.module.RELEASE = release  # type: ignore[attr-defined]
    running = asyncio.create_task(analyze_as_the_analyzer(host, old, "a1"))
    await asyncio.sleep(0.2)
    path.write_text(path.read_text() + "\n# changed\n")
    await host.rescan()
    new = host.get("replaced")
    assert new is not None and new is not old
    statuses: list[str] = []
    host.listeners.append(statuses.append)
    release.set()
    assert await asyncio.wait_for(running, 10) is False
    # The old version's failure is reported, but quarantine is about the version serving.
    assert [e.message for e in host.bus.reports] == [
        "analyze: analyze() raised RuntimeError: the old version fails"]
    assert not new.quarantined and host.get("replaced") is new and statuses == []
