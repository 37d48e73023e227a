"""The system descriptions: MLSysOpsNode, MLSysOpsCluster, MLSysOpsDatacenter, MLSysOpsContinuum.

A node says what it is and what it offers (hardware, sensors, network, power, the actions
agents may take on it); clusters, datacenters and the continuum group them by name.
"""

from __future__ import annotations

from typing import Literal

from mlsysops.descriptions.common import (
    AccelerationCall,
    Accelerometer,
    AirQuality,
    Barometer,
    City,
    CloudProvider,
    ContainerRuntime,
    ContinuumLayer,
    Country,
    FpgaModel,
    GpuModel,
    NodeType,
    OperatingSystem,
    Part,
    Resolution,
    SensorProtocol,
    TemperatureModel,
    TemperatureUnit,
)

NodeAction = Literal[
    "set_power_cap", "traffic_redirection", "acceleration", "cpu_frequency", "gpu_frequency",
    "change_container_cpu_set", "change_container_image", "*",
]
Interface = Literal["4g", "5g", "wifi", "bluetooth", "lora", "zigbee", "ethernet"]
# Upstream spells the first one "lower_or_qqual" in the power targets; kept for compatibility.
PowerRelation = Literal["lower_or_qqual", "greater_or_equal", "equal", "lower_than", "greater_than"]
EnergyUnit = Literal["wh", "kwh", "Mwh"]


# --------------------------------------------------------------------------- sensors
class NodeCamera(Part):
    """Cameras fitted to the node."""

    instances: int | None = None
    model: Literal["imx415", "imx219", "d455", "imx477", "picamera-v2"] | None = None
    camera_type: str | None = None
    framerate: int | None = None
    supported_resolutions: list[Resolution] | None = None


class NodeTemperature(Part):
    """Temperature sensors fitted to the node."""

    instances: int | None = None
    model: TemperatureModel | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: TemperatureUnit | None = None
    accuracy: float | None = None
    sampling_frequency: float | None = None


class FrequencyRange(Part):
    """The lowest and highest sampling frequency of a sensor."""

    min: float | None = None
    max: float | None = None


class GenericSensor(Part):
    """A sensor of any model (humidity, sound, CO2), sampling within a frequency range."""

    model: str | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: str | None = None
    accuracy: float | None = None
    sampling_frequency: FrequencyRange | None = None


class NodeSensor(Part):
    """A sensor the node offers as a service, and the endpoint that serves its data."""

    camera: NodeCamera | None = None
    temperature: NodeTemperature | None = None
    accelerometer: Accelerometer | None = None
    humidity: GenericSensor | None = None
    sound: GenericSensor | None = None
    co2: GenericSensor | None = None
    barometer: Barometer | None = None
    air_quality: AirQuality | None = None
    instances: float | None = None
    protocol: SensorProtocol | None = None
    endpoint: str | None = None


# --------------------------------------------------------------------------- platform
class DistributedStorage(Part):
    """Whether the node takes part in the distributed storage service, and with how much space."""

    member: bool | None = None
    available_space: float | None = None


class Environment(Part):
    """The software environment of the node: virtualisation, OS, container runtimes."""

    node_type: NodeType | None = None
    os: OperatingSystem | None = None
    container_runtime: list[ContainerRuntime] | None = None


class SupportedPlatform(Part):
    """A processing unit that serves an accelerated call, and the frameworks it runs."""

    name: Literal["cpu", "gpu", "fpga", "tpu"] | None = None
    suported_frameworks: list[Literal["pytorch", "tensorflow", "opencl"]] | None = None


class NodeAccelerationApi(Part):
    """An accelerated call the node serves."""

    call_name: AccelerationCall
    supported_platforms: list[SupportedPlatform]


class Cpu(Part):
    """The node's processor."""

    model: str | None = None
    architecture: Literal["amd64", "arm64"] | None = None
    cores: int | None = None
    frequency: list[float] | None = None
    performance_indicator: float | None = None


class Mcu(Part):
    """The node's microcontroller (far-edge devices)."""

    architecture: Literal["arm-M4"] | None = None
    flash: str | None = None
    cores: int | None = None
    frequency: float | None = None
    performance_indicator: float | None = None


class Gpu(Part):
    """The node's GPUs."""

    model: GpuModel | None = None
    memory: int | None = None
    instances: float | None = None
    performance_indicator: float | None = None


class Fpga(Part):
    """The node's FPGA."""

    model: FpgaModel | None = None
    memory: int | None = None
    performance_indicator: float | None = None


class Hardware(Part):
    """The node's hardware; memory and disk are in GB."""

    cpu: Cpu | None = None
    mcu: Mcu | None = None
    memory: int | None = None
    disk: str | None = None
    gpu: Gpu | None = None
    fpga: Fpga | None = None


# --------------------------------------------------------------------------- network
class BasicInterface(Part):
    """The network interface that carries control traffic (and by default application traffic)."""

    name: Interface | None = None
    range: float | None = None
    interface_name: str | None = None
    application_traffic_permission: bool | None = None


class PairingInfo(Part):
    """How to join the network of a redirection interface."""

    ip_address: str | None = None
    network_ssid: str | None = None
    net_key: str | None = None


class RedirectionInterface(Part):
    """An extra interface application traffic may be redirected to."""

    connection_type: Interface
    range: float | None = None
    interface_name: str | None = None
    mode: Literal["infrastructure", "adhoc"] | None = None
    hardware_address: str | None = None
    pairing_info: PairingInfo | None = None


class NetworkResources(Part):
    """The node's network interfaces."""

    basic_interface: BasicInterface | None = None
    redirection_interface: list[RedirectionInterface] | None = None


# --------------------------------------------------------------------------- power
class EnergyTarget(Part):
    """A bound on energy consumed or paid for."""

    value: float | None = None
    relation: PowerRelation | None = None
    measurement_unit: EnergyUnit | None = None


class Co2Target(Part):
    """A bound on CO2 emitted per unit of energy."""

    value: float | None = None
    measurement_unit: Literal["kt/wh", "kt/kwh", "kt/Mwh"] | None = None
    relation: PowerRelation | None = None


class PowerTarget(Part):
    """What the node's owner wants for consumption, cost and emissions."""

    consumption: EnergyTarget | None = None
    cost: EnergyTarget | None = None
    co2_emission: Co2Target | None = None


class MaxConsumption(Part):
    """The most power the node draws."""

    value: float | None = None
    measurement_unit: Literal["w", "kw", "Mw"] | None = None


class Renewable(Part):
    """A renewable source feeding the node.

    Upstream nests a ``production`` schema inside the ``name`` property by mistake, where
    Kubernetes ignores it; so does this type, to accept and reject exactly the same.
    """

    name: Literal["solar_panel"] | None = None


class BatteryCapacity(Part):
    """Charge levels of a battery."""

    levels: list[float] | None = None
    measurement_unit: Literal["wh"] | None = None


class Battery(Part):
    """The node's battery."""

    capacity: BatteryCapacity | None = None


class Power(Part):
    """How the node is powered, and the targets its owner sets."""

    target: PowerTarget | None = None
    max_consumption: MaxConsumption | None = None
    grid: bool | None = None
    renewable: list[Renewable] | None = None
    battery: Battery | None = None


# --------------------------------------------------------------------------- kinds
class MLSysOpsNode(Part):
    """A node of the continuum: what it is, what it has, what agents may change on it."""

    continuum_layer: ContinuumLayer
    environment: Environment
    hardware: Hardware
    name: str | None = None
    labels: list[str] | None = None
    cluster_id: str | None = None
    datacenter_id: str | None = None
    availability: Literal["transient", "stable"] | None = None
    mobile: bool | None = None
    location: list[float] | None = None
    sensors: list[NodeSensor] | None = None
    permitted_actions: list[NodeAction] | None = None
    distributed_storage_service: DistributedStorage | None = None
    acceleration_api: list[NodeAccelerationApi] | None = None
    network_resources: NetworkResources | None = None
    power: Power | None = None


class MLSysOpsCluster(Part):
    """A cluster: its identifier and the names of its nodes."""

    cluster_id: str
    nodes: list[str]
    datacenter_id: str | None = None


class MLSysOpsDatacenter(Part):
    """A datacenter: the cluster it belongs to, its nodes, its layer and whereabouts."""

    datacenter_id: str
    cluster_id: str
    continuum: ContinuumLayer
    nodes: list[str]
    continent: (
        Literal[
            "europe", "asia", "africa", "australia", "north_america", "south_america",
            "antarctica",
        ]
        | None
    ) = None
    country: Country | None = None
    city: City | None = None
    location: list[float] | None = None
    cloud_provider: CloudProvider | None = None


class MLSysOpsContinuum(Part):
    """The whole continuum: its identifier and the names of its clusters."""

    continuum_id: str
    clusters: list[str]
