"""Settings (flags > environment > defaults), subject tokens and subject names."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import Any

import pytest

from mlsysops import settings as settings_mod
from mlsysops.errors import BadInput
from mlsysops.intervals import parse_duration
from mlsysops.settings import SECRET_FIELDS, Settings, env_name, flag_name, load
from mlsysops.subjects import (
    BUCKET_CONTEXT,
    BUCKET_DESC,
    BUCKET_LEASES,
    BUCKET_LEDGER,
    BUCKET_SCHED,
    BUCKET_STATUS,
    GLOBAL_APP,
    STREAM_FAMILIES,
    Subjects,
    check_token,
)


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    return parser.parse_args(list(argv))


def bad_input(args: argparse.Namespace | None = None, /, **env: str) -> BadInput:
    with pytest.raises(BadInput) as info:
        load(args, env=env)
    return info.value


# ================================================================ precedence


def test_defaults_without_flags_or_environment() -> None:
    assert load(None, env={}) == Settings()
    s = load(flags(), env={})
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.prefix == "mlsysops"
    assert s.call_timeout == 10.0 and s.quarantine_after == 5 and s.http_port == -1
    assert s.policy_dir.endswith("plugins/policies")


def test_environment_over_defaults_and_flags_over_environment() -> None:
    env = {"MLSYSOPS_NATS_URL": "nats://env:4222", "MLSYSOPS_PREFIX": "envp",
           "MLSYSOPS_QUARANTINE_AFTER": "7", "MLSYSOPS_CALL_TIMEOUT": "3"}
    s = load(flags(), env=env)
    assert (s.nats_url, s.prefix, s.quarantine_after, s.call_timeout) == (
        "nats://env:4222", "envp", 7, 3.0)
    s = load(flags("--nats-url", "nats://flag:4222", "--quarantine-after", "2",
                   "--call-timeout", "1m"), env=env)
    assert (s.nats_url, s.prefix, s.quarantine_after, s.call_timeout) == (
        "nats://flag:4222", "envp", 2, 60.0)


def test_unrelated_environment_is_ignored() -> None:
    s = load(None, env={"NATS_URL": "nats://x", "MLSYSOPS_UNKNOWN": "1", "mlsysops_prefix": "x"})
    assert s == Settings()


def test_empty_values_mean_unset_unless_the_default_is_empty() -> None:
    # An empty variable does not blank out a setting that has a default...
    assert load(None, env={"MLSYSOPS_PREFIX": "", "MLSYSOPS_CALL_TIMEOUT": ""}) == Settings()
    # ...and an empty flag falls through to the environment.
    assert load(flags("--prefix", ""), env={"MLSYSOPS_PREFIX": "envp"}).prefix == "envp"
    # A setting whose default is empty can be set empty explicitly by a flag.
    s = load(flags("--nats-user", ""), env={"MLSYSOPS_NATS_USER": "alice"})
    assert s.nats_user == ""


def test_parse_reads_argv_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSYSOPS_STORAGE", "memory")
    monkeypatch.setenv("MLSYSOPS_HTTP_PORT", "9100")
    s = settings_mod.parse(["--http-port", "0", "--log-format", "json"], "test")
    assert (s.storage, s.http_port, s.log_format) == ("memory", 0, "json")


def test_flag_and_env_names() -> None:
    assert env_name("nats_url") == "MLSYSOPS_NATS_URL"
    assert flag_name("nats_url") == "--nats-url"
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    text = parser.format_help()
    for f in fields(Settings):
        assert flag_name(f.name) in text
    assert "MLSYSOPS_CALL_TIMEOUT" in " ".join(text.split())


# ================================================================ values


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("10s", 10.0), ("5m", 300.0), ("500ms", 0.5), ("2h", 7200.0), ("1d", 86400.0),
     ("1.5", 1.5), ("30", 30.0), (" 2s ", 2.0)],
)
def test_durations(raw: str, seconds: float) -> None:
    assert load(None, env={"MLSYSOPS_CALL_TIMEOUT": raw}).call_timeout == seconds
    assert load(flags("--status-interval", raw), env={}).status_interval == seconds


@pytest.mark.parametrize(
    "raw", ["-5", "-1s", "0", "0s", "0.0", "nan", "inf", "-inf", "ten", "5x", "5 sec",
            "9" * 400 + "s", "1e999"],
)
def test_bad_durations_name_the_flag_and_environment_variable(raw: str) -> None:
    exc = bad_input(MLSYSOPS_CALL_TIMEOUT=raw)
    assert exc.path == "call_timeout"
    assert str(exc).startswith(f"--call-timeout / MLSYSOPS_CALL_TIMEOUT: {raw!r}")
    exc = bad_input(flags(f"--exec-timeout={raw}"))
    assert exc.path == "exec_timeout" and "--exec-timeout" in str(exc)


@pytest.mark.parametrize("raw", ["x", "1.5", " ", "5s", "0x10"])
def test_bad_integers(raw: str) -> None:
    exc = bad_input(MLSYSOPS_QUARANTINE_AFTER=raw)
    assert exc.path == "quarantine_after"
    assert "--quarantine-after / MLSYSOPS_QUARANTINE_AFTER" in str(exc)


@pytest.mark.parametrize(
    ("name", "raw", "needle"),
    [
        ("log_format", "xml", "must be console or json"),
        ("log_level", "loud", "must be one of debug, info, warning, error"),
        ("storage", "disk", "must be file or memory"),
        ("http_port", "70000", "between -1 and 65535"),
        ("http_port", "-2", "between -1 and 65535"),
        ("quarantine_after", "0", "at least 1"),
        ("max_payload", "0", "at least 1"),
        ("telemetry_history", "-1", "at least 0"),
        ("prefix", "a b", "not a valid subject token"),
        ("prefix", "a..b", "not a valid subject token"),
        ("prefix", "a.*", "not a valid subject token"),
        ("prefix", ">", "not a valid subject token"),
    ],
)
def test_bad_values_name_the_flag_and_environment_variable(name: str, raw: str,
                                                           needle: str) -> None:
    exc = bad_input(**{env_name(name): raw})
    assert exc.path == name
    assert f"{flag_name(name)} / {env_name(name)}" in str(exc)
    assert needle in str(exc)


def test_valid_edge_values() -> None:
    s = load(None, env={"MLSYSOPS_LOG_LEVEL": "DEBUG", "MLSYSOPS_HTTP_PORT": "65535",
                        "MLSYSOPS_PREFIX": "acme.prod-1", "MLSYSOPS_TELEMETRY_HISTORY": "0"})
    assert (s.log_level, s.http_port, s.prefix, s.telemetry_history) == (
        "DEBUG", 65535, "acme.prod-1", 0)


def test_parse_duration_directly() -> None:
    assert parse_duration("100ms", minimum=0.1) == pytest.approx(0.1)
    assert parse_duration(3) == 3.0
    for value in (True, None, math.nan, math.inf, "1e3s", "-1s", -0.5):
        with pytest.raises(BadInput) as info:
            parse_duration(value, what="x.y")
        assert info.value.path == "x.y" and str(info.value).startswith("x.y: ")
    with pytest.raises(BadInput, match="shorter than the minimum"):
        parse_duration("50ms", what="i", minimum=0.1)


# ================================================================ secrets


def test_redacted_hides_secrets_only() -> None:
    s = load(None, env={"MLSYSOPS_NATS_PASSWORD": "hunter2", "MLSYSOPS_NATS_TOKEN": "t0ken",
                        "MLSYSOPS_NATS_USER": "alice"})
    out = s.redacted()
    assert out["nats_password"] == "***" and out["nats_token"] == "***"
    assert out["nats_user"] == "alice"
    assert "hunter2" not in repr(out) and "t0ken" not in repr(out)
    # The settings themselves keep the secrets; only the copy is redacted.
    assert s.nats_password == "hunter2" and s.nats_token == "t0ken"
    # Every field is there, unset secrets stay visibly unset.
    assert set(out) == {f.name for f in fields(Settings)}
    assert load(None, env={}).redacted()["nats_password"] == ""


def test_secret_fields_are_marked() -> None:
    marked = {f.name for f in fields(Settings) if f.metadata.get("secret")}
    assert marked == SECRET_FIELDS == {"nats_password", "nats_token"}


# ================================================================ subject tokens


@pytest.mark.parametrize(
    "name", ["a", "A", "9", "_", "_global", "my-app", "App_1-x", "a" * 128, "policy-"],
)
def test_valid_tokens(name: str) -> None:
    assert check_token("app", name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a.b", "a b", "a*", "*", ">", "a>", "a\n", "a\r\n", "\na", "a\t", "é",
     "a/b", "a:b", "a" * 129, None, 5, b"abc", ["a"]],
)
def test_invalid_tokens(name: Any) -> None:
    with pytest.raises(BadInput) as info:
        check_token("application", name)
    assert info.value.path == "application"
    assert f"application name {name!r} is not a valid subject token" in str(info.value)


# ================================================================ subject names


def test_subject_names_default_prefix() -> None:
    s = Subjects()
    assert s.desc("app", "web") == "mlsysops.desc.app.web"
    assert s.desc_all == "mlsysops.desc.*.*"
    assert s.trigger("relocate", "web") == "mlsysops.trigger.relocate.web"
    assert s.telemetry("host") == "mlsysops.telemetry.host"
    assert s.verdict("web", "relocate") == "mlsysops.verdict.web.relocate"
    assert s.plan("web", "relocate") == "mlsysops.plan.web.relocate"
    assert s.decision("fluidity") == "mlsysops.decision.fluidity"
    assert s.exec("fluidity") == "mlsysops.exec.fluidity"
    assert s.result("fluidity") == "mlsysops.result.fluidity"
    assert s.status("fluidity") == "mlsysops.status.fluidity"
    assert s.error("policy", "relocate") == "mlsysops.error.policy.relocate"
    assert s.error() == "mlsysops.error"
    assert s.wildcard("plan") == "mlsysops.plan.>"
    assert s.stream("telemetry") == "MLSYSOPS_TELEMETRY"
    assert s.bucket(BUCKET_DESC) == "mlsysops-desc"
    assert s.plan(GLOBAL_APP, "cleanup") == "mlsysops.plan._global.cleanup"


def test_subject_names_dotted_prefix() -> None:
    s = Subjects("acme.prod-1")
    assert s.plan("web", "p") == "acme.prod-1.plan.web.p"
    assert s.wildcard("exec") == "acme.prod-1.exec.>"
    # Stream and bucket names cannot contain dots (and streams no dashes).
    assert s.stream("events") == "ACME_PROD_1_EVENTS"
    assert s.bucket(BUCKET_LEDGER) == "acme_prod-1-ledger"


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' is one token, '>' one or more at the end."""
    p, t = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


def test_every_stream_family_captures_its_subjects() -> None:
    s = Subjects("acme.prod")
    samples = {
        "telemetry": s.telemetry("host"), "verdict": s.verdict("a", "p"),
        "plan": s.plan("a", "p"), "exec": s.exec("m"), "decision": s.decision("m"),
        "result": s.result("m"), "status": s.status("m"), "error": s.error("policy", "p"),
    }
    captured = {family for families in STREAM_FAMILIES.values() for family in families}
    assert captured == set(samples)
    for families in STREAM_FAMILIES.values():
        for family in families:
            assert _matches(s.wildcard(family), samples[family])
            others = [v for k, v in samples.items() if k != family]
            assert not any(_matches(s.wildcard(family), o) for o in others)
    assert _matches(s.desc_all, s.desc("node", "n1"))
    assert not _matches(s.desc_all, s.trigger("p", "a"))


def test_bucket_names_are_distinct_and_valid() -> None:
    s = Subjects()
    roles = [BUCKET_DESC, BUCKET_CONTEXT, BUCKET_SCHED, BUCKET_LEDGER, BUCKET_STATUS,
             BUCKET_LEASES]
    names = [s.bucket(r) for r in roles]
    assert len(set(names)) == len(names)
    for name in names:
        check_token("bucket", name)
