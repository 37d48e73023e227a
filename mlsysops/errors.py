"""Errors that carry their meaning for the caller.

As in kopf: an error says whether trying again can help. :class:`TemporaryError` is
retried after ``delay``; :class:`PermanentError` is reported and absorbed, never retried.
:class:`BadInput` is a permanent error about something a user sent, with the field path.
"""

from __future__ import annotations


class MlsysopsError(Exception):
    """Base class of every error this package raises on purpose."""


class TemporaryError(MlsysopsError):
    """Something that may work later (broker unreachable, a claim still held)."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(MlsysopsError):
    """Something no retry can fix; report it and move on."""


class BadInput(PermanentError):
    """A user input is wrong. ``path`` names the offending field (``$`` for the whole)."""

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class PluginError(PermanentError):
    """A plugin failed to load, raised, hung or returned something unusable."""

    def __init__(self, plugin: str, message: str, *, traceback: str = "") -> None:
        super().__init__(f"{plugin}: {message}")
        self.plugin = plugin
        self.message = message
        self.traceback = traceback


class CallAbandoned(PluginError):
    """A plugin call overran its deadline and was abandoned: its outcome is unknown.

    The call may still finish (a thread cannot be stopped), so for ``apply`` this is not
    a failure: the command may or may not have taken effect.
    """
