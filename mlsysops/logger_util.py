"""``from mlsysops.logger_util import logger``, for policies written for the upstream agent.

The upstream MLSysOps agent gives every policy one shared stdlib logger from this module
name. This module exists only so that such policies import unchanged; a policy written
for this framework uses the ``logger`` the loader injects, or
:func:`mlsysops.plugin_api.get_logger`.

Here ``logger`` writes through the framework's structured logging
(:class:`mlsysops.logs.PluginLogger`): each line is bound to the plugin that logged it,
found from the calling module, exactly as the injected logger binds it. Stdlib-style
calls work (``logger.info("moved %s", c)``, f-strings, ``exc_info=True``), as do
upstream's extra ``logger.test(...)`` and ``logger.log(level, ...)``. Any other
attribute (``setLevel``, ``handlers``, ...) is that of a stdlib logger named
``mlsysops.upstream``, so that configuring it is harmless and changes nothing here.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from mlsysops.logs import LevelMethods, PluginLogger

__all__ = ["logger"]

# The module names the plugin loader gives plugins: mlsysops_<kind>_<name>_<digest>.
_PLUGIN_MODULE = re.compile(r"^mlsysops_(policy|mechanism)_")
_NAME = re.compile(r"^(?:policy-)?(.+)\.py$")
_MAX_CACHED = 512  # one logger per calling module; reloads make new module names
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}


class UpstreamLogger(LevelMethods):
    """The upstream agent's shared ``logger``, writing as the calling plugin's logger."""

    def __init__(self) -> None:
        self._by_module: dict[str, PluginLogger] = {}
        self._lock = threading.Lock()

    def _target(self, frame: FrameType | None) -> PluginLogger:
        module = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
        found = self._by_module.get(module)
        if found is not None:
            return found
        with self._lock:
            if len(self._by_module) >= _MAX_CACHED:
                self._by_module.clear()
            found = self._by_module.setdefault(module, _logger_for(module, frame))
        return found

    def _emit(self, level: str, msg: object, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        getattr(self._target(sys._getframe(2)), level)(msg, *args, **kw)

    def exception(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("exception", msg, args, kw)

    fatal = LevelMethods.critical

    def test(self, msg: object, *args: Any, **kw: Any) -> None:
        """Upstream's TEST level (its test traces): logged at info, marked ``upstream_level``."""
        kw.setdefault("upstream_level", "test")
        self._emit("info", msg, args, kw)

    def log(self, level: int, msg: object, *args: Any, **kw: Any) -> None:
        name = _LEVELS.get(level) or ("debug" if level < logging.INFO else "critical")
        self._emit(name, msg, args, kw)

    def isEnabledFor(self, level: int) -> bool:
        return True  # the structured logger filters by --log-level itself

    def __getattr__(self, name: str) -> Any:
        return getattr(logging.getLogger("mlsysops.upstream"), name)


def _logger_for(module: str, frame: FrameType | None) -> PluginLogger:
    """The injected logger's twin for a plugin module; else one named after the module."""
    kind = _PLUGIN_MODULE.match(module)
    file = frame.f_globals.get("__file__") if frame is not None else None
    if kind and isinstance(file, str) and (name := _NAME.match(Path(file).name)):
        return PluginLogger(kind.group(1), name.group(1))
    return PluginLogger("module", module or "unknown")


logger = UpstreamLogger()
