"""Policy files written for the upstream MLSysOps framework run here unchanged.

The policies in ``tests/upstream_policies/`` are written the way upstream policies are
(their imports, ``telemetry['query']``, ``context['configuration']['analyze_interval']``,
``logger``, ``evaluate_condition``, their signatures and return shapes); these tests load
them with our loader and run them through the real loop. The compatibility modules and
the upstream telemetry keys they rely on are tested one by one first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from mlsysops import wire
from mlsysops.errors import PluginError
from mlsysops.plugins import load_module, plugin_name
from mlsysops.policies import (
    DEFAULT_INTERVAL,
    check_plan,
    interval_of,
    mechanisms_argument,
    policy_settings,
)
from mlsysops.settings import Settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UPSTREAM_POLICIES = sorted((HERE / "upstream_policies").glob("policy-*.py"))
UPSTREAM_KEYS = {"prometheus_endpoint", "grafana_endpoint", "dataframe", "query"}


def _load(path: Path) -> Any:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = plugin_name(path)
    assert name is not None
    return load_module("policy", name, path, digest)


# -- the interval an upstream policy sets in its live context -----------------------------

@pytest.mark.parametrize(("value", "seconds"), [("5s", 5.0), (2, 2.0), ("500ms", 0.5), (1.5, 1.5)])
def test_a_policy_that_sets_analyze_interval_in_its_context_gets_that_interval(
        value: object, seconds: float) -> None:
    assert interval_of({"configuration": {"analyze_interval": value}}, 7.0) == seconds


@pytest.mark.parametrize("context", [
    {}, {"configuration": {}}, {"configuration": None}, {"configuration": ["x"]},
    {"configuration": {"analyze_interval": "soon"}},
    {"configuration": {"analyze_interval": "0s"}},
    {"configuration": {"analyze_interval": True}},
    {"configuration": {"analyze_interval": float("nan")}},
    [],
])
def test_a_missing_or_invalid_analyze_interval_keeps_the_interval_in_force(
        context: object) -> None:
    assert interval_of(context, 7.0) == 7.0
    assert interval_of(context, DEFAULT_INTERVAL) == DEFAULT_INTERVAL


# -- the files load ------------------------------------------------------------------------

def test_there_are_upstream_style_policies_to_run() -> None:
    names = {p.name for p in UPSTREAM_POLICIES}
    assert {"policy-qosRelocate.py", "policy-loadWatch.py", "policy-cpuFrequency.py"} <= names


@pytest.mark.parametrize("path", UPSTREAM_POLICIES, ids=lambda p: p.name)
def test_an_upstream_policy_file_loads_with_our_plugin_loader(path: Path) -> None:
    """Failed with ModuleNotFoundError: No module named 'mlsysops.logger_util'."""
    module = _load(path)
    assert callable(module.analyze) and callable(module.plan)
    assert policy_settings(module.__name__, module.initialize()) is not None


@pytest.mark.parametrize("path", UPSTREAM_POLICIES, ids=lambda p: p.name)
def test_an_upstream_policy_file_imports_only_what_exists_here(path: Path) -> None:
    imports = [line for line in path.read_text().splitlines()
               if line.startswith(("from mlsysops", "import mlsysops"))]
    assert imports, "written as upstream writes policies: it imports upstream's helpers"
    for line in imports:
        assert line.split()[1] in ("mlsysops.logger_util", "mlsysops.utilities"), line


# -- mlsysops.utilities.evaluate_condition ---------------------------------------------------

@pytest.mark.parametrize(("a", "b", "relation", "expected"), [
    (1, 2, "lower_than", True), (2, 2, "lower_than", False),
    (2, 2, "lower_or_equal", True), (3, 2, "lower_or_equal", False),
    (3, 2, "greater_than", True), (2, 2, "greater_than", False),
    (2, 2, "greater_or_equal", True), (1, 2, "greater_or_equal", False),
    (2, 2, "equal", True), (1.5, 2, "equal", False),
])
def test_evaluate_condition_compares_as_its_relation_says(
        a: float, b: float, relation: str, expected: bool) -> None:
    from mlsysops.utilities import evaluate_condition

    assert evaluate_condition(a, b, relation) is expected


@pytest.mark.parametrize("relation", ["lower", "", None, "LOWER_THAN", "lower_or_qqual"])
def test_evaluate_condition_refuses_an_unknown_relation_and_names_the_valid_ones(
        relation: Any) -> None:
    from mlsysops.utilities import evaluate_condition

    with pytest.raises(ValueError, match=r"Invalid operator.*lower_or_equal"):
        evaluate_condition(1, 2, relation)


# -- mlsysops.logger_util.logger ------------------------------------------------------------

def test_upstream_logger_lines_name_the_policy_that_logged(tmp_path: Path) -> None:
    path = tmp_path / "policy-chatty.py"
    path.write_text(
        "from mlsysops.logger_util import logger\n"
        "def analyze(*args):\n"
        "    logger.info(f'value {1 + 1}')\n"
        "    logger.warning('moved %s to %s', 'web', 'node-b')\n"
        "    logger.test('traced')\n"
        "    logger.log(40, 'as error')\n"
        "    logger.debug('bad %d format', 'x')\n"
        "    try:\n"
        "        1 / 0\n"
        "    except ZeroDivisionError:\n"
        "        logger.exception('it failed')\n"
        "def plan(*args):\n"
        "    return {}, {}\n")
    module = _load(path)
    with structlog.testing.capture_logs() as captured:
        module.analyze()
    assert [(e["log_level"], e["event"]) for e in captured] == [
        ("info", "value 2"), ("warning", "moved web to node-b"), ("info", "traced"),
        ("error", "as error"), ("debug", "bad %d format 'x'"), ("error", "it failed")]
    assert all(e.get("policy") == "chatty" for e in captured), captured
    assert captured[2]["upstream_level"] == "test"
    assert captured[-1]["exc_info"] is True


def test_configuring_the_upstream_logger_is_harmless() -> None:
    from mlsysops.logger_util import logger

    logger.setLevel("DEBUG")  # what a policy may do to upstream's stdlib logger
    assert logger.isEnabledFor(10)
    with structlog.testing.capture_logs() as captured:
        logger.info("from a module that is not a plugin")
    assert captured[0]["module"] == __name__


# -- the upstream telemetry keys -------------------------------------------------------------

def _snap(source: str, at: float, samples: dict[str, list[float]] | None = None,
          n: int = 0) -> wire.Telemetry:
    return wire.Telemetry(
        id=f"{source}-{n}-{int(at * 1000)}", source=source, collected_at=at,
        samples=[wire.Sample(metric=m, value=v, labels={"instance": f"i{i}"}, ts=at)
                 for m, values in (samples or {}).items() for i, v in enumerate(values)])


class ReadOnly(dict[str, Any]):
    """A view shared between calls, as the State may hand it: changing it raises."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the shared view was changed")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse


def _view(snaps: list[wire.Telemetry]) -> ReadOnly:
    from mlsysops.telemetry import telemetry_view

    return ReadOnly(telemetry_view(snaps, 60))


def _telemetry(snaps: list[wire.Telemetry], settings: Settings | None = None,
               calls: list[int] | None = None) -> Any:
    from mlsysops.telemetry.upstream import with_upstream_keys

    def snapshots() -> list[wire.Telemetry]:
        if calls is not None:
            calls.append(1)
        return snaps

    return with_upstream_keys(_view(snaps), snapshots, settings or Settings())


SNAPS = [_snap("host", 100.0, {"node_load1": [0.5, 9.0], "node_load5": [0.25]}, 1),
         _snap("host", 105.0, {"node_load1": [0.75]}, 2),
         _snap("prometheus", 105.0, {"up": [1.0]}, 1),
         _snap("host", 110.0, {"node_load1": [1.0], "node_load5": [0.5]}, 3)]


def test_policies_get_the_upstream_keys_beside_ours() -> None:
    view = _view(SNAPS)
    from mlsysops.telemetry.upstream import with_upstream_keys

    telemetry = with_upstream_keys(view, lambda: SNAPS, Settings())
    assert set(telemetry) == set(view) | UPSTREAM_KEYS
    assert len(telemetry) == len(view) + 4
    for key in view:
        assert telemetry[key] is view[key]  # the same objects, not copies
    assert isinstance(telemetry, dict)
    assert "dataframe" in telemetry and "query" in telemetry
    assert set(view) == {"latest", "history", "collected_at", "errors"}  # view untouched


def test_a_policy_that_reads_only_our_keys_builds_no_dataframe() -> None:
    calls: list[int] = []
    telemetry = _telemetry(SNAPS, calls=calls)
    assert telemetry["latest"]["node_load1"][0]["value"] == 1.0
    assert "dataframe" in telemetry
    assert list(telemetry.keys())[-4:] == ["prometheus_endpoint", "grafana_endpoint",
                                           "dataframe", "query"]
    assert telemetry.get("history") is not None and len(telemetry) == 8
    copy.copy(telemetry)
    telemetry.copy()
    assert calls == []


def test_a_policy_that_reads_only_our_keys_does_not_import_pandas() -> None:
    code = (
        "import sys\n"
        "from mlsysops.settings import Settings\n"
        "from mlsysops.telemetry.upstream import with_upstream_keys\n"
        "t = with_upstream_keys({'latest': {}}, lambda: [], Settings())\n"
        "assert 'dataframe' in t and t['latest'] == {} and callable(t['query'])\n"
        "print('pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_dataframe_has_a_row_per_collection_time_and_a_column_per_metric() -> None:
    df = _telemetry(SNAPS)["dataframe"]
    assert list(df.columns) == ["timestamp", "node_load1", "node_load5", "up"]
    assert df["timestamp"].tolist() == [100.0, 105.0, 110.0]
    assert df["node_load1"].tolist() == [0.5, 0.75, 1.0]  # the first series, as upstream
    assert df["node_load5"].tolist()[0] == 0.25 and math.isnan(df["node_load5"].tolist()[1])
    assert df["up"].tolist()[1] == 1.0  # two sources at one time share a row
    assert list(df.index) == [0, 1, 2]


def test_dataframe_without_telemetry_is_empty_with_a_timestamp_column() -> None:
    telemetry = _telemetry([])
    assert telemetry["dataframe"].empty
    assert list(telemetry["dataframe"].columns) == ["timestamp"]


async def test_query_latest_is_one_row_of_the_newest_values() -> None:
    snaps = [*SNAPS, _snap("prometheus", 111.0, {"up": [0.0]}, 2)]
    row = await _telemetry(snaps)["query"](latest=True)
    assert len(row) == 1
    assert row["timestamp"].tolist() == [111.0]
    assert row["node_load1"].values[0] == 1.0 and row["up"].values[0] == 0.0


async def test_query_latest_without_telemetry_raises_as_upstream_does() -> None:
    with pytest.raises(ValueError, match="no telemetry"):
        await _telemetry([])["query"](latest=True)


async def test_query_a_time_range_keeps_the_rows_within_it() -> None:
    query = _telemetry(SNAPS)["query"]
    assert (await query(start_time=105, end_time=110))["timestamp"].tolist() == [105.0, 110.0]
    assert (await query(105.0, 105.0))["timestamp"].tolist() == [105.0]  # upstream's order
    assert (await query(start_time=101))["timestamp"].tolist() == [105.0, 110.0]
    assert (await query(end_time=101))["timestamp"].tolist() == [100.0]
    assert (await query())["timestamp"].tolist() == [100.0, 105.0, 110.0]
    with pytest.raises(TypeError, match="start_time"):
        await query(start_time="yesterday")


def test_every_way_of_reading_telemetry_gives_the_dataframe() -> None:
    import pandas as pd

    reads = {
        "get": lambda t: t.get("dataframe"),
        "items": lambda t: dict(t.items())["dataframe"],
        "values": lambda t: next(v for v in t.values() if isinstance(v, pd.DataFrame)),
        "dict()": lambda t: dict(t)["dataframe"],
        "{**t}": lambda t: {**t}["dataframe"],
        "**kwargs": lambda t: (lambda **kw: kw)(**t)["dataframe"],
        "copy()": lambda t: t.copy()["dataframe"],
        "copy.copy": lambda t: copy.copy(t)["dataframe"],
        "deepcopy": lambda t: copy.deepcopy(t)["dataframe"],
        "t | {}": lambda t: (t | {})["dataframe"],
        "{} | t": lambda t: ({} | t)["dataframe"],
        "pop": lambda t: t.pop("dataframe"),
        "setdefault": lambda t: t.setdefault("dataframe"),
    }
    for how, read in reads.items():
        df = read(_telemetry(SNAPS))
        assert isinstance(df, pd.DataFrame), how
        assert df["node_load1"].tolist() == [0.5, 0.75, 1.0], how


def test_printing_telemetry_shows_the_dataframe() -> None:
    text = repr(_telemetry(SNAPS))
    assert "node_load1" in text.partition("'dataframe':")[2] and "built when read" not in text


async def test_a_deep_copy_of_telemetry_works_like_the_original() -> None:
    telemetry = _telemetry(SNAPS)
    clone = copy.deepcopy(telemetry)
    assert clone["latest"] == telemetry["latest"] and clone["latest"] is not telemetry["latest"]
    assert (await clone["query"](latest=True))["node_load1"].values[0] == 1.0
    assert clone["dataframe"].equals(telemetry["dataframe"])


def test_a_policy_that_changes_its_dataframe_changes_nobody_elses() -> None:
    first = _telemetry(SNAPS)["dataframe"]
    first.loc[0, "node_load1"] = 99.0
    first["mine"] = 1
    again = _telemetry(SNAPS)["dataframe"]
    assert again["node_load1"].tolist() == [0.5, 0.75, 1.0]
    assert "mine" not in again.columns


def test_the_dataframe_is_built_once_per_set_of_snapshots(monkeypatch) -> None:
    from mlsysops.telemetry import upstream

    builds: list[int] = []
    real = upstream._build

    def counting(snapshots: Any) -> Any:
        builds.append(len(snapshots))
        return real(snapshots)

    monkeypatch.setattr(upstream, "_build", counting)
    monkeypatch.setattr(upstream, "_cache", {})
    snaps = [_snap("host", 1.0, {"m": [1.0]}, 1), _snap("host", 2.0, {"m": [2.0]}, 2)]
    for _ in range(3):
        telemetry = _telemetry(snaps)
        telemetry["dataframe"]
        telemetry["dataframe"]
    assert builds == [2]
    _telemetry([*snaps, _snap("host", 3.0, {"m": [3.0]}, 3)])["dataframe"]
    assert builds == [2, 3]


async def test_one_call_sees_one_dataframe_even_if_telemetry_arrives_meanwhile() -> None:
    snaps = [_snap("host", 1.0, {"m": [1.0]}, 1)]
    telemetry = _telemetry(snaps)
    before = telemetry["dataframe"]
    snaps.append(_snap("host", 2.0, {"m": [2.0]}, 2))  # the State received a snapshot
    assert (await telemetry["query"]())["m"].tolist() == before["m"].tolist() == [1.0]
    assert _telemetry(snaps)["dataframe"]["m"].tolist() == [1.0, 2.0]  # the next call


def test_policies_in_many_threads_each_get_the_whole_dataframe() -> None:
    from concurrent.futures import ThreadPoolExecutor

    snaps = [_snap("host", float(i), {"m": [float(i)]}, i) for i in range(60)]

    def policy_call(_: int) -> list[float]:
        telemetry = _telemetry(snaps)
        return list(telemetry["dataframe"]["m"])

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(policy_call, range(64)))
    assert all(s == [float(i) for i in range(60)] for s in seen)


def test_endpoints_come_from_the_settings() -> None:
    telemetry = _telemetry([], Settings(prometheus_url="http://prom:9090"))
    assert telemetry["prometheus_endpoint"] == "http://prom:9090"
    assert telemetry["grafana_endpoint"] is None
    assert _telemetry([])["prometheus_endpoint"] is None  # the built-in host source
    from mlsysops import settings as settings_mod

    loaded = settings_mod.load(env={"MLSYSOPS_GRAFANA_URL": "http://grafana:3000"})
    assert _telemetry([], loaded)["grafana_endpoint"] == "http://grafana:3000"


def test_a_key_our_view_already_has_keeps_its_value() -> None:
    from mlsysops.telemetry.upstream import with_upstream_keys

    telemetry = with_upstream_keys({"query": "ours"}, lambda: [], Settings())
    assert telemetry["query"] == "ours"


# -- upstream mechanism names ----------------------------------------------------------------

@pytest.mark.parametrize(("alias", "mechanism"), [("fluidity_proxy", "fluidity"),
                                                  ("CPUFrequencyConfigurator", "cpu_freq")])
def test_a_plan_for_an_upstream_mechanism_name_goes_to_that_mechanism(
        alias: str, mechanism: str) -> None:
    command = {"command": "set", "cpu": "all", "frequency": "min"}
    assert check_plan("p", {alias: command}) == {mechanism: command}
    assert check_plan("p", {alias: command, "other": 1}) == {mechanism: command, "other": 1}
    assert policy_settings("p", {"mechanisms": [alias]}).mechanisms == (mechanism,)


def test_a_plan_naming_one_mechanism_twice_is_refused() -> None:
    with pytest.raises(PluginError, match=r"two commands for mechanism 'cpu_freq'.*"
                                          r"CPUFrequencyConfigurator"):
        check_plan("p", {"cpu_freq": {}, "CPUFrequencyConfigurator": {}})
    with pytest.raises(PluginError, match="two commands for mechanism 'fluidity'"):
        check_plan("p", {"fluidity_proxy": {}, "fluidity": {}})


def test_a_policy_finds_a_mechanism_under_the_name_it_declared() -> None:
    status = {"state": {"available": True}, "options": {}}
    mechanisms = {"cpu_freq": status, "fluidity": {"state": {}, "options": {}}}
    settings = policy_settings("p", {"mechanisms": ["CPUFrequencyConfigurator", "fluidity"]})
    seen = mechanisms_argument(mechanisms, settings)
    assert seen["CPUFrequencyConfigurator"] is status and seen["cpu_freq"] is status
    assert "fluidity_proxy" not in seen
    plain = policy_settings("p", {"mechanisms": ["fluidity"]})
    assert mechanisms_argument(mechanisms, plain) is mechanisms
    assert mechanisms == {"cpu_freq": status, "fluidity": {"state": {}, "options": {}}}


# -- the loop ------------------------------------------------------------------------------

def _fake_cpufreq(root: Path) -> None:
    for n in range(2):
        d = root / f"cpu{n}" / "cpufreq"
        d.mkdir(parents=True)
        for name, value in {"cpuinfo_min_freq": 800_000, "cpuinfo_max_freq": 3_000_000,
                            "scaling_min_freq": 800_000, "scaling_max_freq": 3_000_000,
                            "scaling_cur_freq": 1_900_000, "scaling_governor": "schedutil"
                            }.items():
            (d / name).write_text(f"{value}\n")


def _qos_app(name: str) -> bytes:
    import yaml

    return yaml.safe_dump({"MLSysOpsApp": {"name": name, "components": [{
        "metadata": {"name": "web"},
        "containers": [{"image": "registry.local/demo:1"}],
        # never met: any load is above -1, so the policy relocates "web"
        "qos_metrics": [{"application_metric_id": "node_load1", "target": -1.0,
                         "relation": "lower_than"}],
    }]}}).encode()


async def _policy_status(url: str, service: str, policy: str) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        entry = await kv.get(f"plugin.{service}.policy.{policy}")
        return json.loads(entry.value or b"{}")
    except Exception:
        return {}
    finally:
        await nc.close()


async def test_upstream_policy_files_run_unchanged_through_the_loop(
        loop_, cfg, plugin_dirs, tmp_path, monkeypatch) -> None:
    from tests import loopkit as kit

    policies, mechanisms = plugin_dirs
    for path in UPSTREAM_POLICIES:
        (policies / path.name).write_text(path.read_text())
    fluidity = kit.recorder(mechanisms, name="fluidity")
    (mechanisms / "cpu_freq.py").write_text((ROOT / "plugins/mechanisms/cpu_freq.py").read_text())
    sysfs = tmp_path / "sys-cpu"
    _fake_cpufreq(sysfs)
    monkeypatch.setenv("MLSYSOPS_CPUFREQ_ROOT", str(sysfs))
    loop_.start()
    events: list[dict[str, Any]] = []
    nc = await kit.collect(cfg.nats_url, events, families=("result", "error"))
    url = cfg.nats_url
    try:
        assert (await kit.publish_desc(url, "cluster", "c1", kit.cluster_doc()))["accepted"]
        reply = await kit.publish_desc(url, "app", "shop", _qos_app("shop"))
        assert reply["accepted"], reply

        def commands() -> list[dict[str, Any]]:
            return [r["command"] for r in kit.applied(fluidity)]

        # qosRelocate: telemetry['query'](latest=True) + evaluate_condition -> a move
        await kit.wait_for(lambda: any("move" in json.dumps(c) for c in commands()),
                           what="the QoS policy's move", timeout=30)
        # loadWatch: telemetry['dataframe'] and a time range -> a deploy via fluidity_proxy
        await kit.wait_for(lambda: any(c.get("deployment_plan", {}).get("initial_plan")
                                       for c in commands()),
                           what="the load policy's deploy", timeout=30)
        # cpuFrequency: a plan for CPUFrequencyConfigurator, applied by cpu_freq
        await kit.wait_for(lambda: any(e["subject"] == "mlsysops.result.cpu_freq"
                                       for e in events), what="the cpu_freq result", timeout=30)
        for service in ("analyzer", "planner"):
            for path in UPSTREAM_POLICIES:
                name = plugin_name(path)
                status = await _policy_status(url, service, str(name))
                assert status.get("loaded") is True, (service, name, status)
    finally:
        await nc.close()
    move = next(c for c in commands() if "move" in json.dumps(c))
    assert move["name"] == "shop"
    assert move["deployment_plan"]["web"] == [
        {"action": "move", "src_host": "node-a", "target_host": "node-b"}]
    deploy = next(c for c in commands() if c.get("deployment_plan", {}).get("initial_plan"))
    assert deploy["deployment_plan"]["web"] == [{"action": "deploy", "host": "node-a"}]
    result = next(e for e in events if e["subject"] == "mlsysops.result.cpu_freq")
    assert result["outcome"] == "applied", result
    assert (sysfs / "cpu0/cpufreq/scaling_max_freq").read_text().strip() == "800000"
    errors = [e for e in events if e["subject"].startswith("mlsysops.error.policy.")]
    assert errors == []
    assert not any(e["subject"].startswith("mlsysops.error.mechanism.") for e in events), events
