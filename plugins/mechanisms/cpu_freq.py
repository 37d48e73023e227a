"""CPU frequency of the node the executor runs on, through Linux cpufreq in sysfs.

Command::

    {"command": "set" | "reset",
     "cpu": "all" | "0,1,2" | "0-3,6",
     "frequency": "min" | "max" | "1800000000 Hz" | "1.8 GHz" | "1800 MHz" | "1800000 kHz"}

``set`` pins each selected CPU to one frequency (its scaling minimum and maximum both
become the value; ``min``/``max`` are the CPU's hardware limits). ``reset`` gives each
selected CPU back its whole hardware range (``frequency`` is not needed). A value must be
one of the CPU's available frequencies when the driver lists them, else within its
hardware range. Every CPU and value is checked before anything is written.

Status and options report frequencies in Hz. The sysfs root is the setting
``MLSYSOPS_CPUFREQ_ROOT`` (default ``/sys/devices/system/cpu``), read on every call, so
tests can point it at a fake tree. Writing needs root (or a writable sysfs).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from mlsysops.plugin_api import MechanismError, get_logger, setting

logger = get_logger("cpu_freq")

_UNITS = {"hz": 1, "khz": 1_000, "mhz": 1_000_000, "ghz": 1_000_000_000}
_CPU_LIST = re.compile(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*")
_FREQUENCY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?hz)?\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- plugin API
def apply(command: dict[str, Any]) -> dict[str, Any]:
    """Set or reset the frequency of some CPUs (see the module docstring)."""
    if not isinstance(command, dict):
        raise MechanismError(f"a cpu_freq command is a dict, got {type(command).__name__}")
    action = command.get("command")
    if action not in ("set", "reset"):
        raise MechanismError(f"'command' must be 'set' or 'reset', got {action!r}")
    cpus = _select(_cpus_or_fail(), command.get("cpu", "all"))

    # Decide the (min, max) in kHz of every CPU first; write only if all are valid.
    targets: dict[int, tuple[int, int]] = {}
    for cpu, path in cpus.items():
        low, high = _read_int(path / "cpuinfo_min_freq"), _read_int(path / "cpuinfo_max_freq")
        if action == "reset":
            targets[cpu] = (low, high)
        else:
            khz = _frequency(command.get("frequency"), cpu, path, low, high)
            targets[cpu] = (khz, khz)

    for cpu, (low, high) in targets.items():
        _write_range(cpus[cpu], low, high)
    logger.info("cpu frequency applied", command=action, cpus=sorted(targets))
    return {
        "cpus": {str(c): {"min": lo * 1000, "max": hi * 1000} for c, (lo, hi) in targets.items()},
        "unit": "Hz",
    }


def get_status() -> dict[str, Any]:
    """Current frequency and scaling range of every CPU, in Hz."""
    cpus = _cpus()
    if not cpus:
        return _unavailable()
    return {
        "available": True,
        "unit": "Hz",
        "cpus": {
            str(cpu): {
                "current": _read_hz(path / "scaling_cur_freq"),
                "scaling_min": _read_hz(path / "scaling_min_freq"),
                "scaling_max": _read_hz(path / "scaling_max_freq"),
                "governor": _read_text(path / "scaling_governor"),
            }
            for cpu, path in cpus.items()
        },
    }


def get_options() -> dict[str, Any]:
    """The frequencies each CPU accepts, in Hz (a list, or a range when the driver has none)."""
    cpus = _cpus()
    if not cpus:
        return _unavailable()
    per_cpu: dict[str, Any] = {}
    for cpu, path in cpus.items():
        listed = _available(path)
        if listed:
            per_cpu[str(cpu)] = [khz * 1000 for khz in listed]
        else:
            low, high = _read_hz(path / "cpuinfo_min_freq"), _read_hz(path / "cpuinfo_max_freq")
            per_cpu[str(cpu)] = {"min": low, "max": high}
    return {
        "available": True,
        "unit": "Hz",
        "commands": ["set", "reset"],
        "cpus": sorted(cpus),
        "frequencies": per_cpu,
    }


def conflict_key(command: Any) -> str:
    """Commands for the same node conflict: they write the same sysfs files."""
    return setting("node_name") or socket.gethostname()


# --------------------------------------------------------------------------- sysfs
def _root() -> Path:
    return Path(setting("cpufreq_root", "/sys/devices/system/cpu"))


def _cpus() -> dict[int, Path]:
    """cpufreq directory of each CPU that has one, by CPU number."""
    root = _root()
    found: dict[int, Path] = {}
    if root.is_dir():
        for entry in root.iterdir():
            match = re.fullmatch(r"cpu(\d+)", entry.name)
            if match and (entry / "cpufreq" / "cpuinfo_max_freq").is_file():
                found[int(match.group(1))] = entry / "cpufreq"
    return dict(sorted(found.items()))


def _unavailable() -> dict[str, Any]:
    return {
        "available": False,
        "reason": f"no CPU exposes cpufreq under {_root()} (no driver, a VM or a container "
        "without /sys): CPU frequency cannot be read or set on this node",
    }


def _cpus_or_fail() -> dict[int, Path]:
    cpus = _cpus()
    if not cpus:
        raise MechanismError(_unavailable()["reason"])
    return cpus


def _select(cpus: dict[int, Path], spec: Any) -> dict[int, Path]:
    """The CPUs named by ``spec``: "all", or numbers and ranges like "0,2-3"."""
    if spec == "all":
        return cpus
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str) or not _CPU_LIST.fullmatch(spec):
        raise MechanismError(f"'cpu' must be 'all' or numbers like '0,1' or '0-3', got {spec!r}")
    wanted: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        wanted.update(range(int(first), int(last or first) + 1))
    missing = sorted(wanted - set(cpus))
    if missing:
        raise MechanismError(
            f"unknown cpu {', '.join(map(str, missing))} (cpus with cpufreq: "
            f"{', '.join(map(str, cpus))})"
        )
    return {cpu: cpus[cpu] for cpu in sorted(wanted)}


def _frequency(value: Any, cpu: int, path: Path, low: int, high: int) -> int:
    """The kHz that ``value`` asks of ``cpu``, checked against what the CPU accepts."""
    if value == "min":
        return low
    if value == "max":
        return high
    match = _FREQUENCY.match(value) if isinstance(value, str) else None
    if match is None:
        raise MechanismError(
            f"'frequency' must be 'min', 'max' or a value like '1800000000 Hz' or '1.8 GHz', "
            f"got {value!r}"
        )
    hz = float(match.group(1)) * _UNITS[(match.group(2) or "hz").lower()]
    if hz % 1000:
        raise MechanismError(f"frequency {value!r} is not a whole number of kHz")
    khz = int(hz // 1000)
    listed = _available(path)
    if listed and khz not in listed:
        raise MechanismError(
            f"frequency {value!r} is not available on cpu {cpu} (available, Hz: "
            f"{', '.join(str(f * 1000) for f in listed)})"
        )
    if not low <= khz <= high:
        raise MechanismError(
            f"frequency {value!r} is outside the range of cpu {cpu} "
            f"({low * 1000}-{high * 1000} Hz)"
        )
    return khz


def _write_range(path: Path, low: int, high: int) -> None:
    """Set scaling_min/max to low/high, in the order the kernel accepts (min <= max)."""
    current_min = _read_int(path / "scaling_min_freq")
    order = ("scaling_max_freq", "scaling_min_freq") if high >= current_min else (
        "scaling_min_freq", "scaling_max_freq")
    values = {"scaling_min_freq": low, "scaling_max_freq": high}
    for name in order:
        try:
            (path / name).write_text(f"{values[name]}\n")
        except OSError as exc:
            raise MechanismError(f"cannot write {path / name}: {exc.strerror or exc}") from None


def _available(path: Path) -> list[int]:
    text = _read_text(path / "scaling_available_frequencies")
    return sorted(int(f) for f in text.split()) if text else []


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    text = _read_text(path)
    if not text.isdigit():
        raise MechanismError(f"cannot read a frequency from {path}")
    return int(text)


def _read_hz(path: Path) -> int | None:
    text = _read_text(path)
    return int(text) * 1000 if text.isdigit() else None
