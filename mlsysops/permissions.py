"""What each service needs from NATS, checked at start against the user's permissions.

The table below is the one in ``docs/security.md`` and ``deploy/nats/permissions.conf``.
At start a service asks the server for its own permissions (``$SYS.REQ.USER.INFO``, which
answers with the user's allow and deny lists and nothing else) and stops with one clear
error listing every permission it lacks, instead of failing later with a timeout or
silently receiving nothing. A server that does not answer (older than 2.10, or the user
may not publish to ``$SYS.REQ.USER.INFO``) is not checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlsysops.errors import PermanentError

USER_INFO = "$SYS.REQ.USER.INFO"


class PermissionDenied(PermanentError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Need:
    op: str  # "publish" or "subscribe"
    subject: str
    why: str


def _covers(pattern: str, subject: str) -> bool:
    """Every subject matching ``subject`` (which may hold wildcards) matches ``pattern``."""
    p, s = pattern.split(" ")[0].split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return i < len(s)
        if i >= len(s) or s[i] == ">" or (token != "*" and (s[i] == "*" or token != s[i])):
            return False
    return len(p) == len(s)


def _overlaps(pattern: str, subject: str) -> bool:
    """Some subject matches both ``pattern`` and ``subject``."""
    p, s = pattern.split(" ")[0].split("."), subject.split(".")
    for i in range(max(len(p), len(s))):
        if i >= len(p) or i >= len(s):
            return False
        if p[i] == ">" or s[i] == ">":
            return True
        if p[i] != "*" and s[i] != "*" and p[i] != s[i]:
            return False
    return True


def allowed(rules: dict[str, Any] | None, subject: str) -> bool:
    rules = rules or {}
    allow, deny = rules.get("allow"), rules.get("deny") or []
    if allow is not None and not any(_covers(a, subject) for a in allow):
        return False
    return not any(_overlaps(d, subject) for d in deny)


def needs(service: str, prefix: str) -> list[Need]:
    """The permissions ``service`` needs with subject prefix ``prefix``."""
    from mlsysops.subjects import INTAKE_FAMILY, STREAM_FAMILIES, Subjects

    s = Subjects(prefix)
    buckets = [s.bucket(b) for b in ("desc", "context", "sched", "ledger", "status", "leases")]
    names = [s.stream(f) for f in (*STREAM_FAMILIES, INTAKE_FAMILY)] + [f"KV_{b}" for b in buckets]
    layout = [Need("publish", f"$JS.API.STREAM.{op}.{name}", why) for name in names
              for op, why in (("CREATE", "to create a missing stream"),
                              ("INFO", "to bind to the streams"))]

    def watch(*roles: str) -> list[Need]:
        return [Need("publish", f"$JS.API.CONSUMER.CREATE.KV_{s.bucket(r)}", f"to watch {r}")
                for r in roles]

    def get(*roles: str) -> list[Need]:
        return [Need("publish", f"$JS.API.STREAM.MSG.GET.KV_{s.bucket(r)}", f"to read {r}")
                for r in roles]

    def put(role: str, key: str) -> Need:
        return Need("publish", f"$KV.{s.bucket(role)}.{key}", f"to write {role}")

    def durable(family: str, name: str) -> list[Need]:
        stream = s.stream(family)
        return [Need("publish", f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
                     f"to create its consumer of {stream}"),
                Need("publish", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", "to fetch"),
                Need("publish", f"$JS.ACK.{stream}.{name}.>", "to acknowledge")]

    def pub(subject: str, why: str) -> Need:
        return Need("publish", f"{prefix}.{subject}", why)

    common = [*layout, Need("subscribe", "_INBOX.>", "for replies"),
              Need("publish", f"$KV.{s.bucket('leases')}.svc.{service}.>", "for heartbeats")]
    table = {
        "monitor": [Need("subscribe", s.desc_all, "to answer description requests"),
                    *durable(INTAKE_FAMILY, "monitor"),
                    pub("desc_result.*.*", "to announce each description's outcome"),
                    Need("subscribe", s.desc_result_all, "to answer with the outcome"),
                    pub("telemetry.>", "to publish telemetry"), put("desc", ">"),
                    put("leases", "leader.monitor"), *get("desc"),
                    *watch("context"), pub("error.desc", "to report rejections")],
        "analyzer": [Need("subscribe", s.wildcard("telemetry"), "to follow telemetry"),
                     Need("subscribe", s.trigger_all, "to take triggers"),
                     pub("verdict.>", "to publish verdicts"), put("context", ">"),
                     *watch("desc", "status", "context", "leases"),
                     put("leases", "members.analyzer.>"), pub("error.policy.>", "to report")],
        "planner": [Need("subscribe", s.wildcard("telemetry"), "to follow telemetry"),
                    pub("plan.>", "to publish plans"), put("context", ">"), *get("context"),
                    *get("sched"), Need("subscribe", s.wildcard("decision"),
                                        "to learn that its plans were decided"),
                    *watch("desc", "status"), *durable("verdicts", "planner"),
                    pub("error.service.planner", "to report")],
        "scheduler": [pub("exec.>", "to publish execution requests"),
                      pub("decision.>", "to publish decisions"), put("sched", ">"),
                      *get("sched", "ledger", "desc"), *watch("desc"),
                      put("leases", "leader.scheduler"),
                      *durable("plans", "scheduler"), pub("error.service.scheduler", "to report")],
        "executor": [pub("result.>", "to publish results"), pub("status.>", "to publish status"),
                     put("ledger", ">"), put("status", "mech.>"),
                     put("status", "mechapp.>"), *get("ledger"),
                     *watch("desc", "status"), *durable("exec", "executor"),
                     pub("error.service.executor", "to report")],
    }
    return [*common, *table[service]] if service in table else []


async def check(nc: Any, service: str, prefix: str) -> None:
    """Raise :class:`PermissionDenied` naming every permission ``service`` lacks."""
    wanted = needs(service, prefix)
    if not wanted:
        return
    try:
        reply = await nc.request(USER_INFO, b"", timeout=2)
        data = json.loads(reply.data).get("data") or {}
    except Exception:
        return  # cannot tell: the server or the user does not offer it
    perms = data.get("permissions") or {}
    missing = [n for n in wanted if not allowed(perms.get(n.op), n.subject)]
    if missing:
        user = data.get("user") or "?"
        lines = "; ".join(f"{n.op} to {n.subject} ({n.why})" for n in missing)
        raise PermissionDenied(f"the NATS user {user!r} lacks the permissions the {service} "
                               f"needs: {lines} (see docs/security.md)")
