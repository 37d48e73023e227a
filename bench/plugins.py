"""Policy and mechanism plugins of the benchmarks (written into each run's plugin dirs)."""

from __future__ import annotations

from pathlib import Path

# Records the wall-clock time at which ``apply`` is called (processes on one host share
# time.time()), one JSON line per call, with an O_APPEND write that costs one syscall.
RECORDER = '''
import json, os, time
LOG = {log!r}
_fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def conflict_key(command):
    return command.get("key", "") if isinstance(command, dict) else ""

def apply(command):
    t = time.time()
    os.write(_fd, (json.dumps({{"t": t, "seq": command.get("seq"), "key": command.get("key"),
                               "plan_id": command.get("_plan_id")}}) + "\\n").encode())

def get_status():
    return {{"ok": True}}
'''

# Says yes for one application when the newest telemetry carries a sample of
# ``bench_signal`` above the threshold labelled with that application (and a sequence
# number it has not acted on yet). Evaluated on every telemetry snapshot.
REACTION_POLICY = '''
THRESHOLD = 0.5

def initialize():
    return {"configuration": {"analyze_interval": "1h", "analyze_on_telemetry": True},
            "telemetry": {}, "mechanisms": ["bench_recorder"]}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    name = application_description[0]["name"] if application_description else None
    for sample in telemetry["latest"].get("bench_signal", ()):
        labels = sample["labels"]
        if (labels.get("app") == name and sample["value"] > THRESHOLD
                and labels.get("seq") != context.get("seen")):
            context["seen"] = labels.get("seq")
            context["trigger"] = {"seq": labels.get("seq"), "t0": labels.get("t0")}
            return True, context
    return False, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    trigger = context.pop("trigger", None) or {}
    return {"bench_recorder": {"key": application_description[0]["name"],
                               "seq": trigger.get("seq"), "t0": trigger.get("t0")}}, context
'''

# Says no, and records every call (application, wall-clock time, process) so that the
# harness can count evaluations per replica and check that each pair is evaluated once
# per interval by exactly one replica.
SCALE_POLICY = '''
import os, time
DIR = {logdir!r}
_fd = None

def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}},
            "mechanisms": ["bench_recorder"]}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    global _fd
    if _fd is None:
        _fd = os.open(os.path.join(DIR, "calls-%d.log" % os.getpid()),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    name = application_description[0]["name"] if application_description else "?"
    os.write(_fd, ("%s %.6f\\n" % (name, time.time())).encode())
    return False, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    return {{}}, context
'''


def write_recorder(mechanism_dir: Path, log: Path) -> None:
    (mechanism_dir / "bench_recorder.py").write_text(RECORDER.format(log=str(log)))


def write_reaction_policy(policy_dir: Path) -> None:
    (policy_dir / "policy-bench_react.py").write_text(REACTION_POLICY)


def write_scale_policy(policy_dir: Path, logdir: Path, interval: str) -> None:
    (policy_dir / "policy-bench_scale.py").write_text(
        SCALE_POLICY.format(logdir=str(logdir), interval=interval))
