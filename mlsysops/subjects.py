"""Every NATS subject, stream and bucket name of the product, written once.

The subject layout is the public contract (see ``docs/contract.md``); nothing else in the
code base spells a subject. Names that become a subject token (applications, clusters,
nodes, policies, mechanisms) are checked by :func:`check_token`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlsysops.errors import BadInput

GLOBAL_APP = "_global"
DESC_KINDS = ("app", "cluster", "node", "energy")

# A token is what NATS puts between dots. We are stricter than NATS (which only forbids
# whitespace, '.', '*' and '>') so that names also work as KV keys and Kubernetes labels.
_TOKEN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")


def check_token(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid single subject token, else raise :class:`BadInput`."""
    # fullmatch: with match, "$" also accepts a trailing newline ("app\n").
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise BadInput(
            f"{kind} name {name!r} is not a valid subject token: use 1-128 characters from "
            "letters, digits, '_' and '-', not starting with '-'",
            path=kind,
        )
    return name


@dataclass(frozen=True)
class Subjects:
    """Subject, stream and bucket names under one prefix (default ``mlsysops``)."""

    prefix: str = "mlsysops"

    # --- input -----------------------------------------------------------------------
    def desc(self, kind: str, name: str) -> str:
        return f"{self.prefix}.desc.{kind}.{name}"

    @property
    def desc_all(self) -> str:
        return f"{self.prefix}.desc.*.*"

    def desc_result(self, kind: str, name: str) -> str:
        """Where the monitor announces the outcome of every description it took in."""
        return f"{self.prefix}.desc_result.{kind}.{name}"

    @property
    def desc_result_all(self) -> str:
        return f"{self.prefix}.desc_result.*.*"

    def trigger(self, policy: str, app: str) -> str:
        return f"{self.prefix}.trigger.{policy}.{app}"

    @property
    def trigger_all(self) -> str:
        return f"{self.prefix}.trigger.*.*"

    # --- observable flow -------------------------------------------------------------
    def telemetry(self, source: str) -> str:
        return f"{self.prefix}.telemetry.{source}"

    def verdict(self, app: str, policy: str) -> str:
        return f"{self.prefix}.verdict.{app}.{policy}"

    def plan(self, app: str, policy: str) -> str:
        return f"{self.prefix}.plan.{app}.{policy}"

    def decision(self, mechanism: str) -> str:
        return f"{self.prefix}.decision.{mechanism}"

    def exec(self, mechanism: str) -> str:
        return f"{self.prefix}.exec.{mechanism}"

    def result(self, mechanism: str) -> str:
        return f"{self.prefix}.result.{mechanism}"

    def status(self, mechanism: str) -> str:
        return f"{self.prefix}.status.{mechanism}"

    def error(self, *tokens: str) -> str:
        return ".".join((self.prefix, "error", *tokens))

    def wildcard(self, family: str) -> str:
        return f"{self.prefix}.{family}.>"

    # --- JetStream streams (name -> subjects they capture) ---------------------------
    @property
    def _stream_prefix(self) -> str:
        return self.prefix.upper().replace(".", "_").replace("-", "_")

    def stream(self, family: str) -> str:
        return f"{self._stream_prefix}_{family.upper()}"

    # --- KV buckets -------------------------------------------------------------------
    def bucket(self, name: str) -> str:
        return f"{self.prefix.replace('.', '_')}-{name}"


# Stream families: name -> the subject families they capture.
STREAM_FAMILIES: dict[str, tuple[str, ...]] = {
    "telemetry": ("telemetry",),
    "verdicts": ("verdict",),
    "plans": ("plan",),
    "exec": ("exec",),
    "events": ("decision", "result", "status", "error"),
}

# The intake stream: descriptions as published, taken in by the monitors in order.
INTAKE_FAMILY = "descriptions"

# KV bucket roles.
BUCKET_DESC = "desc"          # accepted descriptions: app.<n>, cluster.<n>, node.<n>
BUCKET_CONTEXT = "context"    # policy state per (policy, app): <policy>.<app>
BUCKET_SCHED = "sched"        # scheduler: claims and per-plan decisions
BUCKET_LEDGER = "ledger"      # executor ledger: one key per (plan, mechanism)
BUCKET_STATUS = "status"      # policy, mechanism, service and telemetry status
BUCKET_LEASES = "leases"      # short-lived: leader lease, replica membership
