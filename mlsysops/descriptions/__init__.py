"""Application and system descriptions: their types, their validation, their CRDs.

The description kinds of MLSysOps (MLSysOpsApp, MLSysOpsCluster, MLSysOpsNode,
MLSysOpsContinuum, MLSysOpsDatacenter) are defined once, as msgspec structs in
:mod:`~mlsysops.descriptions.app` and :mod:`~mlsysops.descriptions.system`, with the same
field names, types, enums and required fields as the upstream CRDs. From them come:

- :func:`validate_payload`, which checks what users publish and normalises it;
- :func:`crd_manifests`, the CustomResourceDefinitions the Helm chart ships
  (``python -m mlsysops.descriptions crds`` prints them).
"""

from mlsysops.descriptions.app import MLSysOpsApp
from mlsysops.descriptions.schema import KINDS, Kind, crd_manifests, schema_of
from mlsysops.descriptions.system import (
    MLSysOpsCluster,
    MLSysOpsContinuum,
    MLSysOpsDatacenter,
    MLSysOpsNode,
)
from mlsysops.descriptions.validate import (
    NAME_FIELDS,
    SUBJECT_KINDS,
    DescriptionResult,
    validate_payload,
)

__all__ = [
    "KINDS",
    "NAME_FIELDS",
    "SUBJECT_KINDS",
    "DescriptionResult",
    "Kind",
    "MLSysOpsApp",
    "MLSysOpsCluster",
    "MLSysOpsContinuum",
    "MLSysOpsDatacenter",
    "MLSysOpsNode",
    "crd_manifests",
    "schema_of",
    "validate_payload",
]
