"""The state layout in JetStream (streams and KV buckets), and who may change it.

One owner of configuration: ``mlsysops init`` (run by ``mlsysops up`` and by the chart's
pre-install/pre-upgrade Job) creates what is missing and changes what differs from the
settings, reporting each difference. A service creates only what is missing (the first
service on a fresh server, say in a test) and never changes an existing stream or bucket:
a difference is logged with what differs and that ``mlsysops init`` applies it. Read-only
commands (``mlsysops status``, ``plans``) create and change nothing: without a layout
they say that no control plane was found under the prefix.

Every stream and bucket has the same replicas (``--stream-replicas``) and is bounded:
loop streams by age (``--stream-max-age``, telemetry by ``--telemetry-retention``) and
size (``--stream-max-bytes``, the oldest messages go first); buckets of state (one entry
per application, policy, mechanism or replica) by size (``--kv-max-bytes``) and history;
per-plan records by age, ``--stream-max-age`` like the streams that could still deliver
their plan (decisions by a per-key TTL, the ledger by its bucket TTL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import nats.js.api as api
import nats.js.errors as jserr
from nats.js import JetStreamContext

from mlsysops import logs, subjects
from mlsysops.errors import BadInput
from mlsysops.settings import Settings
from mlsysops.subjects import Subjects

log = logs.get(__name__)

Mode = Literal["init", "service", "read"]
# the fields compared between what exists and what the settings ask for
_COMPARED = ("subjects", "retention", "max_age", "max_bytes", "max_msgs_per_subject",
             "num_replicas", "duplicate_window", "max_msg_size", "storage", "no_ack",
             "discard")
_FIXED = ("storage", "retention")  # NATS refuses to change these on an existing stream
# buckets: (role, history, what bounds it). "state": one entry per application, policy,
# mechanism or replica, bounded by --kv-max-bytes (full: writes are refused, loudly);
# "per plan": records that grow with the plan rate, bounded by age instead (a byte limit
# would refuse the scheduler's and executor's writes): the ledger by its bucket TTL, the
# scheduler's decision records by a per-key TTL (its claims: one per conflict key)
BUCKETS = ((subjects.BUCKET_DESC, 5, "state"), (subjects.BUCKET_CONTEXT, 1, "state"),
           (subjects.BUCKET_SCHED, 1, "per plan"), (subjects.BUCKET_LEDGER, 1, "per plan"),
           (subjects.BUCKET_STATUS, 1, "state"), (subjects.BUCKET_LEASES, 1, "state"))


class NoControlPlane(BadInput):
    """Nothing of the layout exists under the prefix (wrong ``--prefix``, or not set up)."""


@dataclass
class Change:
    """One stream or bucket that was created, changed, or differs from the settings."""

    name: str
    action: Literal["created", "updated", "differs", "cannot change"]
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field: (now, wanted)

    def __str__(self) -> str:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(self.fields.items()))
        return f"{self.name}: {self.action}" + (f" ({what})" if what else "")


def streams(s: Settings) -> list[api.StreamConfig]:
    """The loop's streams as the settings want them."""
    sub = Subjects(s.prefix)
    storage = _storage(s)
    max_msg = max(s.max_payload * 2, 1_048_576)
    out = []
    for family, families in subjects.STREAM_FAMILIES.items():
        age = s.telemetry_retention if family == "telemetry" else s.stream_max_age
        out.append(api.StreamConfig(
            name=sub.stream(family), subjects=[sub.wildcard(f) for f in families],
            storage=storage, retention=api.RetentionPolicy.LIMITS, max_age=age,
            max_bytes=s.stream_max_bytes, duplicate_window=min(s.dedup_window, age),
            max_msg_size=max_msg, num_replicas=s.stream_replicas, allow_direct=True,
            discard=api.DiscardPolicy.OLD))
    # descriptions as published, until a monitor has taken them in (see the monitor): a
    # work queue capturing the description subjects; no_ack, so a request's reply is the
    # monitor's verdict and never a JetStream acknowledgement
    out.append(api.StreamConfig(
        name=sub.stream(subjects.INTAKE_FAMILY), subjects=[sub.desc_all], storage=storage,
        retention=api.RetentionPolicy.WORK_QUEUE, no_ack=True, max_age=s.stream_max_age,
        duplicate_window=min(s.dedup_window, s.stream_max_age),
        max_bytes=s.stream_max_bytes, max_msg_size=max_msg, num_replicas=s.stream_replicas,
        allow_direct=True, discard=api.DiscardPolicy.OLD))
    return out


def buckets(s: Settings) -> list[tuple[str, api.KeyValueConfig]]:
    sub = Subjects(s.prefix)
    return [(role, api.KeyValueConfig(
        bucket=sub.bucket(role), history=history,
        ttl=s.stream_max_age if role == subjects.BUCKET_LEDGER else None,
        storage=_storage(s), replicas=s.stream_replicas,
        max_bytes=s.kv_max_bytes if bound == "state" else -1, direct=True))
        for role, history, bound in BUCKETS]


def _storage(s: Settings) -> api.StorageType:
    return api.StorageType.FILE if s.storage == "file" else api.StorageType.MEMORY


def _bucket_stream(cfg: api.KeyValueConfig) -> dict[str, Any]:
    """The fields of a bucket's underlying stream that its KV config decides."""
    return {"max_msgs_per_subject": cfg.history, "max_age": cfg.ttl or 0.0,
            "max_bytes": cfg.max_bytes, "num_replicas": cfg.replicas, "storage": cfg.storage}


def _differences(have: api.StreamConfig, want: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for key, wanted in want.items():
        current = getattr(have, key, None)
        if key == "subjects":
            current, wanted = sorted(current or []), sorted(wanted or [])
        if key in ("max_age", "duplicate_window"):
            current, wanted = round(current or 0.0, 3), round(wanted or 0.0, 3)
        if key in ("max_bytes", "max_msgs_per_subject") and (wanted or -1) < 0:
            current, wanted = current if (current or -1) >= 0 else -1, -1
        if key == "no_ack":
            current, wanted = bool(current), bool(wanted)
        if current != wanted:
            out[key] = (current, wanted)
    return out


async def reconcile(js: JetStreamContext, s: Settings, mode: Mode) -> list[Change]:
    """Bring the layout to the settings as far as ``mode`` may (see the module doc)."""
    changes: list[Change] = []
    found = 0
    for cfg in streams(s):
        want = {k: getattr(cfg, k) for k in _COMPARED}
        change, existed = await _one(js, cfg.name or "", want, mode,
                                     create=lambda c=cfg: js.add_stream(c),
                                     update=lambda c=cfg: js.update_stream(c))
        found += existed
        changes += [change] if change else []
    for _, kv in buckets(s):
        name = f"KV_{kv.bucket}"
        change, existed = await _one(js, name, _bucket_stream(kv), mode,
                                     create=lambda c=kv: js.create_key_value(c),
                                     update=lambda n=name, c=kv: _update_bucket(js, n, c))
        found += existed
        changes += [change] if change else []
    if mode == "read" and not found:
        raise NoControlPlane(f"no control plane found under prefix {s.prefix!r}: no stream "
                             f"or bucket of it exists on this server (a wrong --prefix? "
                             f"not set up yet: run `mlsysops init`)")
    return changes


async def _one(js: JetStreamContext, name: str, want: dict[str, Any], mode: Mode, *,
               create: Any, update: Any) -> tuple[Change | None, bool]:
    try:
        info = await js.stream_info(name)
    except jserr.NotFoundError:
        if mode == "read":
            return None, False
        try:
            await create()
        except jserr.BadRequestError as exc:  # created meanwhile by another process
            if exc.err_code != 10058:
                raise
            return None, True
        log.info("created", stream=name)
        return Change(name, "created"), False
    diff = _differences(info.config, want)
    if not diff:
        return None, True
    if mode != "init":
        log.warning("differs from the settings; `mlsysops init` applies it", stream=name,
                    differences={k: f"{a!r} -> {b!r}" for k, (a, b) in diff.items()})
        return Change(name, "differs", diff), True
    fixed = {k: v for k, v in diff.items() if k in _FIXED}
    if fixed:
        return Change(name, "cannot change", fixed), True
    await update()
    return Change(name, "updated", diff), True


async def _update_bucket(js: JetStreamContext, name: str, kv: api.KeyValueConfig) -> None:
    info = await js.stream_info(name)
    cfg = info.config
    for key, value in _bucket_stream(kv).items():
        setattr(cfg, key, value)
    await js.update_stream(cfg)
