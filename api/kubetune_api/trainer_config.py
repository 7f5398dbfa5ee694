"""The trainer config: what the operator renders into each training pod.

It is the job's spec plus the facts only the cluster knows: where each volume is mounted in the
pod, which attempt this is, and where to publish metrics. The trainer reads this file (or a
plain FineTuneJob manifest on a workstation) and nothing else; it never talks to the API.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, Field

from kubetune_api.spec import FineTuneJobSpec, SpecModel

TRAINER_CONFIG_KIND: Final = "TrainerConfig"
TRAINER_CONFIG_VERSION: Final = "kubetune.io/v1alpha1"

#: Where the operator mounts things in a training pod; a workstation run passes its own folders.
OUTPUT_MOUNT: Final = "/workspace"
CONFIG_MOUNT: Final = "/etc/kubetune"
SOURCES_MOUNT: Final = "/var/run/kubetune/sources"
SECRETS_MOUNT: Final = "/var/run/kubetune/secrets"
DEFAULT_METRICS_PORT: Final = 9400
#: Environment variable with the address rank 0 serves its metrics on: the operator sets it to the
#: pod's IP (the address it scrapes), so that pods sharing a network (the local runtime's) each
#: serve their own; the trainer listens on every address when it is unset.
METRICS_ADDRESS_ENV: Final = "KUBETUNE_METRICS_ADDRESS"

MountPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/")]


def network(text: str) -> str:
    """``text`` as a CIDR network (``10.20.0.0/16``, ``fd00::/8``, a single address); ValueError otherwise."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not a network; use CIDR notation such as 10.20.0.0/16") from None


Network = Annotated[str, AfterValidator(network)]


class Mounts(SpecModel):
    """Where the pod sees each volume the spec refers to."""

    output: MountPath = OUTPUT_MOUNT
    """The job's volume: `checkpoints/`, `adapter/` (or `model/`), `merged/` and `summary.json` go here."""
    claims: dict[str, MountPath] = Field(default_factory=dict)
    """PersistentVolumeClaim name → mount path, for pvc:// sources (`pvc://claim/a/b` is `<path>/a/b`)."""
    config_maps: dict[str, MountPath] = Field(default_factory=dict)
    """ConfigMap name → mount path, for configmap:// datasets (`configmap://name/key` is `<path>/key`)."""
    secrets: dict[str, MountPath] = Field(default_factory=dict)
    """Secret name → mount path, for each secretRef (one file per key)."""


class TrainerConfig(SpecModel):
    """One training attempt's configuration, as the operator renders it."""

    api_version: Literal["kubetune.io/v1alpha1"] = TRAINER_CONFIG_VERSION
    """kubetune.io/v1alpha1"""
    kind: Literal["TrainerConfig"] = TRAINER_CONFIG_KIND
    """TrainerConfig"""
    job_name: Annotated[str, Field(min_length=1, max_length=63)]
    """The FineTuneJob's name (labels metrics and the summary)."""
    namespace: Annotated[str, Field(min_length=1, max_length=63)] = "default"
    """The FineTuneJob's namespace."""
    attempt: Annotated[int, Field(ge=0)] = 0
    """Gang attempt; each restart from a checkpoint is a new attempt."""
    spec: FineTuneJobSpec
    """The job's spec, defaults applied."""
    mounts: Mounts = Field(default_factory=Mounts)
    """Where volumes are mounted in the pod."""
    metrics_port: Annotated[int, Field(ge=1024, le=65535)] = DEFAULT_METRICS_PORT
    """Port on which rank 0 serves Prometheus metrics (step, loss, tokens/s, ETA…), on the address in
    the environment variable METRICS_ADDRESS_ENV (the pod's IP)."""
    allow_private_addresses: bool = False
    """Let https:// and http:// sources reach loopback, private and link-local addresses (off: such URLs are
    refused). For `kubetune train` on a workstation; the operator sets private_networks instead."""
    private_networks: Annotated[list[Network], Field(max_length=64)] = Field(default_factory=list)
    """Private networks (CIDR) that https:// and http:// sources may reach: the operator's
    --allow-private-network (chart value sources.allowPrivateNetworks), chosen by the cluster's admins."""
    reuse_prepared_data: bool = False
    """Train on the tokenized data the pre-flight left on the job's volume (`<output>/.preflight/<key>`) instead of
    fetching and tokenizing the dataset again; set by the operator once the pre-flight passed with the data kept."""
