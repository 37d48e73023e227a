"""Two monitor replicas: one is killed while descriptions keep coming and telemetry flows.

What a user must see: every description published (plain publishes, no reply) is taken
in, in publish order (the last published version of each is the one stored), and
telemetry carries on after a short gap, collected by one replica at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
import pytest
import yaml

from mlsysops import wire
from tests import loopkit as kit
from tests.faults import harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

REPLICAS = {"monitor-p": "monitor", "monitor-b-p": "monitor-b"}
NAMES = [f"shop{i}" for i in range(5)]


def _doc(name: str, tag: int) -> bytes:
    return yaml.safe_dump({"MLSysOpsApp": {"name": name, "components": [
        {"metadata": {"name": "c0"}, "containers": [{"image": f"registry.local/d:{tag}"}]}]}}
    ).encode()


async def _status(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        return json.loads((await kv.get("telemetry")).value or b"{}")  # type: ignore[no-any-return]
    except Exception:
        return {}
    finally:
        await nc.close()


async def _stored_tags(url: str) -> dict[str, int]:
    nc = await nats.connect(url)
    out = {}
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        for name in NAMES:
            try:
                spec = json.loads((await kv.get(f"app.{name}")).value or b"{}")["spec"]
                out[name] = int(spec["components"][0]["containers"][0]["image"].rsplit(":")[-1])
            except Exception:
                continue
    finally:
        await nc.close()
    return out


class Watch:
    """Snapshot arrival times and description outcomes, as a user's tooling sees them."""

    def __init__(self) -> None:
        self.snapshots: list[float] = []
        self.outcomes: dict[int, wire.DescReply] = {}

    async def start(self, url: str) -> Any:
        nc = await nats.connect(url)

        async def on_snapshot(msg: Any) -> None:
            self.snapshots.append(time.time())

        async def on_outcome(msg: Any) -> None:
            reply = wire.DESC_REPLY.decode(msg.data)
            self.outcomes[reply.seq] = reply

        await nc.subscribe("mlsysops.telemetry.>", cb=on_snapshot)
        await nc.subscribe("mlsysops.desc_result.>", cb=on_outcome)
        return nc

    def gap_after(self, moment: float) -> float | None:
        later = [t for t in self.snapshots if t > moment]
        return later[0] - moment if later else None


async def test_descriptions_and_telemetry_survive_a_monitor_killed(process_loop, cfg) -> None:
    process_loop.cfg = h.fast(cfg)
    url = cfg.nats_url
    process_loop.start("monitor")
    h.spawn(process_loop, "monitor-b", "monitor", "monitor-b-p")
    await kit.publish_desc(url, "app", "warmup", _doc("warmup", 0))
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value("mlsysops-context")
    await kv.put("watcher.warmup", wire.encode(wire.ContextRecord(context={"telemetry": {
        "metrics": ["node_load1"], "system_scrape_interval": "1s"}})))
    watch = Watch()
    watcher = await watch.start(url)
    figures: dict[str, Any] = {}
    published: list[tuple[str, int]] = []
    try:
        await kit.wait_for(lambda: _status(url), timeout=20, what="a collector")
        for how in ("kill -9", "graceful stop"):
            collector = await kit.wait_for(lambda: _collector(url), timeout=20,
                                           what="a collecting replica")
            other = next(k for k, v in REPLICAS.items() if k != collector)

            async def publish(count: int = 60) -> None:
                for _ in range(count):
                    tag = len(published)
                    name = NAMES[tag % len(NAMES)]
                    await nc.publish(f"mlsysops.desc.app.{name}", _doc(name, tag))
                    published.append((name, tag))
                    await asyncio.sleep(0.05)

            publisher = asyncio.ensure_future(publish())
            await asyncio.sleep(1.0)
            stopped = time.time()
            proc = process_loop.procs.pop(REPLICAS[collector])
            proc.kill() if how == "kill -9" else proc.terminate()
            proc.wait(10)
            await kit.wait_for(lambda o=other: _is_collector(url, o), timeout=15,
                               what=f"{other} collecting")
            await publisher
            await kit.wait_for(lambda s=stopped: watch.gap_after(s) is not None, timeout=15,
                               what="a snapshot after the stop")
            figures[f"{how}: next snapshot after (s)"] = round(watch.gap_after(stopped), 2)
            if REPLICAS[collector] == "monitor":  # back as the standby
                process_loop.start("monitor")
            else:
                h.spawn(process_loop, "monitor-b", "monitor", "monitor-b-p")
            h.assert_alive(process_loop)
        last = {name: tag for name, tag in published}
        await kit.wait_for(lambda: _equal(url, last), timeout=30,
                           what="the last published version of each description stored")
        # every publication taken in: one outcome per intake sequence
        await kit.wait_for(lambda: len(watch.outcomes) >= len(published), timeout=20,
                           what=f"an outcome for every publication ({len(published)}): "
                                f"{sorted(watch.outcomes)[:5]}... {len(watch.outcomes)}")
        assert all(o.accepted for o in watch.outcomes.values())
        figures["publications"] = len(published)
        figures["outcomes announced"] = len(watch.outcomes)
    finally:
        await watcher.close()
        await nc.close()
    h.report("two monitors, the collector killed, then stopped", figures)


async def _collector(url: str) -> str | None:
    status = await _status(url)
    name = status.get("collector")
    return name if name in REPLICAS else None


async def _is_collector(url: str, instance: str) -> bool:
    return await _collector(url) == instance


async def _equal(url: str, last: dict[str, int]) -> bool:
    return await _stored_tags(url) == last
