"""The trainer's torch-free configuration: the FineTuneJob spec and its validation.

This is the only part of the trainer that the operator imports; it must never import torch or
anything that pulls it in.
"""

from kubetune_trainer.config.problems import InvalidManifestError, Problem, problems_of
from kubetune_trainer.config.sources import SourceURI, parse_uri
from kubetune_trainer.config.spec import (
    ALLOW_LOCAL_PATHS,
    IMMUTABLE_ONCE_STARTED,
    RULES,
    DatasetSpec,
    DeepSpeedSpec,
    DistributedSpec,
    FineTuneJobSpec,
    LoraSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    QuantizationSpec,
    ResourcesSpec,
    Rule,
    RunPolicy,
    ServingSpec,
    StorageSpec,
    Toleration,
    TrainingSpec,
    ValidationSplit,
    changed_immutable_fields,
)
from kubetune_trainer.config.trainer import (
    CONFIG_MOUNT,
    DEFAULT_METRICS_PORT,
    OUTPUT_MOUNT,
    SECRETS_MOUNT,
    SOURCES_MOUNT,
    Mounts,
    TrainerConfig,
)

__all__ = [
    "ALLOW_LOCAL_PATHS",
    "CONFIG_MOUNT",
    "DEFAULT_METRICS_PORT",
    "IMMUTABLE_ONCE_STARTED",
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
    "Problem",
    "QuantizationSpec",
    "ResourcesSpec",
    "Rule",
    "RunPolicy",
    "ServingSpec",
    "SourceURI",
    "StorageSpec",
    "Toleration",
    "TrainerConfig",
    "TrainingSpec",
    "ValidationSplit",
    "changed_immutable_fields",
    "parse_uri",
    "problems_of",
]
