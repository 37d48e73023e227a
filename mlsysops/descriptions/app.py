"""The application description, MLSysOpsApp: components, their placement and needs.

Policies read it as ``{"name": ..., "spec": {...}}`` where ``spec`` holds these fields;
``spec["components"][i]["metadata"]["name"]`` names a component.
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
    PlacementLayer,
    Relation,
    Resolution,
    SensorProtocol,
    TemperatureModel,
    TemperatureUnit,
)

ScalingCriterion = Literal[
    "min_cpu_utilization", "max_cpu_utilization", "min_memory_percent", "max_memory_percent",
    "min_requests_per_sec", "max_request_per_sec", "min_number_of_instances",
    "max_number_of_instances",
]
Level = Literal["low", "medium", "high"]
AppAction = Literal[
    "component_relocation", "traffic_redirection", "change_container_image",
    "change_container_runtime_class", "change_container_cpu_set",
    "change_container_resource_requirements", "acceleration", "*",
]
RuntimeClass = Literal[
    "nvidia", "default", "kata-fc", "kata-dragon", "urunc", "crun", "lunatic",
    "nvidia-experimental", "spin", "wasmedge", "slight",
]


# --------------------------------------------------------------------------- placement
class Location(Part):
    """Where the hosting clusters may be: any of these continents, countries, cities."""

    continent: list[Literal["Europe", "Asia"]] | None = None
    country: list[Country] | None = None
    city: list[City] | None = None


class ClusterPlacement(Part):
    """Which clusters may host the application, and how many copies of it to run."""

    cluster_id: list[str] | None = None
    instances: int | None = None
    location: Location | None = None
    cloud_provider: CloudProvider | None = None
    accelerators: list[Literal["gpu", "fpga", "tpu"]] | None = None
    node_types: list[ContinuumLayer] | None = None


class Scaling(Part):
    """How a component scales: a fixed number of instances, or automatically on a criterion."""

    scaling_mode: Literal["manual", "auto"] | None = None
    instances: int | None = None
    scaling_criteria: ScalingCriterion | None = None


class SingleNode(Part):
    """Components that must run together on one node with these properties."""

    components: list[str] | None = None
    continuum_layer: list[PlacementLayer] | None = None
    scaling: Scaling | None = None
    mobile: bool | None = None
    labels: list[str] | None = None
    node: str | None = None


class NodePlacement(Part):
    """Where one component may run: a named node, layers of the continuum, node labels."""

    continuum_layer: list[PlacementLayer] | None = None
    scaling: Scaling | None = None
    mobile: bool | None = None
    labels: list[str] | None = None
    node: str | None = None


# --------------------------------------------------------------------------- component parts
class ComponentMetadata(Part):
    """The component's name (unique in the application) and its system-given identifier."""

    name: str | None = None
    uid: str | None = None


class RuntimeConfiguration(Part):
    """Node-level tuning knobs the component exposes, and where its code expects them."""

    config_specification_file: str | None = None
    config_file_path: str | None = None


class CameraRequirement(Part):
    """The camera a component needs."""

    model: Literal["d455", "imx477", "picamera-v2"] | None = None
    camera_type: Literal["rgb", "nir", "thermal", "monocular"] | None = None
    minimum_framerate: int | None = None
    resolution: Resolution | None = None


class TemperatureRequirement(Part):
    """The temperature sensor a component needs."""

    model: TemperatureModel | None = None
    measurement_min: float | None = None
    measurement_max: float | None = None
    measurement_unit: TemperatureUnit | None = None
    accuracy: float | None = None
    sampling_frequency: float | None = None


class SensorRequirement(Part):
    """A sensor a component reads, and how the component finds its data."""

    camera: CameraRequirement | None = None
    temperature: TemperatureRequirement | None = None
    accelerometer: Accelerometer | None = None
    barometer: Barometer | None = None
    air_quality: AirQuality | None = None
    endpoint_variable: str | None = None
    protocol: SensorProtocol | None = None
    instances: float | None = None


class QosMetric(Part):
    """An application-level objective, with system metrics that influence it."""

    application_metric_id: str | None = None
    target: float | None = None
    relation: Relation | None = None
    system_metrics_hints: list[Literal["cpu_frequency"]] | None = None


class LocationRestrictions(Part):
    """Limits on where the component's stored data may live."""

    gdpr: bool | None = None


class Bucket(Part):
    """A storage bucket the component uses."""

    bucket_id: str
    policy_update_token: str | None = None
    location_restrictions: LocationRestrictions | None = None
    reduncancy: Literal["high", "one", "none"] | None = None
    max_latency: float | None = None
    min_download_speed: float | None = None
    server_side_encryption: Literal["on", "off"] | None = None


class Storage(Part):
    """Storage-service buckets of a component."""

    buckets: list[Bucket] | None = None


# --------------------------------------------------------------------------- containers
class AccelerationApi(Part):
    """An accelerated call the container makes, and the framework it needs for it."""

    call_name: AccelerationCall
    required_framework: Literal["pytorch", "tensorflow", "opencl", "*"] | None = None


class CpuRequirement(Part):
    """CPU requests and limits (Kubernetes quantities) and the processor wanted."""

    requests: str | None = None
    limits: str | None = None
    architecture: list[Literal["arm64", "amd64"]] | None = None
    frequency: float | None = None
    performance_indicator: float | None = None


class MemoryRequirement(Part):
    """Memory requests and limits, as Kubernetes quantities."""

    requests: str | None = None
    limits: str | None = None


class McuRequirement(Part):
    """Microcontroller needs of a far-edge container."""

    requests: str | None = None
    limits: str | None = None
    architecture: list[Literal["arm-m4"]] | None = None
    flash: str | None = None
    frequency: float | None = None
    performance_indicator: float | None = None


class GpuRequirement(Part):
    """GPU needs: how many, which model, how much memory and utilisation."""

    requests: int | None = None
    limits: int | None = None
    model: GpuModel | None = None
    memory: int | None = None
    utilization_request: str | None = None
    performance_indicator: float | None = None


class FpgaRequirement(Part):
    """FPGA needs."""

    model: FpgaModel | None = None
    memory: int | None = None
    utilization_request: str | None = None
    performance_indicator: float | None = None


class PlatformRequirements(Part):
    """The resources one container needs."""

    cpu: CpuRequirement | None = None
    memory: MemoryRequirement | None = None
    mcu: McuRequirement | None = None
    disk: str | None = None
    gpu: GpuRequirement | None = None
    fpga: FpgaRequirement | None = None


class Port(Part):
    """A port the container listens on, optionally published on the host."""

    container_port: int | None = None
    host_ip: str | None = None
    host_port: int | None = None
    name: str | None = None
    protocol: Literal["UDP", "TCP", "SCTP"] | None = None


class FieldRef(Part):
    """A field of the running pod, such as ``status.hostIP``."""

    field_path: str | None = None


class ValueFrom(Part):
    """Where an environment variable takes its value when it has no literal value."""

    field_ref: FieldRef | None = None


class EnvVar(Part):
    """An environment variable of the container."""

    name: str | None = None
    value_from: ValueFrom | None = None
    value: str | None = None


class Container(Part):
    """One container of a component: image, command, environment, ports and resources."""

    image: str | None = None
    command: list[str] | None = None
    image_pull_policy: Literal["Always", "Never", "IfNotPresent"] | None = None
    acceleration_api: list[AccelerationApi] | None = None
    platform_requirements: PlatformRequirements | None = None
    ports: list[Port] | None = None
    env: list[EnvVar] | None = None


class Component(Part):
    """A deployable part of the application: its containers and everything about them."""

    metadata: ComponentMetadata
    containers: list[Container]
    node_placement: NodePlacement | None = None
    depends_on: list[str] | None = None
    runtime_configuration: RuntimeConfiguration | None = None
    sensors: list[SensorRequirement] | None = None
    qos_metrics: list[QosMetric] | None = None
    storage: Storage | None = None
    data_sensitivity: bool | None = None
    data_criticality: Level | None = None
    external_component: bool | None = None
    external_access: bool | None = None
    host_network: bool | None = None
    runtime_class_name: RuntimeClass | None = None
    restart_policy: Literal["Always", "OnFailure", "Never"] | None = None
    os: OperatingSystem | None = None
    node_type: NodeType | None = None
    container_runtime: ContainerRuntime | None = None


# --------------------------------------------------------------------------- application
class InteractionMetric(Part):
    """A system-level objective on an interaction (latency, bandwidth, ...)."""

    system_metric_id: Literal["latency", "bandwidth", "end_to_end_invocation_delay"] | None = None
    target: float | None = None
    measurement_unit: Literal["milliseconds", "Mbps", "seconds"] | None = None
    relation: Relation | None = None


class ComponentInteraction(Part):
    """Traffic from one component to another, how critical it is and what it must achieve."""

    component_name1: str | None = None
    type: Literal["ingress", "egress"] | None = None
    component_name2: str | None = None
    interaction_criticality: Level | None = None
    interaction_metrics: list[InteractionMetric] | None = None


class AchievementWeight(Part):
    """How much one metric counts in the overall satisfaction."""

    metric_id: str | None = None
    weight: float | None = None


class GlobalSatisfaction(Part):
    """The overall satisfaction the application wants, and how it is weighed."""

    threshold: float | None = None
    relation: Literal["greater_or_equal", "equal", "greater_than"] | None = None
    achievement_weights: list[AchievementWeight] | None = None


class MLSysOpsApp(Part):
    """An application managed by MLSysOps: its components and where and how they run."""

    components: list[Component]
    name: str | None = None
    cluster_placement: ClusterPlacement | None = None
    single_node: list[SingleNode] | None = None
    component_interactions: list[ComponentInteraction] | None = None
    permitted_actions: list[AppAction] | None = None
    global_satisfaction: GlobalSatisfaction | None = None
