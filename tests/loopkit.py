"""Building blocks for loop tests: plugin sources, description documents, waiting.

The recording mechanism appends one JSON line per ``apply`` to a file, so a test can
count exactly how many times each command was applied, across processes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import yaml

RECORDER = '''
import json, time, os, asyncio
LOG = {log!r}

def conflict_key(command):
    return command.get("key", "") if isinstance(command, dict) else ""

async def apply(command):
    delay = command.get("sleep", 0) if isinstance(command, dict) else 0
    if delay:
        await asyncio.sleep(delay)
    if isinstance(command, dict) and command.get("fail"):
        raise RuntimeError("asked to fail")
    with open(LOG, "a") as f:
        f.write(json.dumps({{"command": command, "t": time.time(), "pid": os.getpid()}}) + "\\n")

def get_status():
    try:
        with open(LOG) as f:
            return {{"applied": sum(1 for _ in f)}}
    except FileNotFoundError:
        return {{"applied": 0}}

def get_options():
    return ["anything"]
'''

# A seed-style policy: plans once per application (like static placement).
ONCE = '''
def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}}, "scope": "application",
            "mechanisms": ["{mechanism}"], "telemetry": {{"metrics": ["node_load1"],
            "system_scrape_interval": "1s"}}}}

async def analyze(context, application_description, system_description, mechanisms,
                  telemetry, ml_connector):
    return "planned" not in context, context

async def plan(context, application_description, system_description, mechanisms, telemetry,
               ml_connector):
    context["planned"] = True
    app = application_description[0]
    logger.info("planning for %s", app["name"])
    return {{"{mechanism}": {{"app": app["name"], "key": {key}, "sleep": {sleep}}}}}, context
'''

# Says yes at every interval.
ALWAYS = '''
def initialize():
    return {{"configuration": {{"analyze_interval": "{interval}"}}, "core": {core}}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    context["n"] = context.get("n", 0) + 1
    return True, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    return {{"{mechanism}": {{"policy": "{name}", "n": context["n"], "key": {key},
                             "sleep": {sleep}}}}}, context
'''


def recorder(directory: Path, name: str = "recorder") -> Path:
    log = directory.parent / f"{name}.jsonl"
    (directory / f"{name}.py").write_text(RECORDER.format(log=str(log)))
    return log


def once_policy(directory: Path, name: str = "once", *, mechanism: str = "recorder",
                interval: str = "200ms", key: str = "None", sleep: float = 0) -> None:
    (directory / f"policy-{name}.py").write_text(
        ONCE.format(interval=interval, mechanism=mechanism, key=key, sleep=sleep))


def always_policy(directory: Path, name: str, *, mechanism: str = "recorder",
                  interval: str = "300ms", key: str = "''", sleep: float = 0,
                  core: bool = False) -> None:
    (directory / f"policy-{name}.py").write_text(ALWAYS.format(
        interval=interval, mechanism=mechanism, key=key, sleep=sleep, name=name, core=core))


def applied(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def app_doc(name: str, components: int = 1, node: str | None = None) -> bytes:
    comps = []
    for i in range(components):
        comp: dict[str, Any] = {"metadata": {"name": f"c{i}"},
                                "containers": [{"image": "registry.local/demo:1"}]}
        if node:
            comp["node_placement"] = {"node": node}
        comps.append(comp)
    return yaml.safe_dump({"MLSysOpsApp": {"name": name, "components": comps}}).encode()


def cluster_doc(name: str = "c1", nodes: tuple[str, ...] = ("node-a", "node-b")) -> bytes:
    return yaml.safe_dump({"MLSysOpsCluster": {"cluster_id": name, "nodes": list(nodes)}}).encode()


async def publish_desc(url: str, kind: str, name: str, payload: bytes) -> dict[str, Any]:
    """Publish a description and return the monitor's reply (retrying until one listens).

    Before the intake stream exists nobody listens (no responders); once it exists a
    request made while no monitor runs is kept but unanswered (a timeout): both retry.
    """
    nc = await nats.connect(url)
    try:
        for _ in range(100):
            try:
                msg = await nc.request(f"mlsysops.desc.{kind}.{name}", payload, timeout=2)
                return json.loads(msg.data)  # type: ignore[no-any-return]
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        raise AssertionError("no monitor answered")
    finally:
        await nc.close()


async def wait_for(cond: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 20,
                   what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


FLOW = ("verdict", "plan", "decision", "exec", "result", "error")


async def collect(url: str, into: list[dict[str, Any]], families: tuple[str, ...] = FLOW) -> Any:
    """Subscribe the loop's JSON subjects and append each message to ``into``."""
    nc = await nats.connect(url)

    async def cb(msg: Any) -> None:
        into.append({"subject": msg.subject, **json.loads(msg.data)})

    for family in families:
        await nc.subscribe(f"mlsysops.{family}.>", cb=cb)
    return nc


async def stored(js: Any, family: str, subject: str) -> int:
    """How many messages the stream of ``family`` keeps on ``subject``."""
    info = await js.stream_info(f"MLSYSOPS_{family}", subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def scheduler_active(url: str) -> bool:
    """Whether a scheduler replica holds the lease (and so decides plans)."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-leases")
        entry = await kv.get("leader.scheduler")
        return bool(json.loads(entry.value or b"{}").get("instance"))
    except Exception:
        return False
    finally:
        await nc.close()
