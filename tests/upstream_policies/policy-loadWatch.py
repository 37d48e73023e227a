"""Test data: a policy written for the upstream MLSysOps agent (not for this framework).

Reads the telemetry DataFrame and a time range of it, slows its own analysis down once
it has planned (by changing ``configuration.analyze_interval`` in its context, as
upstream's dynamic placement policy does) and plans through the ``fluidity_proxy`` name.
"""
# ruff: noqa: UP010, E501 (written as upstream writes its policies)
from __future__ import print_function

import time

from mlsysops.logger_util import logger


def initialize():
    initial_context = {
        "telemetry": {
            "metrics": ["node_load1"],
            "system_scrape_interval": "1s"
        },
        "mechanisms": ["fluidity_proxy"],
        "packages": [],
        "configuration": {
            "analyze_interval": "1s"
        },
        "scope": "application",
        "samples_seen": 0,
        "planned": False,
    }
    return initial_context


async def analyze(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    df = telemetry['dataframe']
    if df.empty or 'node_load1' not in df.columns:
        logger.info("no samples yet")
        return False, context

    now = time.time()
    recent = await telemetry['query'](start_time=now - 3600, end_time=now)
    context['samples_seen'] = int(recent['node_load1'].count())
    logger.info(f"mean load {df['node_load1'].mean()} over {len(df)} rows")

    if context['planned']:
        context['configuration']['analyze_interval'] = "30s"  # wait for changes to take effect
        return False, context
    return True, context


async def plan(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    application = application_description[0]
    nodes = system_description['MLSysOpsCluster']['nodes']
    plan_result = {"name": application['name'], "deployment_plan": {"initial_plan": True}}
    for component in application['spec']['components']:
        plan_result['deployment_plan'][component['metadata']['name']] = [
            {"action": "deploy", "host": nodes[0]}]
    context['planned'] = True

    new_plan = {
        "fluidity_proxy": plan_result,
    }
    logger.info('plan: New plan %s', new_plan)
    return new_plan, context
