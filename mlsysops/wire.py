"""Wire types: every message and every KV record exchanged between services.

One module, as msgspec recommends: encoders and decoders are built once at import, new
fields always get defaults, no field ever changes type, and unknown fields are ignored
(never ``forbid_unknown_fields`` between services), so that services of different
versions can run side by side during a rolling upgrade.

Everything is JSON on the wire so that operators can read it with the ``nats`` CLI.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Generic, Literal, TypeVar

import msgspec

JSON = Any  # plain, JSON-serialisable data (dicts, lists, str, numbers, bools, None)


def now() -> float:
    """Wall-clock time in seconds; the single place that reads the clock for records."""
    return time.time()


# --------------------------------------------------------------------------- telemetry
class Sample(msgspec.Struct, omit_defaults=True):
    metric: str
    value: float
    labels: dict[str, str] = {}
    ts: float = 0.0


class QueryError(msgspec.Struct):
    """A metric or PromQL expression that could not be collected, and who asked for it."""

    query: str
    message: str
    policies: list[str] = []


class Telemetry(msgspec.Struct):
    """One snapshot from one telemetry source (``host``, ``prometheus``, ...)."""

    id: str
    source: str
    collected_at: float
    samples: list[Sample] = []
    errors: list[QueryError] = []


# --------------------------------------------------------------------------- descriptions
class FieldError(msgspec.Struct):
    path: str
    message: str


class DescReply(msgspec.Struct):
    """Reply to a description published with a reply subject (and the body of a rejection)."""

    accepted: bool
    kind: str
    name: str
    errors: list[FieldError] = []
    warnings: list[FieldError] = []
    deleted: bool = False
    revision: int = 0
    # position of the description in the intake stream: descriptions take effect in this
    # order, whichever monitor validates them (0: not taken in yet)
    seq: int = 0
    # blake2b of the payload as published (matches a reply to its request)
    digest: str = ""
    # True: taken in durably but not yet validated when the reply had to go (a backlog);
    # its outcome follows on ``desc_result.<kind>.<name>``
    queued: bool = False


class StoredDescription(msgspec.Struct):
    """An accepted description as kept in the ``desc`` bucket."""

    kind: str
    name: str
    spec: dict[str, Any]
    accepted_at: float
    digest: str = ""
    # one lifetime of the description: new when the key did not exist or was deleted,
    # kept on updates; ids derived from it never repeat for an application published again
    generation: str = ""
    # intake-stream sequence of the publication stored; a lower one never replaces it
    seq: int = 0


# --------------------------------------------------------------------------- the loop
class Verdict(msgspec.Struct):
    """A positive analysis result: the policy wants a plan for this application."""

    verdict_id: str
    app: str
    policy: str
    created_at: float
    context: dict[str, Any] = {}
    trigger: str = "interval"
    # digest of the policy file that made the verdict ("" from an older analyzer)
    policy_digest: str = ""


class Plan(msgspec.Struct):
    """A configuration plan: one command per mechanism."""

    plan_id: str
    app: str
    policy: str
    created_at: float
    commands: dict[str, Any] = {}
    core: bool = False
    verdict_id: str = ""


class Decision(msgspec.Struct, tag="decision"):
    plan_id: str
    mechanism: str
    outcome: Literal["scheduled", "discarded"]
    app: str = ""
    policy: str = ""
    reason: str = ""
    holder: str | None = None
    conflict_key: str = ""  # the keys below joined by "," (kept for older readers)
    decided_at: float = 0.0
    conflict_keys: list[str] = []  # every key the command claims (all or none)


class ExecRequest(msgspec.Struct):
    exec_id: str
    plan_id: str
    mechanism: str
    command: Any
    app: str = ""
    policy: str = ""
    conflict_key: str = ""
    scheduled_at: float = 0.0
    conflict_keys: list[str] = []


# "unknown": the apply was interrupted (its executor died) or abandoned at its deadline;
# it may or may not have taken effect. Like "failed" it is terminal and is not retried.
Outcome = Literal["applied", "failed", "unknown"]


class ExecResult(msgspec.Struct, tag="result"):
    plan_id: str
    mechanism: str
    outcome: Outcome
    app: str = ""
    policy: str = ""
    error: str = ""
    duration: float = 0.0
    finished_at: float = 0.0
    executor: str = ""


class MechanismStatus(msgspec.Struct, tag="status"):
    mechanism: str
    state: Any = None
    options: Any = None
    error: str = ""
    updated_at: float = 0.0
    executor: str = ""
    # True: ``state["applications"]`` is kept per application (``MechanismPiece``), not here
    pieces: bool = False
    # why the last status could not be stored in full (policies see the previous one)
    store_error: str = ""


class MechanismPiece(msgspec.Struct, tag="piece"):
    """One application's part of a mechanism's status, kept under its own key so that no
    message grows with the fleet."""

    mechanism: str
    app: str
    state: Any = None
    updated_at: float = 0.0


class ErrorEvent(msgspec.Struct, tag="error"):
    """Something went wrong that an operator should see (also kept in ``status``)."""

    kind: str  # desc | policy | mechanism | telemetry | service
    name: str
    message: str
    traceback: str = ""
    app: str = ""
    at: float = 0.0
    details: dict[str, Any] = {}


Event = Decision | ExecResult | MechanismStatus | ErrorEvent


# --------------------------------------------------------------------------- KV records
class ContextRecord(msgspec.Struct):
    """Policy state of one (policy, app), shared by analyzer and planner.

    ``inflight`` holds the id of a verdict whose plan has not been made yet; while it is
    set no new analysis runs for the pair. ``outbox`` holds a verdict or plan that was
    decided but maybe not yet published, so a crash between the two never loses it.
    """

    context: dict[str, Any] = {}
    inflight: str | None = None
    inflight_since: float = 0.0
    outbox_verdict: Verdict | None = None
    outbox_plan: Plan | None = None
    last_eval: float = 0.0
    last_verdict: bool | None = None
    last_plan_id: str | None = None
    evaluations: int = 0
    policy_digest: str = ""
    noops: int = 0  # plans that came back empty (nothing published)
    # the StoredDescription.generation this record was made for ("" for _global); a record
    # of another generation is an earlier application of the same name: treated as absent
    generation: str = ""
    # the context before plan() ran, while the plan in the outbox awaits its decisions:
    # if the scheduler discards every command, this one is kept instead of plan()'s
    prior_context: dict[str, Any] | None = None


class Claim(msgspec.Struct):
    """A mechanism (or one conflict key of it) held by a scheduled plan.

    It holds until the execution has a terminal result in the ledger, or until
    ``--exec-timeout`` after the execution started. ``expires_at`` is 0 (kept for older
    readers, who took it as the end of the claim).
    """

    plan_id: str
    mechanism: str
    conflict_key: str
    since: float
    expires_at: float = 0.0


class SetAside(msgspec.Struct):
    """A plan the scheduler could not handle after bounded redelivery (a dead letter).

    Kept under ``aside.<plan_id>`` in the ``sched`` bucket and shown by ``mlsysops
    status``; the plan stream moved on past it.
    """

    plan_id: str
    app: str
    policy: str
    reason: str
    attempts: int
    at: float


class PlanDecisions(msgspec.Struct):
    """What the scheduler decided for one plan (so a redelivery decides the same)."""

    plan_id: str
    decisions: list[Decision] = []
    requests: list[ExecRequest] = []


class LedgerEntry(msgspec.Struct):
    """Execution ledger of one (plan, mechanism): makes ``apply`` happen at most once."""

    state: Literal["started", "applied", "failed", "unknown"]
    plan_id: str
    mechanism: str
    executor: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""


class PolicyStatus(msgspec.Struct):
    policy: str
    app: str
    last_verdict: bool | None = None
    last_eval_at: float = 0.0
    last_error: str = ""
    failures: int = 0
    quarantined: bool = False
    last_plan_id: str | None = None
    noops: int = 0
    updated_at: float = 0.0


class PluginStatus(msgspec.Struct):
    """Load state of one plugin file, as seen by one service."""

    kind: Literal["policy", "mechanism"]
    name: str
    loaded: bool
    path: str = ""
    error: str = ""
    traceback: str = ""
    service: str = ""
    updated_at: float = 0.0


class ServiceHeartbeat(msgspec.Struct):
    service: str
    instance: str
    started_at: float
    updated_at: float
    role: str = ""  # e.g. "active" / "standby" for the scheduler
    info: dict[str, Any] = {}


# --------------------------------------------------------------------------- codecs
_enc = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _enc.encode(obj)


T = TypeVar("T")


class Codec(Generic[T]):
    """A decoder for one type, built once and reused."""

    def __init__(self, typ: type[T]) -> None:
        self._dec: msgspec.json.Decoder[T] = msgspec.json.Decoder(typ)

    def decode(self, data: bytes) -> T:
        return self._dec.decode(data)


EVENT: Codec[Event] = Codec(Event)  # type: ignore[arg-type]
TELEMETRY = Codec(Telemetry)
VERDICT = Codec(Verdict)
PLAN = Codec(Plan)
EXEC_REQUEST = Codec(ExecRequest)
CONTEXT_RECORD = Codec(ContextRecord)
CLAIM = Codec(Claim)
PLAN_DECISIONS = Codec(PlanDecisions)
SET_ASIDE = Codec(SetAside)
LEDGER = Codec(LedgerEntry)
POLICY_STATUS = Codec(PolicyStatus)
PLUGIN_STATUS = Codec(PluginStatus)
HEARTBEAT = Codec(ServiceHeartbeat)
STORED_DESC = Codec(StoredDescription)
DESC_REPLY = Codec(DescReply)
MECH_STATUS = Codec(MechanismStatus)
MECH_PIECE = Codec(MechanismPiece)
ERROR_EVENT = Codec(ErrorEvent)


def payload_digest(data: bytes) -> str:
    """``DescReply.digest``: matches an announced outcome to the publication it is for."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def make_id(kind: str, *parts: object) -> str:
    """A deterministic id: the same inputs give the same id, so a redelivery is harmless.

    Safe as a KV key token and as a Nats-Msg-Id (hex after a one-letter kind).
    """
    import hashlib

    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=10).hexdigest()
    return f"{kind}-{digest}"


def context_key(policy: str, app: str) -> str:
    """Key of a (policy, app) context record in the ``context`` bucket."""
    return f"{policy}.{app}"
