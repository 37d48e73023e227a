"""Checks on every loop message before a service acts on it.

Loop messages (verdicts, plans, execution requests, telemetry) come from other services,
but anyone allowed to publish on their subjects can send anything. A message is acted on
only if it decodes as its type, nests no deeper than :data:`MAX_DEPTH`, its names are
valid subject tokens (so they are safe as KV keys and subjects), and its subject agrees
with its content. Anything else raises :class:`Refused` with a message for the operator;
the caller reports it on ``error.service.<service>`` (or ``error.telemetry.<source>``) and
terminates the message, so it is never redelivered.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from mlsysops import wire
from mlsysops.errors import BadInput, PermanentError
from mlsysops.subjects import check_token

MAX_DEPTH = 64  # free-form fields (context, commands, command); descriptions stop at 32
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")
T = TypeVar("T")


class Refused(PermanentError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def depth(value: Any) -> int:
    """How deeply lists and mappings nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((x, level + 1) for x in item)
    return deepest


def decode(codec: wire.Codec[T], data: bytes, what: str, *, max_depth: int = MAX_DEPTH) -> T:
    """``data`` as ``what``, or :class:`Refused` saying why not (never another exception)."""
    try:
        value = codec.decode(data)
    except msgspec.DecodeError as exc:
        raise Refused(f"undecodable {what}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise Refused(f"undecodable {what}: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise Refused(f"undecodable {what}: nested deeper than the limit of {max_depth} "
                      "levels") from None
    if depth(msgspec.to_builtins(value)) > max_depth:
        raise Refused(f"{what} nested deeper than the limit of {max_depth} levels")
    return value


def _name(kind: str, value: str) -> None:
    try:
        check_token(kind, value)
    except BadInput as exc:
        raise Refused(exc.message) from None


def _id(kind: str, value: str) -> None:
    if not _ID.fullmatch(value):
        raise Refused(f"{kind} {value!r} is not a valid id")


def _subject(subject: str, expected: str) -> None:
    if subject != expected:
        raise Refused(f"published on {subject!r} but its content belongs on {expected!r}")


def verdict(subject: str, data: bytes, subjects: Any) -> wire.Verdict:
    v = decode(wire.VERDICT, data, "verdict")
    _id("verdict_id", v.verdict_id)
    _name("app", v.app)
    _name("policy", v.policy)
    _subject(subject, subjects.verdict(v.app, v.policy))
    return v


def plan(subject: str, data: bytes, subjects: Any) -> wire.Plan:
    p = decode(wire.PLAN, data, "plan")
    _id("plan_id", p.plan_id)
    _name("app", p.app)
    _name("policy", p.policy)
    for mechanism in p.commands:
        _name("mechanism", mechanism)
    _subject(subject, subjects.plan(p.app, p.policy))
    return p


def exec_request(subject: str, data: bytes, subjects: Any) -> wire.ExecRequest:
    r = decode(wire.EXEC_REQUEST, data, "request")
    _id("plan_id", r.plan_id)
    _name("mechanism", r.mechanism)
    if r.exec_id != f"{r.plan_id}.{r.mechanism}":
        raise Refused(f"exec_id {r.exec_id!r} is not <plan_id>.<mechanism>")
    _subject(subject, subjects.exec(r.mechanism))
    return r


def telemetry(subject: str, data: bytes, subjects: Any, max_bytes: int) -> wire.Telemetry:
    if len(data) > max_bytes:
        raise Refused(f"telemetry snapshot of {len(data)} bytes; the limit is {max_bytes}")
    t = decode(wire.TELEMETRY, data, "telemetry")
    _name("telemetry source", t.source)
    _subject(subject, subjects.telemetry(t.source))
    return t
