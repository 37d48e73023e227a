"""Description intake over NATS: replies, rejections, deletes, and nothing lost."""

from __future__ import annotations

import json

import nats
import pytest
import yaml

from mlsysops import settings as settings_mod
from tests import loopkit as kit


@pytest.fixture
def small_cfg(cfg):
    return settings_mod.Settings(**{**cfg.__dict__, "max_payload": 4096})


@pytest.fixture
async def monitor(small_cfg):
    from tests.conftest import InProcessLoop

    loop = InProcessLoop(small_cfg)
    loop.start("monitor")
    yield small_cfg
    await loop.stop()


async def _stored(url: str, key: str) -> dict | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        try:
            entry = await kv.get(key)
        except Exception:
            return None
        return json.loads(entry.value or b"null")
    finally:
        await nc.close()


async def test_accepted_then_rejected_keeps_the_accepted_one(monitor) -> None:
    url = monitor.nats_url
    errors: list[dict] = []
    watcher = await kit.collect(url, errors, families=("error",))
    try:
        good = await kit.publish_desc(url, "app", "shop", kit.app_doc("shop", components=2))
        assert good["accepted"] and good["revision"] >= 1 and good["errors"] == []
        bad_doc = {"MLSysOpsApp": {"name": "shop", "components": [
            {"metadata": {"name": "c0"}, "restart_policy": "sometimes",
             "containers": [{"image": "x", "ports": [{"container_port": "eighty"}]}]}]}}
        bad = await kit.publish_desc(url, "app", "shop", yaml.safe_dump(bad_doc).encode())
        assert bad["accepted"] is False
        paths = {e["path"] for e in bad["errors"]}
        assert paths == {"$.components[0].restart_policy",
                         "$.components[0].containers[0].ports[0].container_port"}
        await kit.wait_for(lambda: errors, what="error event")
        assert errors[0]["subject"] == "mlsysops.error.desc"
        assert "restart_policy" in errors[0]["message"]
        stored = await _stored(url, "app.shop")
        assert stored is not None and len(stored["spec"]["components"]) == 2
    finally:
        await watcher.close()


@pytest.mark.parametrize(("subject_name", "payload", "expected"), [
    ("shop", b"MLSysOpsApp: [unclosed", "YAML"),
    ("shop", b"just a string", "mapping"),
    ("other", kit.app_doc("shop"), "shop"),
    ("shop", yaml.safe_dump({"MLSysOpsNode": {"name": "shop"}}).encode(), "MLSysOpsNode"),
    ("shop", b"MLSysOpsApp:\n  name: shop\n  components: []\n" + b"#" * 5000, "bytes"),
    ("shop", b"\xff\xfe\x00garbage", "UTF-8"),
])
async def test_bad_descriptions_are_refused_with_their_reason(monitor, subject_name, payload,
                                                              expected) -> None:
    reply = await kit.publish_desc(monitor.nats_url, "app", subject_name, payload)
    assert reply["accepted"] is False
    text = " ".join(e["message"] for e in reply["errors"])
    assert expected in text, reply
    assert await _stored(monitor.nats_url, f"app.{subject_name}") is None


async def test_empty_payload_deletes_and_unknown_kind_is_refused(monitor) -> None:
    url = monitor.nats_url
    assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc("c1")))["accepted"]
    assert await _stored(url, "cluster.c1") is not None
    gone = await kit.publish_desc(url, "cluster", "c1", b"")
    assert gone["accepted"] and gone["deleted"]
    assert await _stored(url, "cluster.c1") is None
    odd = await kit.publish_desc(url, "gadget", "g1", b"{}")
    assert odd["accepted"] is False and "unknown description kind" in odd["errors"][0]["message"]


async def test_unknown_fields_are_dropped_with_a_warning(monitor) -> None:
    doc = {"MLSysOpsCluster": {"cluster_id": "c2", "nodes": ["a"], "colour": "blue"}}
    reply = await kit.publish_desc(monitor.nats_url, "cluster", "c2",
                                   json.dumps(doc).encode())
    assert reply["accepted"] and reply["warnings"][0]["path"] == "$.colour"
    stored = await _stored(monitor.nats_url, "cluster.c2")
    assert stored is not None and "colour" not in stored["spec"]
