"""The FineTuneJob API, shared by the operator, the trainer and the CLI; free of torch and of kopf.

- :mod:`kubetune_api.spec`: the spec models;
- :mod:`kubetune_api.rules`: the cross-field :data:`RULES` (Python check + CEL) and the immutable fields;
- :mod:`kubetune_api.resource`: the resource's identity (group, version, kind, plural), its status
  and :func:`load_job` for whole manifests;
- :mod:`kubetune_api.uris`: the source and destination URIs and their schemes;
- :mod:`kubetune_api.trainer_config`: the TrainerConfig the operator renders for the pods, and the
  paths where pods mount what it names;
- :mod:`kubetune_api.plan`: the memory planner (arithmetic over a model's config.json), which the
  operator's pre-flight and ``kubetune plan`` run;
- :mod:`kubetune_api.instances`: what the operator knows of cloud GPU instance types (GPUs and their memory);
- :mod:`kubetune_api.problems`: validation problems, each naming its field;
- :mod:`kubetune_api.objects`: the plain-dict Kubernetes object type and the API's timestamp format.

Nothing here imports torch or anything that pulls it in: the operator image carries this package
and not the ML stack.
"""

from kubetune_api.problems import InvalidManifestError, Problem, problems_of
from kubetune_api.rules import IMMUTABLE_ONCE_STARTED, RULES, Rule, changed_immutable_fields
from kubetune_api.spec import (
    ALLOW_LOCAL_PATHS,
    MLFLOW_CREDENTIAL_KEYS,
    DatasetSpec,
    DeepSpeedSpec,
    DistributedSpec,
    FineTuneJobSpec,
    LoraSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    PreflightSpec,
    QuantizationSpec,
    ResourcesSpec,
    RunPolicy,
    ServingSpec,
    StorageSpec,
    Toleration,
    TrackingSpec,
    TrainingSpec,
    ValidationSplit,
)
from kubetune_api.trainer_config import (
    CONFIG_MOUNT,
    DEFAULT_METRICS_PORT,
    METRICS_ADDRESS_ENV,
    OUTPUT_MOUNT,
    SECRETS_MOUNT,
    SOURCES_MOUNT,
    Mounts,
    TrainerConfig,
)
from kubetune_api.uris import SourceURI, parse_uri

__all__ = [
    "ALLOW_LOCAL_PATHS",
    "CONFIG_MOUNT",
    "DEFAULT_METRICS_PORT",
    "IMMUTABLE_ONCE_STARTED",
    "METRICS_ADDRESS_ENV",
    "MLFLOW_CREDENTIAL_KEYS",
    "OUTPUT_MOUNT",
    "RULES",
    "SECRETS_MOUNT",
    "SOURCES_MOUNT",
    "DatasetSpec",
    "DeepSpeedSpec",
    "DistributedSpec",
    "FineTuneJobSpec",
    "InvalidManifestError",
    "LoraSpec",
    "MethodSpec",
    "ModelSpec",
    "Mounts",
    "OutputSpec",
    "PreflightSpec",
    "Problem",
    "QuantizationSpec",
    "ResourcesSpec",
    "Rule",
    "RunPolicy",
    "ServingSpec",
    "SourceURI",
    "StorageSpec",
    "Toleration",
    "TrackingSpec",
    "TrainerConfig",
    "TrainingSpec",
    "ValidationSplit",
    "changed_immutable_fields",
    "parse_uri",
    "problems_of",
]
