"""Loading, reloading and calling policy and mechanism plugins.

Plugins are plain Python files in a configured directory. :class:`PluginDirectory` scans
it (files added, changed or removed are noticed on the next scan, no restart needed),
loads each file as its own module and keeps the load error with its traceback when a file
is broken, so one bad plugin never stops a service. Only files directly inside the
directory are loaded; a symlink that resolves outside it is refused.

Every call into a plugin goes through :class:`PluginRunner`: one thread with its own
event loop per plugin, so a plugin that blocks (a ``time.sleep`` in an ``async def``)
stalls only itself, and a call that exceeds its deadline is abandoned.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import re
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mlsysops import logs
from mlsysops.errors import PluginError

log = logs.get(__name__)

_NAME = re.compile(r"^(?:policy-)?([A-Za-z0-9_][A-Za-z0-9_-]{0,127})\.py$")


def plugin_name(path: Path) -> str | None:
    """``policy-foo.py`` and ``foo.py`` both name ``foo``; anything else is not a plugin."""
    if path.name.startswith(("_", ".")):
        return None
    m = _NAME.fullmatch(path.name)  # fullmatch: "$" would also accept a trailing newline
    return m.group(1) if m else None


class PluginRunner:
    """Runs one plugin's functions on a dedicated thread and event loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"plugin-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._closed = True
            # Calls still running when the plugin is unloaded end now (as cancelled), so
            # their callers get an error instead of waiting for their deadline.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float
    ) -> Any:
        """Call ``fn(*args)`` (sync or async) on the plugin thread, within ``timeout`` s.

        Whatever the plugin raises (even ``TimeoutError``, ``SystemExit`` or
        ``KeyboardInterrupt``) is raised here as an ``Exception``; only a call that really
        overruns ``timeout`` gets the "exceeded its deadline" :class:`PluginError`.
        """
        label = getattr(fn, "__name__", "call")
        caller = asyncio.get_running_loop()
        outcome: asyncio.Future[Any] = caller.create_future()
        started: list[asyncio.Task[Any]] = []

        def settle(task: asyncio.Task[Any]) -> None:  # on the plugin thread
            if task.cancelled():
                error: BaseException | None = PluginError(
                    self.name, f"{label}() was cancelled: the plugin was unloaded or cancelled it")
                result = None
            else:
                error = task.exception()  # read even if nobody waits any more
                result = None if error is not None else task.result()
            try:
                caller.call_soon_threadsafe(_settle, outcome, result, error)
            except RuntimeError:  # the caller's loop is gone: nobody is waiting
                pass

        def start() -> None:  # on the plugin thread
            task = self._loop.create_task(_invoke(fn, args))
            task.add_done_callback(settle)
            started.append(task)

        def abandon() -> None:  # on the plugin thread
            for task in started:
                task.cancel()

        if self._closed:
            raise PluginError(self.name, f"{label}() cannot run: the plugin was unloaded")
        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError:  # loop closed meanwhile
            raise PluginError(
                self.name, f"{label}() cannot run: the plugin was unloaded"
            ) from None
        try:
            done, _ = await asyncio.wait({outcome}, timeout=timeout)
        except BaseException:  # the caller was cancelled: so is the call
            outcome.cancel()
            self._abandon(abandon)
            raise
        if not done:
            outcome.cancel()
            self._abandon(abandon)
            raise PluginError(
                self.name, f"{label} exceeded its deadline of {timeout:g}s and was abandoned"
            )
        return outcome.result()

    def _abandon(self, abandon: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(abandon)
        except RuntimeError:  # loop already closed: nothing left to cancel
            pass

    def stop(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # already stopped and closed
            pass


class _Escaped(Exception):
    """A ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``...) raised by plugin code.

    Carried as an ordinary exception so that it neither kills the plugin's thread nor
    escapes into the service that called the plugin.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result
    except asyncio.CancelledError:
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise _Escaped(exc) from exc


def _settle(outcome: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Hand a finished plugin call's outcome to its caller (on the caller's loop)."""
    if outcome.done():  # abandoned at its deadline, or the caller was cancelled
        return
    if error is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(result)


@dataclass
class Plugin:
    """One loaded (or failed) plugin file."""

    kind: str
    name: str
    path: Path
    digest: str
    module: ModuleType | None = None
    error: str = ""
    traceback: str = ""
    runner: PluginRunner | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.module is not None

    def function(self, attr: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, attr, None)
        return fn if callable(fn) else None

    async def call(self, attr: str, *args: Any, timeout: float) -> Any:
        fn = self.function(attr)
        if fn is None:
            raise PluginError(self.name, f"has no function {attr}()")
        if self.runner is None:
            self.runner = PluginRunner(f"{self.kind}-{self.name}")
        try:
            return await self.runner.call(fn, *args, timeout=timeout)
        except PluginError:
            raise
        except Exception as exc:
            original = exc.original if isinstance(exc, _Escaped) else exc
            raise PluginError(
                self.name, f"{attr}() raised {type(original).__name__}: {original}",
                traceback=traceback.format_exc(),
            ) from exc

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        # Drop the module so that every reload does not leave one behind in sys.modules.
        if self.module is not None and sys.modules.get(self.module.__name__) is self.module:
            del sys.modules[self.module.__name__]


class PluginDirectory:
    """The plugins of one kind in one directory, reloaded when files change."""

    def __init__(self, kind: str, directory: str | Path, required: tuple[str, ...]) -> None:
        self.kind = kind
        self.directory = Path(directory)
        self.required = required
        self.plugins: dict[str, Plugin] = {}

    def get(self, name: str) -> Plugin | None:
        plugin = self.plugins.get(name)
        return plugin if plugin is not None and plugin.loaded else None

    def loaded(self) -> dict[str, Plugin]:
        return {n: p for n, p in self.plugins.items() if p.loaded}

    def close(self) -> None:
        """Stop every plugin's thread (when the service stops)."""
        for plugin in self.plugins.values():
            plugin.close()

    def scan(self) -> list[tuple[str, Plugin | None]]:
        """Reload what changed. Returns (name, plugin or None if removed) per change."""
        found = self._files()
        changes: list[tuple[str, Plugin | None]] = []
        for name in set(self.plugins) - set(found):
            self.plugins.pop(name).close()
            log.info("plugin removed", kind=self.kind, plugin=name)
            changes.append((name, None))
        for name, (path, digest) in found.items():
            current = self.plugins.get(name)
            if current is not None and current.digest == digest:
                continue
            if current is not None:
                current.close()
            plugin = self._load(name, path, digest)
            self.plugins[name] = plugin
            changes.append((name, plugin))
        return changes

    def _files(self) -> dict[str, tuple[Path, str]]:
        if not self.directory.is_dir():
            return {}
        root = self.directory.resolve()
        found: dict[str, tuple[Path, str]] = {}
        # "policy-<name>.py" and "<name>.py" name the same plugin. By plain name order
        # which one won depended on the name's case; now the prefixed file always wins.
        paths = sorted(self.directory.iterdir(), key=lambda p: (p.name.startswith("policy-"),
                                                                 p.name))
        for path in paths:
            name = plugin_name(path)
            if name is None or not path.is_file():
                continue
            if root not in path.resolve().parents:
                log.error("plugin outside its directory refused", kind=self.kind, path=str(path))
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if name in found:
                log.error("two files name the same plugin; the first is ignored",
                          kind=self.kind, plugin=name, ignored=found[name][0].name,
                          used=path.name)
            found[name] = (path, hashlib.sha256(data).hexdigest()[:16])
        return found

    def _load(self, name: str, path: Path, digest: str) -> Plugin:
        plugin = Plugin(self.kind, name, path, digest)
        try:
            plugin.module = load_module(self.kind, name, path, digest)
            missing = [f for f in self.required if plugin.function(f) is None]
            if missing:
                raise PluginError(name, f"does not define {', '.join(f + '()' for f in missing)}")
        except (Exception, SystemExit) as exc:  # a broken plugin is reported, not fatal
            plugin.close()  # drops the module of a file missing a required function
            plugin.module = None
            plugin.error = exc.message if isinstance(exc, PluginError) else (
                f"failed to load {path.name}: {type(exc).__name__}: {exc}")
            plugin.traceback = traceback.format_exc()
            log.error("plugin failed to load", kind=self.kind, plugin=name, error=plugin.error)
        else:
            log.info("plugin loaded", kind=self.kind, plugin=name, digest=digest)
        return plugin


def load_module(kind: str, name: str, path: Path, digest: str) -> ModuleType:
    """Import ``path`` as a fresh module, with ``logger`` provided if it defines none."""
    mod_name = f"mlsysops_{kind}_{name.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(name, f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    module.logger = logs.PluginLogger(kind, name)  # type: ignore[attr-defined]
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


