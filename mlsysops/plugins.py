"""Loading, reloading and calling policy and mechanism plugins.

Plugins are plain Python files in a configured directory. :class:`PluginDirectory` scans
it (files added, changed or removed are noticed on the next scan, no restart needed),
loads each file as its own module and keeps the load error with its traceback when a file
is broken, so one bad plugin never stops a service. Only files directly inside the
directory are loaded; a symlink that resolves outside it is refused.

A scan has two steps so that reloading races with nothing: :meth:`PluginDirectory.prepare`
imports what changed on a thread of its own (plugin code runs at import: a slow import
must not stall the service's event loop, which renews leases and handles messages), and
:meth:`PluginDirectory.commit` then replaces each plugin at once, on the loop. Until
then the old version serves. A changed file that fails to load leaves the old version
serving (a typo in an edit does not stop a running plugin); a removed file unloads its
plugin. A replaced version refuses new calls, lets the calls it is running finish (each
within its own deadline), then unloads.

Every call into a plugin goes through its :class:`PluginRunner`: a plain (blocking)
function runs on one of a bounded pool of threads of that plugin (``--plugin-threads``),
an ``async def`` on the plugin's own thread and event loop, so a plugin that blocks
stalls only itself. A call's deadline starts when the call starts running, not while it
waits for a thread; a call that overruns it is abandoned (:class:`CallAbandoned`, outcome
unknown), and one that cannot run because the plugin was unloaded gets
:class:`PluginUnloaded`, which is not the plugin's fault.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import math
import re
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mlsysops import logs
from mlsysops.errors import CallAbandoned, PluginError

log = logs.get(__name__)

_NAME = re.compile(r"^(?:policy-)?([A-Za-z0-9_][A-Za-z0-9_-]{0,127})\.py$")


def plugin_name(path: Path) -> str | None:
    """``policy-foo.py`` and ``foo.py`` both name ``foo``; anything else is not a plugin."""
    if path.name.startswith(("_", ".")):
        return None
    m = _NAME.fullmatch(path.name)  # fullmatch: "$" would also accept a trailing newline
    return m.group(1) if m else None


DEFAULT_THREADS = 8
IDLE_THREAD_EXIT = 60.0  # an idle pool thread ends after this long without work


class PluginUnloaded(PluginError):
    """A call that did not run, or was cut short, because its plugin was unloaded.

    Its file changed or was removed, or the service is stopping: that is not the plugin's
    doing, so it never counts towards quarantine.
    """


class UnloadedWhileRunning(PluginUnloaded, CallAbandoned):
    """A call still running when its plugin was unloaded: ended for its caller at once.

    A blocking function cannot be stopped and a cancelled coroutine may have done part of
    its work, so the outcome is unknown (for ``apply``: it may or may not have taken
    effect).
    """


class _Job:
    """One call of a plain (blocking) function, from its queueing to its end."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], label: str,
                 timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.args, self.label, self.timeout, self.loop = fn, args, label, timeout, loop
        self.started: asyncio.Future[None] = loop.create_future()  # set when it runs
        self.outcome: asyncio.Future[Any] = loop.create_future()
        self.deadline = math.inf  # time.monotonic() at which it overruns, once it runs
        self.overdue = False  # its caller abandoned it at its deadline


class _ThreadPool:
    """At most ``size`` threads that run one plugin's plain functions, in call order.

    A call waits here for a free thread without its deadline running. A thread stays
    taken until the function really returns, even after its call was abandoned (Python
    cannot stop a thread); when every thread is taken by such an overdue call, waiting is
    pointless and calls are refused at once instead.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._threads = 0
        self._idle = 0
        self._made = 0
        self._closed = False

    def submit(self, job: _Job, plugin: str) -> None:
        with self._cond:
            if self._closed:
                raise PluginUnloaded(plugin, f"{job.label}() cannot run: the plugin was unloaded")
            if self._stuck():
                raise self._stuck_error(plugin, job)
            self._queue.append(job)
            if len(self._queue) > self._idle and self._threads < self.size:
                self._threads += 1
                self._made += 1
                threading.Thread(target=self._work, name=f"plugin-{self.name}-{self._made}",
                                 daemon=True).start()
            else:
                self._cond.notify()

    def withdraw(self, job: _Job) -> None:
        """The caller stopped waiting: a call that has not started never will."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)

    def abandoned(self, job: _Job, plugin: str) -> None:
        """``job`` overran its deadline; refuse what waits if every thread is now stuck."""
        with self._cond:
            job.overdue = True
            if not self._stuck():
                return
            waiting = list(self._queue)
            self._queue.clear()
        for other in waiting:
            _post(other.loop, _settle, other.started, None, self._stuck_error(plugin, other))

    def close(self, plugin: str) -> None:
        """Unloaded: calls waiting for a thread never run; running ones end for their callers."""
        with self._cond:
            self._closed = True
            waiting, running = list(self._queue), list(self._running)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            _post(job.loop, _settle, job.started, None, PluginUnloaded(
                plugin, f"{job.label}() cannot run: the plugin was unloaded"))
        for job in running:
            _post(job.loop, _settle, job.outcome, None, UnloadedWhileRunning(
                plugin, f"{job.label}() was abandoned: the plugin was unloaded while it ran, "
                        "and its outcome is unknown"))

    def _stuck(self) -> bool:
        now = time.monotonic()
        return len(self._running) >= self.size and all(
            j.overdue or j.deadline <= now for j in self._running)

    def _stuck_error(self, plugin: str, job: _Job) -> PluginError:
        return PluginError(plugin, f"{job.label}() cannot run: all {self.size} of the "
                                   "plugin's threads are held by calls that overran their "
                                   "deadline")

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._idle += 1
                        try:
                            woken = self._cond.wait(IDLE_THREAD_EXIT)
                        finally:
                            self._idle -= 1
                        if not woken and not self._queue:
                            return
                    if self._closed:
                        return
                    job = self._queue.popleft()
                    job.deadline = time.monotonic() + job.timeout
                    self._running.add(job)
                _post(job.loop, _settle, job.started, None, None)
                result: Any = None
                error: BaseException | None = None
                try:
                    result = _call_plain(job.fn, job.args)
                except Exception as exc:
                    error = exc
                with self._cond:
                    self._running.discard(job)
                _post(job.loop, _settle, job.outcome, result, error)
                del job, result, error  # hold nothing of a finished call while idle
        finally:
            with self._cond:
                self._threads -= 1


class PluginRunner:
    """Runs one plugin's functions: plain ones on a bounded pool, async ones on a loop.

    An ``async def`` runs on the plugin's own thread and event loop; its deadline starts
    when it is handed to that loop (a coroutine that blocks the loop delays the plugin's
    other coroutines, and that delay is the plugin's own). A plain function runs on one
    of at most ``threads`` threads of the plugin; its deadline starts when it starts
    running, so calls waiting for a thread never use it up.
    """

    def __init__(self, name: str, threads: int = DEFAULT_THREADS, *,
                 plugin: str | None = None) -> None:
        if threads < 1:
            raise ValueError(f"a plugin needs at least one thread, not {threads}")
        self.name = name  # of its threads: plugin-<name>, plugin-<name>-<n>
        self.plugin = plugin or name  # named by its errors
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()  # orders starting coroutines against stop()
        self._closed = False
        self._loop_calls: set[_LoopCall] = set()  # async calls in flight
        self._pool = _ThreadPool(name, threads)
        self._thread = threading.Thread(target=self._run, name=f"plugin-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._closed = True
            # Coroutines still running when the plugin is unloaded are cancelled (their
            # callers were already told by stop()).
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float
    ) -> Any:
        """Call ``fn(*args)`` (sync or async) for the plugin, within ``timeout`` s of its start.

        Whatever the plugin raises (even ``TimeoutError``, ``SystemExit`` or
        ``KeyboardInterrupt``) is raised here as an ``Exception``; only a call that really
        overruns ``timeout`` once running gets :class:`CallAbandoned` ("exceeded its
        deadline"). A call that cannot run, or is cut short, because the plugin was
        unloaded gets :class:`PluginUnloaded`.
        """
        label = getattr(fn, "__name__", "call")
        if self._closed:
            raise PluginUnloaded(self.plugin, f"{label}() cannot run: the plugin was unloaded")
        if _is_async(fn):
            return await self._on_loop(lambda: fn(*args), label, timeout,
                                       time.monotonic() + timeout)
        result, deadline = await self._in_pool(fn, args, label, timeout)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return await self._on_loop(lambda: result, label, timeout, deadline)
        return result

    def _overran(self, label: str, timeout: float) -> CallAbandoned:
        return CallAbandoned(self.plugin, f"{label} exceeded its deadline of {timeout:g}s, "
                                          "was abandoned, and its outcome is unknown")

    async def _in_pool(self, fn: Callable[..., Any], args: tuple[Any, ...], label: str,
                       timeout: float) -> tuple[Any, float]:
        job = _Job(fn, args, label, timeout, asyncio.get_running_loop())
        self._pool.submit(job, self.plugin)
        try:
            await job.started  # waiting for a thread: no deadline yet
        except asyncio.CancelledError:
            self._pool.withdraw(job)
            raise
        try:
            done, _ = await asyncio.wait({job.outcome},
                                         timeout=max(0.0, job.deadline - time.monotonic()))
        except BaseException:  # the caller was cancelled: nobody waits for the call any more
            job.outcome.cancel()
            raise
        if not done:
            job.outcome.cancel()
            self._pool.abandoned(job, self.plugin)
            raise self._overran(label, timeout)
        return job.outcome.result(), job.deadline

    async def _on_loop(self, make: Callable[[], Any], label: str, timeout: float,
                       deadline: float) -> Any:
        caller = asyncio.get_running_loop()
        call = _LoopCall(caller, label)
        outcome = call.outcome

        def settle(task: asyncio.Task[Any]) -> None:  # on the plugin thread
            error: BaseException | None
            if task.cancelled():
                # Abandoned calls, cancelled callers and unloads (see stop) no longer
                # listen: whoever still does sees a cancellation the plugin's code raised.
                error = PluginError(self.plugin, f"{label}() was cancelled inside the plugin")
                result = None
            else:
                error = task.exception()  # read even if nobody waits any more
                result = None if error is not None else task.result()
            _post(caller, _settle, outcome, result, error)

        def start() -> None:  # on the plugin thread
            with self._lock:
                if self._closed:  # unloaded before it could start: stop() told the caller
                    return
                call.task = self._loop.create_task(_invoke(make))
            call.task.add_done_callback(settle)

        def abandon() -> None:  # on the plugin thread
            if call.task is not None:
                call.task.cancel()

        with self._lock:
            if self._closed:
                raise PluginUnloaded(self.plugin, f"{label}() cannot run: the plugin was "
                                                  "unloaded")
            self._loop_calls.add(call)
        try:
            self._loop.call_soon_threadsafe(start)
            try:
                done, _ = await asyncio.wait({outcome},
                                             timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:  # the caller was cancelled: so is the call
                outcome.cancel()
                self._abandon(abandon)
                raise
            if not done:
                outcome.cancel()
                self._abandon(abandon)
                raise self._overran(label, timeout)
            return outcome.result()
        finally:
            with self._lock:
                self._loop_calls.discard(call)

    def _abandon(self, abandon: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(abandon)
        except RuntimeError:  # loop already closed: nothing left to cancel
            pass

    def stop(self) -> None:
        """Unload: every call in flight ends for its caller now, even on a blocked loop.

        Calls that had not started never will (:class:`PluginUnloaded`); running ones
        are cancelled or, for plain functions, left to finish in their thread, and their
        callers get :class:`UnloadedWhileRunning` (outcome unknown).
        """
        with self._lock:
            self._closed = True
            calls = list(self._loop_calls)
        for call in calls:
            if call.task is None:
                error: PluginError = PluginUnloaded(
                    self.plugin, f"{call.label}() cannot run: the plugin was unloaded")
            else:
                error = UnloadedWhileRunning(
                    self.plugin, f"{call.label}() was cancelled: the plugin was unloaded "
                                 "while it ran, and its outcome is unknown")
            _post(call.caller, _settle, call.outcome, None, error)
        self._pool.close(self.plugin)
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # already stopped and closed
            pass


class _LoopCall:
    """One call of an ``async def`` on the plugin's loop; ``task`` is set once it starts."""

    def __init__(self, caller: asyncio.AbstractEventLoop, label: str) -> None:
        self.caller, self.label = caller, label
        self.outcome: asyncio.Future[Any] = caller.create_future()
        self.task: asyncio.Task[Any] | None = None


class _Escaped(Exception):
    """A ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``...) raised by plugin code.

    Carried as an ordinary exception so that it neither kills the plugin's thread nor
    escapes into the service that called the plugin.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


def _is_async(fn: Callable[..., Any]) -> bool:
    """An ``async def`` (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        type(fn).__call__)


def _call_plain(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception:
        raise
    except BaseException as exc:
        raise _Escaped(exc) from exc


async def _invoke(make: Callable[[], Any]) -> Any:
    try:
        result = make()
        if inspect.isawaitable(result):
            result = await result
        return result
    except asyncio.CancelledError:
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise _Escaped(exc) from exc


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop`` from any thread; a closed loop has nobody waiting."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


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
    threads: int = DEFAULT_THREADS  # of the pool that runs its plain functions
    runner: PluginRunner | None = field(default=None, repr=False)
    closed: bool = field(default=False, repr=False)
    retiring: bool = field(default=False, repr=False)  # replaced: ends with its last call
    calls: int = field(default=0, repr=False)  # calls in flight

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
        if self.closed:
            raise PluginUnloaded(self.name, f"{attr}() cannot run: the plugin was unloaded")
        if self.retiring:
            raise PluginUnloaded(self.name, f"{attr}() cannot run: this version of the "
                                            "plugin was replaced by a newer one")
        if self.runner is None:
            self.runner = PluginRunner(f"{self.kind}-{self.name}", self.threads,
                                       plugin=self.name)
        self.calls += 1
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
        finally:
            self.calls -= 1
            if self.retiring and not self.calls:
                self.close()

    def retire(self) -> None:
        """Replaced by a newer version: refuse new calls, unload after the last one ends.

        Calls in flight (running or waiting for a thread) go on, each within its own
        deadline, so a replacement never cuts a call short (an ``apply`` that was running
        has a known outcome). Unloading (:meth:`close`) still ends them at once.
        """
        self.retiring = True
        if not self.calls:
            self.close()

    def fail(self, error: str, tb: str = "") -> None:
        """Turn a loaded plugin into a failed one (its ``initialize()`` did not pass)."""
        self.close()
        self.module = None
        self.error, self.traceback = error, tb

    def close(self) -> None:
        self.closed = True
        if self.runner is not None:
            self.runner.stop()
        # Drop the module so that every reload does not leave one behind in sys.modules.
        if self.module is not None and sys.modules.get(self.module.__name__) is self.module:
            del sys.modules[self.module.__name__]


@dataclass
class Change:
    """A plugin file that changed since the last commit, and the version loaded from it."""

    name: str
    plugin: Plugin | None  # loaded, or failed with its error; None: the file was removed


def kept_message(error: str, failed: Plugin, kept: Plugin) -> str:
    """The load error of a changed file whose previous version goes on serving."""
    return f"{error} (version {failed.digest}; the previous version {kept.digest} still serves)"


class PluginDirectory:
    """The plugins of one kind in one directory, reloaded when files change.

    ``plugins`` holds the version serving for each name (or the failed one of a file
    that never loaded); ``rejected`` the failed version of a changed file, while the
    previous version keeps serving.
    """

    def __init__(self, kind: str, directory: str | Path, required: tuple[str, ...], *,
                 threads: int = DEFAULT_THREADS) -> None:
        self.kind = kind
        self.directory = Path(directory)
        self.required = required
        self.threads = threads  # per plugin, for its plain (blocking) functions
        self.plugins: dict[str, Plugin] = {}
        self.rejected: dict[str, Plugin] = {}
        self._retiring: list[Plugin] = []  # replaced versions finishing their calls

    def get(self, name: str) -> Plugin | None:
        plugin = self.plugins.get(name)
        return plugin if plugin is not None and plugin.loaded else None

    def loaded(self) -> dict[str, Plugin]:
        return {n: p for n, p in self.plugins.items() if p.loaded}

    def close(self) -> None:
        """Stop every plugin's thread (when the service stops)."""
        for plugin in [*self.plugins.values(), *self.rejected.values(), *self._retiring]:
            plugin.close()
        self._retiring.clear()

    def scan(self) -> list[tuple[str, Plugin | None]]:
        """Reload what changed, here and now (imports run on the calling thread).

        Returns (name, the version loaded, or None if removed) per change; the version
        serving afterwards is :meth:`get`'s. Services use :meth:`prepare` and
        :meth:`commit`, which import off the event loop.
        """
        changes = self._prepare(self._known())
        for change in changes:
            self.commit(change)
        return [(c.name, c.plugin) for c in changes]

    async def prepare(self) -> list[Change]:
        """What changed on disk, each changed file imported on a thread of its own.

        Nothing is replaced yet: the current versions serve until :meth:`commit`. Plugin
        code runs at import, and a slow import would otherwise stall the event loop.
        """
        known = self._known()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Change]] = loop.create_future()

        def deliver(changes: list[Change]) -> None:  # on the loop
            if future.done():  # the scan was cancelled (the service stops): discard them
                _discard(changes)
            else:
                future.set_result(changes)

        def fail(exc: BaseException) -> None:  # on the loop
            if not future.done():
                future.set_exception(exc)

        def run() -> None:  # on the import thread
            try:
                changes = self._prepare(known)
            except BaseException as exc:  # _load keeps plugin errors: this is a bug of ours
                _post(loop, fail, exc)
                return
            try:
                loop.call_soon_threadsafe(deliver, changes)
            except RuntimeError:  # the loop is gone
                _discard(changes)

        threading.Thread(target=run, name=f"{self.kind}-import", daemon=True).start()
        return await future

    def commit(self, change: Change) -> Plugin | None:
        """Put ``change`` in place at once; return the version serving now (None: none).

        A removed file unloads its plugin, ending its calls in flight. A new version that
        loaded replaces the old one, which finishes its calls in flight and then unloads.
        A new version that failed to load over one that serves is kept in ``rejected``,
        and the old version goes on serving.
        """
        name, new = change.name, change.plugin
        serving = self.plugins.get(name)
        rejected = self.rejected.pop(name, None)
        if rejected is not None:
            rejected.close()
        if new is None:
            self.plugins.pop(name, None)
            if serving is not None:
                serving.close()
            log.info("plugin removed", kind=self.kind, plugin=name)
            return None
        if not new.loaded and serving is not None and serving.loaded:
            self.rejected[name] = new
            log.error("changed plugin failed to load; the previous version still serves",
                      kind=self.kind, plugin=name, digest=new.digest, serving=serving.digest,
                      error=new.error)
            return serving
        self.plugins[name] = new
        if serving is not None and serving is not new:
            self._retire(serving)
        return new

    def _retire(self, plugin: Plugin) -> None:
        plugin.retire()
        self._retiring = [p for p in self._retiring if not p.closed]
        if not plugin.closed:
            self._retiring.append(plugin)

    def _known(self) -> dict[str, str]:
        """Per name, the digest of the file content already handled."""
        known = {name: plugin.digest for name, plugin in self.plugins.items()}
        known.update((name, plugin.digest) for name, plugin in self.rejected.items())
        return known

    def _prepare(self, known: dict[str, str]) -> list[Change]:
        """Read the directory and load each changed file (any thread; changes nothing)."""
        found = self._files()
        changes = [Change(name, None) for name in known if name not in found]
        for name, (path, digest) in found.items():
            if known.get(name) != digest:
                changes.append(Change(name, self._load(name, path, digest)))
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
        plugin = Plugin(self.kind, name, path, digest, threads=self.threads)
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


def _discard(changes: list[Change]) -> None:
    for change in changes:
        if change.plugin is not None:
            change.plugin.close()


def load_module(kind: str, name: str, path: Path, digest: str) -> ModuleType:
    """Import ``path`` as a fresh module, with ``logger`` provided if it defines none.

    The module's name is unique even when the same content is loaded again (a file
    reverted to the version still serving), so neither module replaces the other.
    """
    base = f"mlsysops_{kind}_{name.replace('-', '_')}_{digest}"
    mod_name, n = base, 1
    while mod_name in sys.modules:
        n += 1
        mod_name = f"{base}_{n}"
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


