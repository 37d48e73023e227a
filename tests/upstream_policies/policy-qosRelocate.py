"""Test data: a policy written for the upstream MLSysOps agent (not for this framework).

Moves a component to another node when one of its QoS targets is not met, comparing the
latest telemetry with the target the way upstream's relocation policy does.
"""
# ruff: noqa: UP010, E501 (written as upstream writes its policies)
from __future__ import print_function

import inspect
import time

from mlsysops.logger_util import logger
from mlsysops.utilities import evaluate_condition


def initialize():
    print(f"Initializing policy {inspect.stack()[1].filename}")

    initialContext = {
        "telemetry": {
            "metrics": ["node_load1"],
            "system_scrape_interval": "1s"
        },
        "mechanisms": ["fluidity"],
        "packages": [],
        "configuration": {
            "analyze_interval": "1s"
        },
        "scope": "application",
        "relocated_at": None,
    }

    return initialContext


async def analyze(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    if context['relocated_at'] is not None:
        return False, context

    application_spec = application_description[0]['spec']
    for component in application_spec['components']:
        for qos_metric in component.get('qos_metrics', []):
            metric_name = qos_metric['application_metric_id']
            try:
                latest_df = await telemetry['query'](latest=True)
            except Exception as e:
                logger.debug(f"no telemetry yet: {e}")
                continue
            if metric_name not in latest_df.columns:
                continue
            measured = latest_df[metric_name].values[0]
            logger.debug(f"metric {metric_name} target {qos_metric['target']} measured {measured}")
            if evaluate_condition(qos_metric['target'], measured, qos_metric['relation']):
                context['unmet'] = {"component": component['metadata']['name'],
                                    "metric": metric_name, "measured": float(measured)}
                return True, context

    return False, context


async def plan(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    application = application_description[0]
    component = context['unmet']['component']
    nodes = system_description['MLSysOpsCluster']['nodes']

    plan_result = {
        "name": application['name'],
        "deployment_plan": {
            component: [{"action": "move", "src_host": nodes[0], "target_host": nodes[1]}],
            "initial_plan": False,
        },
    }
    context['relocated_at'] = time.time()

    new_plan = {
        "fluidity": plan_result,
    }
    logger.info('plan: New plan %s', new_plan)
    return new_plan, context
