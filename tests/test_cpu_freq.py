"""The cpu_freq mechanism on a fake cpufreq sysfs tree."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from mlsysops.plugin_api import MechanismError, get_logger

ROOT = Path(__file__).resolve().parent.parent
LISTED = [800_000, 1_600_000, 2_400_000, 3_000_000]  # kHz, as sysfs has them


def _load_plugin(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_plugin_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.logger = get_logger(path.stem)  # type: ignore[attr-defined]
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cpu_freq = _load_plugin(ROOT / "plugins" / "mechanisms" / "cpu_freq.py")


def _cpu(root: Path, n: int, low: int, high: int, listed: list[int] | None) -> None:
    d = root / f"cpu{n}" / "cpufreq"
    d.mkdir(parents=True)
    files = {
        "cpuinfo_min_freq": low,
        "cpuinfo_max_freq": high,
        "scaling_min_freq": low,
        "scaling_max_freq": high,
        "scaling_cur_freq": (low + high) // 2,
        "scaling_governor": "schedutil",
    }
    if listed is not None:
        files["scaling_available_frequencies"] = " ".join(map(str, listed)) + " "
    for name, value in files.items():
        (d / name).write_text(f"{value}\n")


@pytest.fixture
def sysfs(tmp_path, monkeypatch) -> Path:
    """cpu0-2 list their frequencies; cpu3 only has a range; cpu4 has no cpufreq."""
    for n in range(3):
        _cpu(tmp_path, n, 800_000, 3_000_000, LISTED)
    _cpu(tmp_path, 3, 800_000, 2_000_000, None)
    (tmp_path / "cpu4").mkdir()
    (tmp_path / "cpufreq").mkdir()  # the policy directory, not a CPU
    monkeypatch.setenv("MLSYSOPS_CPUFREQ_ROOT", str(tmp_path))
    return tmp_path


def scaling(root: Path, cpu: int) -> tuple[int, int]:
    d = root / f"cpu{cpu}" / "cpufreq"
    return int((d / "scaling_min_freq").read_text()), int((d / "scaling_max_freq").read_text())


def snapshot(root: Path) -> dict[int, tuple[int, int]]:
    return {cpu: scaling(root, cpu) for cpu in range(4)}


def test_set_max_and_min_on_all_cpus(sysfs):
    cpu_freq.apply({"command": "set", "cpu": "all", "frequency": "max"})
    assert snapshot(sysfs) == {0: (3_000_000,) * 2, 1: (3_000_000,) * 2, 2: (3_000_000,) * 2,
                               3: (2_000_000,) * 2}  # each CPU's own maximum
    result = cpu_freq.apply({"command": "set", "cpu": "all", "frequency": "min"})
    assert set(snapshot(sysfs).values()) == {(800_000, 800_000)}
    assert result["cpus"]["0"] == {"min": 800_000_000, "max": 800_000_000}


@pytest.mark.parametrize("value", ["1600000000 Hz", "1600000 kHz", "1600 MHz", "1.6 GHz", "1.6ghz"])
def test_set_a_value_on_a_list_of_cpus(sysfs, value):
    cpu_freq.apply({"command": "set", "cpu": "0,2", "frequency": value})
    snap = snapshot(sysfs)
    assert snap[0] == snap[2] == (1_600_000, 1_600_000)
    assert snap[1] == (800_000, 3_000_000)  # untouched


def test_a_range_of_cpus_and_a_cpu_without_a_frequency_list(sysfs):
    cpu_freq.apply({"command": "set", "cpu": "2-3", "frequency": "1.6 GHz"})
    assert snapshot(sysfs)[3] == (1_600_000, 1_600_000)  # within its range
    with pytest.raises(MechanismError, match="outside the range of cpu 3"):
        cpu_freq.apply({"command": "set", "cpu": "3", "frequency": "2.4 GHz"})


def test_reset_restores_the_hardware_range(sysfs):
    cpu_freq.apply({"command": "set", "cpu": "all", "frequency": "min"})
    cpu_freq.apply({"command": "reset", "cpu": "all"})
    assert snapshot(sysfs) == {0: (800_000, 3_000_000), 1: (800_000, 3_000_000),
                               2: (800_000, 3_000_000), 3: (800_000, 2_000_000)}


def test_writes_keep_min_below_max_at_every_step(sysfs, monkeypatch):
    """The kernel refuses a minimum above the maximum: the order of writes matters."""
    real_write = Path.write_text

    def checked_write(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        written = real_write(self, text, *args, **kwargs)
        low, high = scaling(sysfs, int(self.parent.parent.name[3:]))
        assert low <= high, f"{self.name} made min {low} > max {high}"
        return written

    monkeypatch.setattr(Path, "write_text", checked_write)
    for value in ("max", "min", "2.4 GHz", "1.6 GHz", "max"):
        cpu_freq.apply({"command": "set", "cpu": "0", "frequency": value})
    cpu_freq.apply({"command": "set", "cpu": "0", "frequency": "min"})
    cpu_freq.apply({"command": "reset", "cpu": "0"})
    assert scaling(sysfs, 0) == (800_000, 3_000_000)


@pytest.mark.parametrize(
    ("command", "culprit"),
    [
        ({"command": "set", "cpu": "7", "frequency": "max"}, "unknown cpu 7"),
        ({"command": "set", "cpu": "4", "frequency": "max"}, "unknown cpu 4"),  # no cpufreq
        ({"command": "set", "cpu": "0,a", "frequency": "max"}, "'cpu' must be 'all' or numbers"),
        ({"command": "set", "cpu": "0", "frequency": "1 GHz"}, "not available on cpu 0"),
        ({"command": "set", "cpu": "0", "frequency": "fast"}, "'frequency' must be 'min', 'max'"),
        ({"command": "set", "cpu": "0", "frequency": 1600000}, "'frequency' must be"),
        ({"command": "set", "cpu": "0"}, "'frequency' must be"),
        ({"command": "set", "cpu": "0", "frequency": "1500 Hz"}, "not a whole number of kHz"),
        ({"command": "boost", "cpu": "0"}, "'command' must be 'set' or 'reset'"),
        ("set max", "a cpu_freq command is a dict"),
        # valid for cpu 0, out of range for cpu 3: nothing at all is written
        ({"command": "set", "cpu": "0,3", "frequency": "2.4 GHz"}, "outside the range of cpu 3"),
    ],
)
def test_bad_commands_are_refused_and_write_nothing(sysfs, command, culprit):
    before = snapshot(sysfs)
    with pytest.raises(MechanismError) as caught:
        cpu_freq.apply(command)
    assert culprit in str(caught.value)
    assert snapshot(sysfs) == before


def test_a_failed_write_is_a_clear_error(sysfs, monkeypatch):
    def refuse(self: Path, *args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(MechanismError, match=r"cannot write .*scaling_max_freq: Permission denied"):
        cpu_freq.apply({"command": "set", "cpu": "0", "frequency": "max"})


def test_status_and_options(sysfs):
    status = cpu_freq.get_status()
    assert status["available"] is True and status["unit"] == "Hz"
    assert sorted(status["cpus"]) == ["0", "1", "2", "3"]
    assert status["cpus"]["0"] == {
        "current": 1_900_000_000,
        "scaling_min": 800_000_000,
        "scaling_max": 3_000_000_000,
        "governor": "schedutil",
    }
    options = cpu_freq.get_options()
    assert options["cpus"] == [0, 1, 2, 3]
    assert options["commands"] == ["set", "reset"]
    assert options["frequencies"]["0"] == [f * 1000 for f in LISTED]
    assert options["frequencies"]["3"] == {"min": 800_000_000, "max": 2_000_000_000}


def test_a_node_without_cpufreq_says_so(tmp_path, monkeypatch):
    (tmp_path / "cpu0").mkdir()  # a CPU, but no cpufreq driver
    monkeypatch.setenv("MLSYSOPS_CPUFREQ_ROOT", str(tmp_path))
    for report in (cpu_freq.get_status(), cpu_freq.get_options()):
        assert report["available"] is False
        assert "no CPU exposes cpufreq" in report["reason"]
    with pytest.raises(MechanismError, match="no CPU exposes cpufreq"):
        cpu_freq.apply({"command": "reset", "cpu": "all"})
    monkeypatch.setenv("MLSYSOPS_CPUFREQ_ROOT", str(tmp_path / "absent"))
    assert cpu_freq.get_status()["available"] is False


def test_conflict_key_is_the_node(monkeypatch):
    command = {"command": "reset", "cpu": "all"}
    monkeypatch.setenv("MLSYSOPS_NODE_NAME", "node-a")
    assert cpu_freq.conflict_key(command) == "node-a"
    monkeypatch.delenv("MLSYSOPS_NODE_NAME")
    assert cpu_freq.conflict_key(command) == socket.gethostname()
