"""Configuration of every service: one table of options, read from flags and environment.

Each option has a flag (``--nats-url``) and an environment variable (``MLSYSOPS_NATS_URL``);
a flag wins over the environment, which wins over the default. The same table builds the
argument parser of every service and of ``mlsysops up``, so a setting is spelled once.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from mlsysops.errors import BadInput
from mlsysops.intervals import parse_duration

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY_DIR = ROOT / "plugins" / "policies"
DEFAULT_MECHANISM_DIR = ROOT / "plugins" / "mechanisms"

_URL_CREDENTIALS = re.compile(r"(\w+://)[^@/\s,]+@")
SECRET_FIELDS = frozenset({"nats_password", "nats_token"})


def _opt(default: object, help: str, *, secret: bool = False, kind: str = "") -> object:
    return field(default=default, metadata={"help": help, "secret": secret, "kind": kind})


@dataclass
class Settings:
    """Every setting of the product, with its default. Durations are in seconds."""

    nats_url: str = _opt("nats://127.0.0.1:4222", "NATS server URL(s), comma separated")  # type: ignore[assignment]
    prefix: str = _opt("mlsysops", "subject prefix of every subject")  # type: ignore[assignment]
    policy_dir: str = _opt(str(DEFAULT_POLICY_DIR), "directory of policy plugins")  # type: ignore[assignment]
    mechanism_dir: str = _opt(str(DEFAULT_MECHANISM_DIR), "directory of mechanism plugins")  # type: ignore[assignment]
    http_port: int = _opt(-1, "port of /metrics, /healthz, /readyz (-1: service default, 0: off)")  # type: ignore[assignment]
    http_host: str = _opt("0.0.0.0", "address the HTTP endpoint binds")  # type: ignore[assignment]
    log_format: str = _opt("console", "log format: console or json")  # type: ignore[assignment]
    log_level: str = _opt("info", "log level: debug, info, warning, error")  # type: ignore[assignment]
    ml_connector_url: str = _opt("", "ML connector endpoint handed to policies (empty: None)")  # type: ignore[assignment]
    exec_timeout: float = _opt(  # type: ignore[assignment]
        30.0, "how long a claim holds after its execution started, if no result comes",
        kind="duration")
    call_timeout: float = _opt(10.0, "deadline of one policy or mechanism call", kind="duration")  # type: ignore[assignment]
    apply_timeout: float = _opt(25.0, "deadline of one mechanism apply", kind="duration")  # type: ignore[assignment]
    quarantine_after: int = _opt(5, "consecutive failures after which a policy is quarantined")  # type: ignore[assignment]
    plugin_threads: int = _opt(  # type: ignore[assignment]
        8, "threads per plugin that run its plain (non-async) functions concurrently")
    telemetry_interval: float = _opt(  # type: ignore[assignment]
        5.0, "default telemetry period when no policy asks", kind="duration")
    telemetry_retention: float = _opt(3600.0, "how long telemetry history is kept", kind="duration")  # type: ignore[assignment]
    telemetry_history: int = _opt(60, "snapshots of history handed to policies")  # type: ignore[assignment]
    prometheus_url: str = _opt("", "Prometheus URL (empty: built-in host source)")  # type: ignore[assignment]
    grafana_url: str = _opt(  # type: ignore[assignment]
        "", "Grafana URL for upstream policies: telemetry['grafana_endpoint'] (empty: None)")
    status_interval: float = _opt(10.0, "period of mechanism get_status", kind="duration")  # type: ignore[assignment]
    dedup_window: float = _opt(  # type: ignore[assignment]
        600.0, "JetStream duplicate window of the loop streams", kind="duration")
    max_payload: int = _opt(1_048_576, "largest description accepted, in bytes")  # type: ignore[assignment]
    storage: str = _opt("file", "JetStream storage of streams: file or memory")  # type: ignore[assignment]
    stream_replicas: int = _opt(  # type: ignore[assignment]
        1, "replicas of every stream and bucket (3 on a three-node NATS cluster)")
    stream_max_age: float = _opt(  # type: ignore[assignment]
        7 * 86400.0, "how long verdicts, plans, requests, events and per-plan records are kept",
        kind="duration")
    stream_max_bytes: int = _opt(  # type: ignore[assignment]
        1 << 30, "largest size of each stream in bytes, oldest messages dropped first (-1: none)")
    kv_max_bytes: int = _opt(  # type: ignore[assignment]
        1 << 30, "largest size of each KV bucket in bytes; a full bucket refuses writes (-1: none)")
    instance: str = _opt("", "instance name of this replica (default: host-pid)")  # type: ignore[assignment]
    kube_api_url: str = _opt(  # type: ignore[assignment]
        "", "Kubernetes API URL for mechanisms (empty: in-cluster, else kubeconfig)")
    # NATS authentication and TLS
    nats_user: str = _opt("", "NATS user")  # type: ignore[assignment]
    nats_password: str = _opt("", "NATS password", secret=True)  # type: ignore[assignment]
    nats_token: str = _opt("", "NATS token", secret=True)  # type: ignore[assignment]
    nats_nkey_seed: str = _opt("", "file holding an NKey seed")  # type: ignore[assignment]
    nats_creds: str = _opt("", "NATS credentials file (JWT + seed)")  # type: ignore[assignment]
    nats_tls_ca: str = _opt("", "CA bundle that signs the NATS server certificate")  # type: ignore[assignment]
    nats_tls_cert: str = _opt("", "client certificate for NATS mutual TLS")  # type: ignore[assignment]
    nats_tls_key: str = _opt("", "client key for NATS mutual TLS")  # type: ignore[assignment]

    def redacted(self) -> dict[str, object]:
        """The settings as a dict with every secret replaced, for logs and status."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif isinstance(value, str) and "@" in value:
                value = _URL_CREDENTIALS.sub(r"\1***@", value)  # nats://user:pass@host
            out[f.name] = value
        return out

    def environment(self) -> dict[str, str]:
        """Every setting as ``MLSYSOPS_*`` variables, secrets included (for child processes)."""
        return {env_name(f.name): str(getattr(self, f.name)) for f in fields(self)}


def redact_url(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced (nats://user:pass@host)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def env_name(name: str) -> str:
    return "MLSYSOPS_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so that unset flags fall through."""
    for f in fields(Settings):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})",
        )


def source(name: str) -> str:
    """How a user sets ``name``: its flag and its environment variable."""
    return f"{flag_name(name)} / {env_name(name)}"


def _convert(name: str, raw: str, default: object, kind: str) -> object:
    try:
        if kind == "duration":
            # A bare number is seconds, but goes through the same checks as "10s": no
            # negative, NaN or infinite durations, and no zero (a hot loop or no deadline).
            seconds = parse_duration(float(raw) if _is_number(raw) else raw, what=name)
            if seconds <= 0:
                raise BadInput(f"{raw!r} must be longer than zero", path=name)
            return seconds
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (ValueError, BadInput) as exc:
        raise BadInput(f"{source(name)}: {raw!r} is not a valid value: {exc}", path=name) from None
    return raw


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def load(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from parsed flags, then environment, then defaults."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Settings):
        # An unset or empty flag falls through to the environment, then to the default
        # (empty counts as unset unless the default itself is empty).
        for raw in (getattr(args, f.name, None) if args is not None else None,
                    env.get(env_name(f.name))):
            if raw is None or (raw == "" and f.default != ""):
                continue
            values[f.name] = _convert(f.name, str(raw), f.default, f.metadata["kind"])
            break
    settings = Settings(**values)  # type: ignore[arg-type]
    _check(settings)
    return settings


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Smallest and largest accepted value of the integer settings.
INT_RANGES = {"http_port": (-1, 65535), "quarantine_after": (1, None),
              "telemetry_history": (0, None), "max_payload": (1, None),
              "plugin_threads": (1, 256), "stream_replicas": (1, 5),
              "stream_max_bytes": (-1, None), "kv_max_bytes": (-1, None)}


def _check(s: Settings) -> None:
    def bad(name: str, message: str) -> BadInput:
        return BadInput(f"{source(name)} {message}", path=name)

    if s.log_format not in ("console", "json"):
        raise bad("log_format", f"must be console or json, not {s.log_format!r}")
    if s.log_level.lower() not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {s.log_level!r}")
    if s.storage not in ("file", "memory"):
        raise bad("storage", f"must be file or memory, not {s.storage!r}")
    for name, (low, high) in INT_RANGES.items():
        value = getattr(s, name)
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise bad(name, f"must be {span}, not {value}")
    from mlsysops.subjects import check_token

    for token in s.prefix.split("."):
        try:
            check_token("subject prefix", token)
        except BadInput as exc:
            raise bad("prefix", f"{s.prefix!r} is not valid: {exc.message}") from None


def parse(argv: Sequence[str] | None, description: str) -> Settings:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    return load(parser.parse_args(argv))
