"""Structured logging for services and plugins.

One line per event, JSON or console, with ``service``/``instance`` bound globally and
``plan_id``/``app``/``policy`` bound by the code handling a message. Plugins written as
in the seeds call ``logger.info('component %s', name)`` (stdlib style) and sometimes pass
arguments without a placeholder; :class:`PluginLogger` accepts both without raising.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import structlog


def configure(fmt: str = "console", level: str = "info", **bound: Any) -> None:
    """Configure structlog (and the stdlib root logger it forwards to) once per process."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


def get(name: str) -> Any:
    return structlog.get_logger(name)


class LevelMethods:
    """The standard library's level methods, each handing ``(level, msg, args, kw)`` to
    ``self._emit``: shared by the loggers handed to plugins."""

    def _emit(self, level: str, msg: object, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        raise NotImplementedError

    def debug(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("debug", msg, args, kw)

    def info(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("info", msg, args, kw)

    def warning(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("warning", msg, args, kw)

    warn = warning

    def error(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("error", msg, args, kw)

    def critical(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("critical", msg, args, kw)


class PluginLogger(LevelMethods):
    """The ``logger`` injected into plugins: stdlib-style calls, structlog output."""

    def __init__(self, kind: str, name: str) -> None:
        self._log = structlog.get_logger("plugin").bind(**{kind: name})

    @staticmethod
    def _format(msg: object, args: tuple[Any, ...]) -> str:
        text = _safe(str, msg)
        if not args:
            return text
        # As the stdlib does, a single mapping argument feeds "%(key)s" placeholders (but
        # only when there are some: "text " % {...} would silently drop the argument).
        values: Any = args
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0] and "%(" in text:
            values = args[0]
        try:
            return text % values
        except Exception:  # a bad format never fails the plugin
            return " ".join([text, *(_safe(repr, a) for a in args)])

    def _emit(self, level: str, msg: object, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        """Log like the stdlib does: whatever the arguments, never raise into the plugin."""
        exc_info = kw.pop("exc_info", None)
        kw.pop("stack_info", None)
        kw.pop("stacklevel", None)
        extra = kw.pop("extra", None)
        fields = {**(extra if isinstance(extra, Mapping) else {}), **kw}
        fields = {str(k): v for k, v in fields.items()}
        if "event" in fields:  # structlog's own positional name for the message
            fields["event_"] = fields.pop("event")
        if exc_info:
            fields["exc_info"] = exc_info
        text = self._format(msg, args)
        method = getattr(self._log, level)
        try:
            method(text, **fields)
        except Exception:  # e.g. a field whose repr() raises
            try:
                method(text)
            except Exception:
                pass

    def exception(self, msg: object, *args: Any, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._emit("error", msg, args, kw)


def _safe(render: Callable[[object], str], value: object) -> str:
    try:
        return render(value)
    except Exception:  # an object whose str()/repr() raises
        return f"<{type(value).__name__} object (unprintable)>"
