"""Pieces shared by several description kinds: the base struct, enums, common sensors.

Every description type derives from :class:`Part`: unknown fields are ignored (they are
pruned, with a warning, by the validator before the struct is built) and fields left at
their default ``None`` are omitted when encoded, so a field absent from a user's
document stays absent from the normalised description.

Field names, types, enums and required fields mirror the MLSysOps CRDs exactly,
including their spelling (``reduncancy``, ``suported_frameworks``, ``lower_or_qqual``):
a document valid for the upstream framework must be valid here, and the other way round.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Part(msgspec.Struct, omit_defaults=True):
    """Base of every description struct."""


# --------------------------------------------------------------------------- enums
ContinuumLayer = Literal["cloud", "far_edge", "edge_infrastructure", "edge"]
PlacementLayer = Literal["cloud", "far_edge", "edge_infrastructure", "edge", "*"]
Country = Literal["el", "it", "fr", "nl", "ie", "pt", "dk", "il"]
City = Literal[
    "volos", "athens", "rende", "milan", "lille", "delft", "dublin", "aveiro", "porto",
    "aarhus", "jerusalem",
]
CloudProvider = Literal["private", "aws", "microsoft_azure", "gcp"]
Relation = Literal["lower_or_equal", "greater_or_equal", "equal", "lower_than", "greater_than"]
NodeType = Literal["virtualized", "native", "bare_metal"]
OperatingSystem = Literal["ubuntu", "kali", "zephyr"]
ContainerRuntime = Literal["containerd", "docker", "emb_serve"]
AccelerationCall = Literal["calc_optical_flow", "image_inference"]
GpuModel = Literal["k80", "k40"]
FpgaModel = Literal["zcu102"]
Resolution = Literal["1024x768", "4056x3040"]
TemperatureModel = Literal["sdc30", "ds18b20"]
TemperatureUnit = Literal["celsius", "fahrenheit"]
SensorProtocol = Literal["MQTT", "RTSP"]


# --------------------------------------------------------------------------- sensors
class Accelerometer(Part):
    """An accelerometer: model, measuring range, unit, accuracy and sampling rate."""

    model: Literal["3038-smt"] | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: Literal["m/s^2"] | None = None
    accuracy: float | None = None
    sampling_frequency: float | None = None


class Barometer(Part):
    """A barometric pressure sensor."""

    model: Literal["sb-100"] | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: Literal["pa"] | None = None
    accuracy: float | None = None
    sampling_frequency: float | None = None


class AirQuality(Part):
    """An air quality (gas concentration) sensor."""

    model: Literal["mq-135"] | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: Literal["ug/m^3"] | None = None
    accuracy: float | None = None
    sampling_frequency: float | None = None
