"""Test data: a policy written for the upstream MLSysOps agent (not for this framework).

Periodically pins the node's CPUs to their lowest frequency through the mechanism
upstream calls ``CPUFrequencyConfigurator``, timing itself from its own
``configuration.analyze_interval`` as upstream's CPU-frequency policy does. (Upstream's
also builds an unused ``mlstelemetry`` client at import; that package is not installed
here, see docs/upstream.md.)
"""
# ruff: noqa: UP010, E501 (written as upstream writes its policies)
from __future__ import print_function

import re
import time

from mlsysops.logger_util import logger


def parse_analyze_interval(interval: str) -> int:
    """Seconds in an interval like '4s', '5m', '2h' or '1d'."""
    match = re.fullmatch(r"(\d+)([smhd])", interval)
    if not match:
        raise ValueError(f"Invalid analyze interval format: '{interval}'")
    value, unit = int(match.group(1)), match.group(2)
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def initialize():
    initialContext = {
        "telemetry": {
            "metrics": ["node_load1"],
            "system_scrape_interval": "1s"
        },
        "mechanisms": [
            "CPUFrequencyConfigurator"
        ],
        "packages": [],
        "configuration": {
            "analyze_interval": "1s"
        },
        "latest_timestamp": None,
        "core": False,
        "scope": "global"
    }
    return initialContext


async def analyze(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    current_timestamp = time.time()

    if context['latest_timestamp'] is None:
        context['latest_timestamp'] = current_timestamp
        return False, context

    analyze_interval = parse_analyze_interval(context['configuration']['analyze_interval'])
    if current_timestamp - context['latest_timestamp'] > analyze_interval:
        context['latest_timestamp'] = current_timestamp
        return True, context

    return False, context


async def plan(context, application_description, system_description, mechanisms, telemetry, ml_connector):
    cpu_command = {
        "command": "set",
        "cpu": "all",
        "frequency": "min"
    }
    new_plan = {
        "CPUFrequencyConfigurator": cpu_command,
    }
    logger.info(f"plan: New plan {new_plan}")
    return new_plan, context
