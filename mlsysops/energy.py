"""Energy profiles of nodes and clusters, published on ``desc.energy.<name>``.

Placement strategies weigh where energy is cheap and clean. Profiles are small and change
on their own schedule (carbon intensity follows the grid), so they are not part of the
MLSysOps node and cluster kinds but a separate, optional description merged into the
system description policies see (``system_description["MLSysOpsEnergy"][name]``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec
import yaml

from mlsysops.descriptions import DescriptionResult
from mlsysops.descriptions.loading import _screen
from mlsysops.errors import BadInput
from mlsysops.subjects import check_token
from mlsysops.wire import FieldError


class EnergyProfile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """All fields optional; absent ones are treated as unknown by strategies."""

    pue: float | None = None  # power usage effectiveness, >= 1
    carbon_intensity: float | None = None  # gCO2 per kWh
    energy_source: Literal["renewable", "grid_mix", "fossil"] | None = None
    renewable_share: float | None = None  # 0..1
    idle_watts: float | None = None
    watts_per_cpu: float | None = None
    preferred: bool | None = None


_BOUNDS = {"pue": (1.0, 10.0), "carbon_intensity": (0.0, 5000.0), "renewable_share": (0.0, 1.0),
           "idle_watts": (0.0, 1e6), "watts_per_cpu": (0.0, 1e5)}


def validate_energy(name: str, payload: bytes, *, max_bytes: int = 65536) -> DescriptionResult:
    """Check an energy profile; the result has the shape of a description's."""
    def reject(path: str, message: str) -> DescriptionResult:
        return DescriptionResult(accepted=False, kind="energy", name=name,
                                 errors=[FieldError(path, message)])

    try:
        check_token("energy profile", name)
    except BadInput as exc:
        return reject("$", exc.message)
    if not payload.strip():
        return DescriptionResult(accepted=True, kind="energy", name=name, deleted=True)
    if len(payload) > max_bytes:
        return reject("$", f"an energy profile is at most {max_bytes} bytes, got {len(payload)}")
    try:
        text = payload.decode("utf-8")
        _screen(text, 32)  # as for descriptions: no aliases, at most 32 levels
        doc = yaml.safe_load(text)
    except BadInput as exc:
        return reject("$", exc.message)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        return reject("$", f"not UTF-8 YAML or JSON: {exc}")
    try:
        profile = msgspec.convert(doc, EnergyProfile)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        return reject(path, text.split(" - at `")[0])
    for field, (low, high) in _BOUNDS.items():
        value = getattr(profile, field)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            return reject(f"$.{field}", f"must be between {low:g} and {high:g}, got {value!r}")
    spec: dict[str, Any] = msgspec.to_builtins(profile)
    return DescriptionResult(accepted=True, kind="energy", name=name, spec=spec)
