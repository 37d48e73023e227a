"""Running a policy now (trigger subject) and energy profiles in the system description."""

from __future__ import annotations

import json

import nats

from tests import loopkit as kit

SPY = '''
def initialize():
    return {"configuration": {"analyze_interval": "1h"}}

def analyze(context, application_description, system_description, mechanisms, telemetry,
            ml_connector):
    context["energy"] = system_description["MLSysOpsEnergy"]
    return False, context

def plan(context, application_description, system_description, mechanisms, telemetry,
         ml_connector):
    params = context.pop("trigger")["params"]
    return {"recorder": {"params": params, "energy": system_description["MLSysOpsEnergy"]}}, \\
        context
'''


async def _request(url: str, subject: str, payload: dict) -> dict:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, json.dumps(payload).encode(), timeout=5)
        return json.loads(msg.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def test_trigger_runs_plan_now_with_params_and_energy(loop_, cfg, plugin_dirs) -> None:
    policies, mechanisms = plugin_dirs
    (policies / "policy-spy.py").write_text(SPY)
    log = kit.recorder(mechanisms)
    loop_.start()
    url = cfg.nats_url
    profile = json.dumps({"pue": 1.1, "energy_source": "renewable"}).encode()
    assert (await kit.publish_desc(url, "energy", "node-a", profile))["accepted"]
    bad = await kit.publish_desc(url, "energy", "node-b", b'{"pue": 0.2}')
    assert not bad["accepted"] and bad["errors"][0]["path"] == "$.pue"
    assert (await kit.publish_desc(url, "app", "shop", kit.app_doc("shop")))["accepted"]

    async def reply() -> dict:
        try:
            r = await _request(url, "mlsysops.trigger.spy.shop", {"params": {"replicas": 3}})
        except nats.errors.NoRespondersError:
            return {}
        return r if r.get("accepted") else {}

    answer = await kit.wait_for(reply, what="the trigger to be accepted")
    assert answer["verdict_id"].startswith("v-")
    await kit.wait_for(lambda: kit.applied(log), what="the triggered plan")
    command = kit.applied(log)[0]["command"]
    assert command["params"] == {"replicas": 3}
    assert command["energy"] == {"node-a": {"pue": 1.1, "energy_source": "renewable"}}
    refused = await _request(url, "mlsysops.trigger.nope.shop", {})
    assert refused == {"accepted": False, "error": "policy 'nope' is not loaded"}
    not_json = await _request(url, "mlsysops.trigger.spy.shop", {"params": [1]})
    assert not_json["accepted"] is False and "params" in not_json["error"]
