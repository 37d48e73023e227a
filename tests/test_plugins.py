"""Plugins: directory scanning and reloading, calls on per-plugin threads, policy checks.

Everything here runs in-process against temporary plugin directories; nothing needs NATS.
Deadlines use real (short) timeouts, since abandoning a call is about wall time; every
hung plugin is released when its test ends so that no thread outlives the suite's timeout.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from mlsysops import logs
from mlsysops.errors import PluginError
from mlsysops.plugins import Plugin, PluginDirectory, PluginRunner, plugin_name
from mlsysops.policies import (
    DEFAULT_INTERVAL,
    PolicySettings,
    check_context,
    check_plan,
    check_result,
    policy_settings,
)

POLICY = """
def analyze(context, app, system, mechanisms, telemetry, ml):
    return True, context

def plan(context, app, system, mechanisms, telemetry, ml):
    return {}, context
"""

# What analyze() and plan() receive: context, application_description,
# system_description, mechanisms, telemetry, ml_connector.
ARGS: tuple[Any, ...] = ({}, {"name": "app"}, {}, {}, {}, None)

MECHANISM = """
def apply(command):
    return None

def get_status():
    return {}

def get_options():
    return {}
"""


def write(directory: Path, name: str, *parts: str) -> Path:
    """Write a plugin file from parts, each dedented on its own."""
    path = directory / name
    path.write_text("".join(textwrap.dedent(part) for part in parts))
    return path


def changes_of(changes: list[tuple[str, Plugin | None]]) -> dict[str, bool | None]:
    """{name: loaded?} per change, None for a removal."""
    return {n: (None if p is None else p.loaded) for n, p in changes}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    return d


@pytest.fixture
def policies(policy_dir: Path) -> Iterator[PluginDirectory]:
    directory = PluginDirectory("policy", policy_dir, ("analyze", "plan"))
    yield directory
    directory.close()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown: plugins that hang wait on it, so their threads end with the test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def runners() -> Iterator[list[PluginRunner]]:
    made: list[PluginRunner] = []
    yield made
    for runner in made:
        runner.stop()


# ================================================================ names


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("policy-foo.py", "foo"),
        ("foo.py", "foo"),
        ("policy-relocateComponents.py", "relocateComponents"),
        ("policy-a-b_c9.py", "a-b_c9"),
        ("cpu_freq.py", "cpu_freq"),
        ("_x.py", None),
        ("__init__.py", None),
        (".hidden.py", None),
        ("..data", None),
        ("foo.txt", None),
        ("foo.pyc", None),
        ("foo.py.bak", None),
        ("foo bar.py", None),
        ("foo.bar.py", None),
        ("-foo.py", None),
        ("policy-.py", "policy-"),  # not a prefix then: the whole stem is the name
        ("foo.py\n", None),  # a trailing newline is not "end of name"
        ("a" * 128 + ".py", "a" * 128),
        ("a" * 129 + ".py", None),
    ],
)
def test_plugin_name_rules(filename: str, name: str | None) -> None:
    assert plugin_name(Path(filename)) == name


# ================================================================ scanning


def test_scan_loads_each_file_once(policies: PluginDirectory, policy_dir: Path) -> None:
    write(policy_dir, "policy-a.py", POLICY)
    write(policy_dir, "b.py", POLICY)
    write(policy_dir, "notes.txt", "not a plugin")
    write(policy_dir, "_helper.py", "raise RuntimeError('never imported')")
    (policy_dir / "dir.py").mkdir()

    assert changes_of(policies.scan()) == {"a": True, "b": True}
    assert set(policies.loaded()) == {"a", "b"}
    a = policies.get("a")
    assert a is not None and a.path == policy_dir / "policy-a.py" and a.error == ""
    # Nothing changed: nothing reloads, the same objects stay.
    assert policies.scan() == []
    assert policies.get("a") is a


def test_changed_file_is_reloaded_and_old_module_dropped(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    path = write(policy_dir, "policy-a.py", POLICY + "VERSION = 1\n")
    policies.scan()
    old = policies.get("a")
    assert old is not None and old.module is not None
    assert old.module.VERSION == 1
    old_module_name = old.module.__name__
    assert old_module_name in sys.modules

    path.write_text(textwrap.dedent(POLICY) + "VERSION = 2\n")
    changes = policies.scan()
    assert changes_of(changes) == {"a": True}
    new = policies.get("a")
    assert new is not None and new is not old and new.digest != old.digest
    assert new.module is not None and new.module.VERSION == 2
    # Each reload must not leave the previous module behind.
    assert old_module_name not in sys.modules
    assert new.module.__name__ in sys.modules


def test_removed_file_is_reported_and_forgotten(policies: PluginDirectory,
                                                policy_dir: Path) -> None:
    path = write(policy_dir, "policy-a.py", POLICY)
    write(policy_dir, "policy-b.py", POLICY)
    policies.scan()
    module_name = policies.plugins["a"].module.__name__  # type: ignore[union-attr]
    path.unlink()
    assert policies.scan() == [("a", None)]
    assert policies.get("a") is None and "a" not in policies.plugins
    assert set(policies.loaded()) == {"b"}
    assert module_name not in sys.modules
    # Added again: loaded again.
    write(policy_dir, "policy-a.py", POLICY)
    assert changes_of(policies.scan()) == {"a": True}


def test_directory_missing_then_created(tmp_path: Path) -> None:
    directory = PluginDirectory("policy", tmp_path / "later", ("analyze", "plan"))
    try:
        assert directory.scan() == []
        (tmp_path / "later").mkdir()
        write(tmp_path / "later", "policy-a.py", POLICY)
        assert changes_of(directory.scan()) == {"a": True}
    finally:
        directory.close()


@pytest.mark.parametrize("name", ["foo", "Zed", "zed", "Abc"])
def test_prefixed_file_wins_over_bare_name_whatever_the_case(
    policies: PluginDirectory, policy_dir: Path, name: str
) -> None:
    write(policy_dir, f"{name}.py", POLICY + "WHICH = 'bare'\n")
    write(policy_dir, f"policy-{name}.py", POLICY + "WHICH = 'prefixed'\n")
    policies.scan()
    plugin = policies.get(name)
    assert plugin is not None and plugin.module is not None
    assert plugin.module.WHICH == "prefixed"
    assert plugin.path.name == f"policy-{name}.py"


BROKEN = {
    "syntax": ("def analyze(:\n    pass\n", ["SyntaxError", "policy-syntax.py"]),
    "raises": ("raise RuntimeError('boom at import')\n",
               ["RuntimeError", "boom at import", "policy-raises.py"]),
    "imports": ("import mlsysops_no_such_module_xyz\n",
                ["ModuleNotFoundError", "mlsysops_no_such_module_xyz"]),
    "exits": ("import sys\nsys.exit(3)\n", ["SystemExit", "3"]),
    "noplan": ("def analyze(*a):\n    return False, {}\n", ["does not define plan()"]),
    "noboth": ("X = 1\n", ["does not define analyze(), plan()"]),
    "notcallable": ("analyze = 5\ndef plan(*a):\n    return {}, {}\n",
                    ["does not define analyze()"]),
}


def test_broken_files_are_recorded_and_others_still_load(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    for name, (text, _) in BROKEN.items():
        write(policy_dir, f"policy-{name}.py", text)
    write(policy_dir, "policy-good.py", POLICY)

    changes = changes_of(policies.scan())  # must not raise, even for sys.exit() at import

    assert changes == {**dict.fromkeys(BROKEN, False), "good": True}
    assert set(policies.loaded()) == {"good"}
    for name, (_, needles) in BROKEN.items():
        plugin = policies.plugins[name]
        assert not plugin.loaded and policies.get(name) is None
        for needle in needles:
            assert needle in plugin.error, (name, plugin.error)
        assert plugin.traceback.startswith("Traceback"), name
    # The traceback points into the plugin file for errors raised by its code.
    assert "policy-raises.py" in policies.plugins["raises"].traceback
    assert 'line 1' in policies.plugins["raises"].traceback
    assert "policy-syntax.py" in policies.plugins["syntax"].traceback
    # A failed import leaves no half-initialised module behind.
    assert not [m for m in sys.modules if m.startswith("mlsysops_policy_raises_")]
    assert not [m for m in sys.modules if m.startswith("mlsysops_policy_noplan_")]


def test_broken_file_is_not_reloaded_until_it_changes_then_loads(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    path = write(policy_dir, "policy-a.py", "def analyze(:\n")
    assert changes_of(policies.scan()) == {"a": False}
    assert policies.scan() == []  # same broken content: reported once, not every scan
    path.write_text(textwrap.dedent(POLICY))
    assert changes_of(policies.scan()) == {"a": True}
    plugin = policies.get("a")
    assert plugin is not None and plugin.error == "" and plugin.traceback == ""


def test_a_changed_file_that_fails_to_load_leaves_the_old_version_in_place(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    path = write(policy_dir, "policy-a.py", POLICY + "VERSION = 1\n")
    policies.scan()
    old = policies.get("a")
    assert old is not None
    path.write_text("def analyze(:\n")
    assert changes_of(policies.scan()) == {"a": False}  # the change, as it loaded
    assert policies.get("a") is old and not old.closed  # ... and what serves
    assert "SyntaxError" in policies.rejected["a"].error
    assert policies.scan() == []  # the same broken content is not tried again
    path.write_text(textwrap.dedent(POLICY) + "VERSION = 2\n")
    assert changes_of(policies.scan()) == {"a": True}
    new = policies.get("a")
    assert new is not None and new.module.VERSION == 2  # type: ignore[union-attr]
    assert "a" not in policies.rejected and old.closed


def test_a_file_reverted_to_the_running_version_is_loaded_afresh(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    path = write(policy_dir, "policy-a.py", POLICY)
    policies.scan()
    old = policies.get("a")
    assert old is not None and old.module is not None
    path.write_text("def analyze(:\n")
    policies.scan()
    path.write_text(textwrap.dedent(POLICY))  # the edit undone: same digest as the old one
    assert changes_of(policies.scan()) == {"a": True}
    new = policies.get("a")
    assert new is not None and new is not old and new.digest == old.digest
    assert "a" not in policies.rejected
    # Each has a module of its own; the replaced one left sys.modules with its plugin.
    assert new.module is not None and new.module.__name__ != old.module.__name__
    assert old.closed and old.module.__name__ not in sys.modules
    assert sys.modules[new.module.__name__] is new.module


def test_mechanisms_need_apply(tmp_path: Path) -> None:
    write(tmp_path, "cpu.py", MECHANISM)
    write(tmp_path, "noapply.py", "def get_status():\n    return {}\n")
    mechanisms = PluginDirectory("mechanism", tmp_path, ("apply",))
    try:
        assert changes_of(mechanisms.scan()) == {"cpu": True, "noapply": False}
        assert "does not define apply()" in mechanisms.plugins["noapply"].error
    finally:
        mechanisms.close()


# ================================================================ logger


def test_logger_is_injected_and_tolerates_seed_style_calls(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    write(policy_dir, "policy-a.py", """
        logger.info('component %s', 'web')
        logger.info('text ', {'a': 1})          # an argument but no placeholder
        logger.info('100%% sure %d', 'nope')     # a placeholder of the wrong type
        logger.warning('%(x)s and %(y)s', {'x': 1})  # a missing key
        logger.debug('plain')
        """, POLICY)
    with structlog.testing.capture_logs() as captured:
        policies.scan()
    plugin = policies.get("a")
    assert plugin is not None, policies.plugins["a"].error
    assert isinstance(plugin.module.logger, logs.PluginLogger)  # type: ignore[union-attr]
    events = [e["event"] for e in captured if e.get("policy") == "a"]
    assert events[:2] == ["component web", "text  {'a': 1}"]
    assert "nope" in events[2] and "{'x': 1}" in events[3]


def test_module_logger_is_kept(policies: PluginDirectory, policy_dir: Path) -> None:
    write(policy_dir, "policy-own.py", """
        import logging
        logger = logging.getLogger('my.policy')
        """, POLICY)
    policies.scan()
    plugin = policies.get("own")
    assert plugin is not None and plugin.module is not None
    assert plugin.module.logger is __import__("logging").getLogger("my.policy")


def test_plugin_logger_never_raises() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no str")

        __repr__ = __str__

    logger = logs.PluginLogger("policy", "p")
    with structlog.testing.capture_logs() as captured:
        logger.info("%(a)s and %(b)s", {"a": 1, "b": 2})  # stdlib: one mapping argument
        logger.info("x", extra={"event": "clash", "k": 1})  # 'event' is structlog's own
        logger.info("value %s", Unprintable())
        logger.info(Unprintable())
        logger.info("field", thing=Unprintable())
        logger.warn("warned %s", 1)
        logger.critical("crit")
        logger.info("kw", stack_info=True, stacklevel=2)
        try:
            raise KeyError("k")
        except KeyError:
            logger.exception("failed %s", "here")
    events = [e["event"] for e in captured]
    assert events[0] == "1 and 2"
    assert captured[1]["event"] == "x" and captured[1]["event_"] == "clash"
    assert captured[1]["k"] == 1
    assert "unprintable" in events[2] and "unprintable" in events[3]
    assert events[4] == "field"
    assert events[5] == "warned 1" and captured[5]["log_level"] == "warning"
    assert captured[6]["log_level"] == "critical"
    assert captured[8]["event"] == "failed here" and captured[8]["exc_info"] is True


# ================================================================ where plugins come from


def test_symlink_resolving_outside_is_refused(
    policies: PluginDirectory, policy_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "imported"
    write(outside, "policy-evil.py",
          f"open({str(marker)!r}, 'w').close()\n" + textwrap.dedent(POLICY))
    (policy_dir / "policy-evil.py").symlink_to(outside / "policy-evil.py")
    (policy_dir / "policy-dots.py").symlink_to(Path("..") / "outside" / "policy-evil.py")
    write(policy_dir, "policy-inside.py", POLICY)
    (policy_dir / "policy-alias.py").symlink_to("policy-inside.py")  # inside: fine
    (policy_dir / "policy-dangling.py").symlink_to(policy_dir / "missing.py")

    assert changes_of(policies.scan()) == {"inside": True, "alias": True}
    assert "evil" not in policies.plugins and "dots" not in policies.plugins
    assert not marker.exists()  # refused means never imported


def test_configmap_layout_is_accepted_and_updates_are_seen(tmp_path: Path) -> None:
    """As kubelet mounts a ConfigMap: ..<timestamp>/ files, ..data -> it, name -> ..data/name."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2024_01_01_00_00_00.1"
    first.mkdir()
    write(first, "policy-a.py", POLICY + "VERSION = 1\n")
    write(first, "cpu.py", POLICY)
    (mount / "..data").symlink_to(first.name)
    (mount / "policy-a.py").symlink_to("..data/policy-a.py")
    (mount / "cpu.py").symlink_to("..data/cpu.py")
    # Services may see the mount through a symlinked path too.
    (tmp_path / "link").symlink_to(mount)
    directory = PluginDirectory("policy", tmp_path / "link", ("analyze", "plan"))
    try:
        assert changes_of(directory.scan()) == {"a": True, "cpu": True}
        assert directory.get("a").module.VERSION == 1  # type: ignore[union-attr]

        # An update: a new timestamped dir, ..data swapped atomically, the old one removed.
        second = mount / "..2024_01_01_00_01_00.2"
        second.mkdir()
        write(second, "policy-a.py", POLICY + "VERSION = 2\n")
        write(second, "cpu.py", POLICY)
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        for f in first.iterdir():
            f.unlink()
        first.rmdir()

        assert changes_of(directory.scan()) == {"a": True}  # cpu.py has the same content
        assert directory.get("a").module.VERSION == 2  # type: ignore[union-attr]
    finally:
        directory.close()


# ================================================================ calls


async def test_sync_functions_run_on_the_plugin_pool_and_async_on_its_loop_thread(
    policies: PluginDirectory, policy_dir: Path
) -> None:
    write(policy_dir, "policy-a.py", """
        import asyncio, threading

        def analyze(context, *rest):
            return threading.current_thread().name, {**context, 'rest': list(rest)}

        async def plan(context, *rest):
            await asyncio.sleep(0)
            return {'m': {'thread': threading.current_thread().name}}, context
        """)
    policies.scan()
    plugin = policies.get("a")
    assert plugin is not None
    thread, ctx = await plugin.call("analyze", {"k": 1}, "app", "sys", {}, {}, None,
                                    timeout=2)
    # Plain functions run on the plugin's pool (plugin-policy-a-<n>), async ones on its
    # own event loop thread (plugin-policy-a).
    assert thread == "plugin-policy-a-1" != threading.current_thread().name
    assert ctx == {"k": 1, "rest": ["app", "sys", {}, {}, None]}
    commands, _ = await plugin.call("plan", {}, timeout=2)
    assert commands == {"m": {"thread": "plugin-policy-a"}}


async def test_each_plugin_has_its_own_thread(policies: PluginDirectory,
                                              policy_dir: Path) -> None:
    text = "import threading\n" + POLICY + "def ident():\n    return threading.get_ident()\n"
    write(policy_dir, "policy-a.py", text)
    write(policy_dir, "policy-b.py", text)
    policies.scan()
    a, b = policies.get("a"), policies.get("b")
    assert a is not None and b is not None
    a1, a2, b1 = (await a.call("ident", timeout=2), await a.call("ident", timeout=2),
                  await b.call("ident", timeout=2))
    assert a1 == a2 != b1
    assert threading.get_ident() not in (a1, b1)


async def test_exceptions_become_plugin_errors(policies: PluginDirectory,
                                               policy_dir: Path) -> None:
    write(policy_dir, "policy-a.py", """
        def analyze(*a):
            raise ValueError('bad input here')

        async def plan(*a):
            raise KeyError('missing')

        def timeouts():
            raise TimeoutError('socket timed out')

        def exits():
            raise SystemExit(4)

        def interrupts():
            raise KeyboardInterrupt

        def fine():
            return 'still alive'
        """)
    policies.scan()
    plugin = policies.get("a")
    assert plugin is not None

    with pytest.raises(PluginError) as info:
        await plugin.call("analyze", timeout=2)
    assert info.value.plugin == "a"
    assert info.value.message == "analyze() raised ValueError: bad input here"
    assert "policy-a.py" in info.value.traceback and "bad input here" in info.value.traceback
    assert isinstance(info.value.__cause__, ValueError)

    with pytest.raises(PluginError, match=r"plan\(\) raised KeyError: 'missing'"):
        await plugin.call("plan", timeout=2)
    # A TimeoutError raised by the plugin is its own error, not our deadline.
    with pytest.raises(PluginError, match=r"timeouts\(\) raised TimeoutError: socket timed out"):
        await plugin.call("timeouts", timeout=2)
    # SystemExit and KeyboardInterrupt neither escape into the service nor kill the thread.
    with pytest.raises(PluginError, match=r"exits\(\) raised SystemExit: 4"):
        await plugin.call("exits", timeout=2)
    with pytest.raises(PluginError, match=r"interrupts\(\) raised KeyboardInterrupt"):
        await plugin.call("interrupts", timeout=2)
    assert await plugin.call("fine", timeout=2) == "still alive"

    with pytest.raises(PluginError, match=r"has no function nothere\(\)"):
        await plugin.call("nothere", timeout=2)


async def test_failed_plugin_cannot_be_called(policies: PluginDirectory,
                                              policy_dir: Path) -> None:
    write(policy_dir, "policy-a.py", "def analyze(:\n")
    policies.scan()
    with pytest.raises(PluginError, match=r"has no function analyze\(\)"):
        await policies.plugins["a"].call("analyze", timeout=1)


async def test_hung_sync_call_is_abandoned_and_others_run(
    policies: PluginDirectory, policy_dir: Path, release: threading.Event
) -> None:
    write(policy_dir, "policy-hung.py", POLICY, """
        RELEASE = None

        def hang():
            RELEASE.wait(30)
            return 'late'
        """)
    write(policy_dir, "policy-ok.py", POLICY, """
        import time
        def quick():
            return 'quick'
        """)
    policies.scan()
    hung, ok = policies.get("hung"), policies.get("ok")
    assert hung is not None and ok is not None and hung.module is not None
    hung.module.RELEASE = release  # type: ignore[attr-defined]

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    started = time.monotonic()
    results: tuple[Any, ...] = await asyncio.gather(
        hung.call("hang", timeout=0.3), ok.call("quick", timeout=2), return_exceptions=True)
    outcome, quick = results
    elapsed = time.monotonic() - started
    tick_task.cancel()

    assert quick == "quick"
    assert isinstance(outcome, PluginError)
    assert outcome.message == ("hang exceeded its deadline of 0.3s, was abandoned, and its "
                               "outcome is unknown")
    assert 0.25 <= elapsed < 1.5
    assert ticks >= 10  # the caller's loop kept running while the plugin hung
    # The stalled plugin stalls only itself: another call on it also hits its deadline...
    with pytest.raises(PluginError, match="deadline"):
        await hung.call("hang", timeout=0.1)
    # ...while the other plugin still answers at once.
    assert await ok.call("quick", timeout=1) == "quick"


async def test_blocking_async_call_is_abandoned(
    policies: PluginDirectory, policy_dir: Path, release: threading.Event
) -> None:
    write(policy_dir, "policy-blocking.py", """
        RELEASE = None

        async def analyze(*a):
            RELEASE.wait(30)  # like time.sleep() inside async def: blocks the loop
            return True, {}

        def plan(*a):
            return {}, {}
        """)
    write(policy_dir, "policy-ok.py", POLICY)
    policies.scan()
    blocking, ok = policies.get("blocking"), policies.get("ok")
    assert blocking is not None and ok is not None and blocking.module is not None
    blocking.module.RELEASE = release  # type: ignore[attr-defined]

    started = time.monotonic()
    results = await asyncio.gather(
        blocking.call("analyze", {}, timeout=0.3),
        ok.call("analyze", {"x": 1}, None, None, None, None, None, timeout=2),
        return_exceptions=True)
    assert time.monotonic() - started < 1.5
    assert isinstance(results[0], PluginError) and "analyze exceeded its deadline" in str(
        results[0])
    assert results[1] == (True, {"x": 1})

    # Released, the plugin serves calls again.
    release.set()
    assert await blocking.call("plan", timeout=2) == ({}, {})


async def test_abandoned_async_call_is_cancelled_in_the_plugin(
    runners: list[PluginRunner],
) -> None:
    runner = PluginRunner("cancel")
    runners.append(runner)
    cancelled = threading.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(PluginError, match=r"waits_forever exceeded its deadline of 0\.1s"):
        await runner.call(waits_forever, timeout=0.1)
    assert await asyncio.to_thread(cancelled.wait, 2)
    assert await runner.call(lambda: 42, timeout=1) == 42


async def test_cancelled_caller_cancels_the_call(runners: list[PluginRunner]) -> None:
    runner = PluginRunner("caller-cancel")
    runners.append(runner)
    cancelled = threading.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(runner.call(waits_forever, timeout=30))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 2)


async def test_unloaded_plugin_fails_fast(policies: PluginDirectory, policy_dir: Path) -> None:
    write(policy_dir, "policy-a.py", POLICY, """
        import asyncio
        async def slow():
            await asyncio.sleep(30)
        """)
    policies.scan()
    plugin = policies.get("a")
    assert plugin is not None
    assert await plugin.call("analyze", *ARGS, timeout=2) == (True, {})

    # A call in flight when the plugin is unloaded ends at once, not at its deadline.
    task = asyncio.create_task(plugin.call("slow", timeout=10))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    plugin.close()
    with pytest.raises(PluginError, match=r"slow\(\) was cancelled"):
        await task
    assert time.monotonic() - started < 2

    # A caller still holding the old plugin gets a clear error, not a hang or a warning.
    await asyncio.sleep(0.05)
    with pytest.raises(PluginError, match=r"analyze\(\) cannot run: the plugin was unloaded"):
        await plugin.call("analyze", *ARGS, timeout=5)


async def test_removed_plugin_thread_stops(policies: PluginDirectory, policy_dir: Path) -> None:
    path = write(policy_dir, "policy-a.py", POLICY)
    policies.scan()
    plugin = policies.get("a")
    assert plugin is not None
    await plugin.call("analyze", *ARGS, timeout=2)
    assert plugin.runner is not None
    thread = plugin.runner._thread
    path.unlink()
    policies.scan()
    await asyncio.to_thread(thread.join, 2)
    assert not thread.is_alive()


# ================================================================ policy settings


def test_policy_settings_defaults() -> None:
    assert policy_settings("p", {}) == PolicySettings()
    s = PolicySettings()
    assert (s.interval, s.scope, s.core, s.mechanisms, s.on_telemetry) == (
        DEFAULT_INTERVAL, "application", False, (), False)


def test_policy_settings_reads_every_framework_key() -> None:
    s = policy_settings("p", {
        "configuration": {"analyze_interval": "5m", "analyze_on_telemetry": True},
        "scope": "global",
        "core": True,
        "mechanisms": ["fluidity_proxy", "cpu_freq"],
        "packages": [],
        "mine": {"anything": [1, 2]},
    })
    assert s == PolicySettings(interval=300.0, scope="global", core=True,
                               mechanisms=("fluidity", "cpu_freq"), on_telemetry=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10.0), ("5m", 300.0), ("500ms", 0.5), ("2h", 7200.0), ("1d", 86400.0),
     ("1.5m", 90.0), (" 10s ", 10.0), ("100ms", 0.1), (30, 30.0), (0.5, 0.5)],
)
def test_analyze_interval_parsing(value: object, seconds: float) -> None:
    settings = policy_settings("p", {"configuration": {"analyze_interval": value}})
    assert settings.interval == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["0s", "0", 0, 0.0, -1, "-5s", "50ms", "10", "ten", "10x", "10 S", "1e3s", "", None,
     True, [], {}, "9" * 400 + "s"],
)
def test_invalid_analyze_interval_is_a_load_error(value: object) -> None:
    with pytest.raises(PluginError) as info:
        policy_settings("p", {"configuration": {"analyze_interval": value}})
    assert info.value.plugin == "p"
    assert "configuration.analyze_interval" in info.value.message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_analyze_interval_is_a_load_error(value: float) -> None:
    with pytest.raises(PluginError, match="analyze_interval"):
        policy_settings("p", {"configuration": {"analyze_interval": value}})


def test_bad_configuration_scope_and_mechanisms() -> None:
    with pytest.raises(PluginError, match="'configuration' must be a dict"):
        policy_settings("p", {"configuration": ["analyze_interval"]})
    for scope in ("cluster", "", 5):
        with pytest.raises(PluginError, match="'scope' must be 'application' or 'global'"):
            policy_settings("p", {"scope": scope})
    for mechanisms in ("fluidity", [1], ["ok", None], {"fluidity": 1}):
        with pytest.raises(PluginError, match="'mechanisms' must be a list"):
            policy_settings("p", {"mechanisms": mechanisms})
    with pytest.raises(PluginError, match="initialize\\(\\) must return a dict, not list"):
        policy_settings("p", [])


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking packages must never start pip (or anything else)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a process was started: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "system", refuse)


@pytest.mark.usefixtures("no_subprocess")
@pytest.mark.parametrize(
    "packages",
    [["msgspec"], ["PyYAML"], ["pyyaml>=6"], ["nats-py"], ["prometheus-client==0.0"],
     ["structlog[dev]"], ["json"], []],
)
def test_installed_packages_are_accepted(packages: list[str]) -> None:
    """Named as pip names them ("PyYAML" installs ``yaml``); versions are not checked."""
    assert policy_settings("p", {"packages": packages}).interval == DEFAULT_INTERVAL


@pytest.mark.usefixtures("no_subprocess")
@pytest.mark.parametrize(
    "package",
    ["mlsysops-no-such-package", "mlsysops_no_such_package>=1",
     "mlsysops_no_such_parent.child", "", "==1.0"],
)
def test_missing_package_is_a_clear_load_error(package: str) -> None:
    with pytest.raises(PluginError) as info:
        policy_settings("p", {"packages": ["msgspec", package]})
    assert f"needs package {package!r}, which is not installed" in info.value.message
    assert "never installed at run time" in info.value.message


def test_packages_must_be_a_list_of_names() -> None:
    for packages in ("numpy", [1], {"numpy": 1}):
        with pytest.raises(PluginError, match="'packages' must be a list of package names"):
            policy_settings("p", {"packages": packages})


# ================================================================ contexts and plans


def test_plain_data_context_passes() -> None:
    context = {"a": [1, 2.5, "x", None, True, {"b": ()}], "": {"nested": {"deep": [[]]}},
               "big": 2**70}
    assert check_context("p", context, what="analyze()") is context


@pytest.mark.parametrize(
    ("context", "offending"),
    [
        ({"a": {1, 2}}, "context.a is a set"),
        ({"a": {"b": [1, object()]}}, "context.a.b[1] is a object"),
        ({"a": {"b": [1, math.nan]}}, "context.a.b[1] is nan, not a finite number"),
        ({"a": math.inf}, "context.a is inf, not a finite number"),
        ({1: "x"}, "context has a key 1 that is not a string"),
        ({"a": {("t",): 1}}, "context.a has a key ('t',) that is not a string"),
        ({"a": b"bytes"}, "context.a is a bytes"),
        ({"a": frozenset()}, "context.a is a frozenset"),
        ({"when": __import__("datetime").date(2024, 1, 1)}, "context.when is a date"),
    ],
)
def test_context_that_is_not_plain_data_names_the_key(context: dict[Any, Any],
                                                      offending: str) -> None:
    with pytest.raises(PluginError) as info:
        check_context("p", context, what="analyze()")
    assert info.value.plugin == "p"
    assert info.value.message == (
        f"analyze() returned a context that is not plain data: {offending}")


def test_context_cycles_and_non_dicts_are_refused() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(PluginError, match="nested more than 64 levels deep"):
        check_context("p", cyclic, what="plan()")
    for value in ([], None, "ctx", (1, 2)):  # type: ignore[var-annotated]
        with pytest.raises(PluginError, match=r"plan\(\) must return a dict context, not"):
            check_context("p", value, what="plan()")


def test_initialize_context_is_checked_too() -> None:
    with pytest.raises(PluginError,
                       match=r"initialize\(\) returned a context .*context\.s is a set"):
        policy_settings("p", {"s": set()})


def test_check_plan() -> None:
    assert check_plan("p", None) == {}
    assert check_plan("p", {}) == {}
    plan = {"fluidity": {"action": "move", "to": ["node-b"]}, "cpu_freq": None}
    assert check_plan("p", plan) is plan
    with pytest.raises(PluginError, match=r"plan\(\) must return a dict .*not list"):
        check_plan("p", [("fluidity", {})])
    for key in (1, "", None, ("a",)):
        with pytest.raises(PluginError, match=rf"mechanism name {key!r:s}".replace(
                "(", r"\(").replace(")", r"\)")):
            check_plan("p", {key: {}})
    with pytest.raises(PluginError) as info:
        check_plan("p", {"fluidity": {"nodes": {"a", "b"}}})
    assert info.value.message.endswith("plan.fluidity.nodes is a set")


def test_check_result() -> None:
    assert check_result("p", "analyze", (True, {"a": 1})) == (True, {"a": 1})
    assert check_result("p", "plan", [{}, {}]) == ({}, {})
    for bad in (True, None, "ab", (1, 2, 3), (1,), {"a": 1, "b": 2}):
        with pytest.raises(PluginError) as info:
            check_result("p", "analyze", bad)
        assert info.value.message.startswith("analyze() must return a pair (result, context)")
