"""Deterministic names and labels of everything the operator creates for a FineTuneJob.

Names derive from the job's name (and the attempt for the training Job), never from random
suffixes, so an operator restarted at any moment finds and re-applies the same objects instead
of creating duplicates. Labels tie children to their job for watches and cleanup.
"""

from __future__ import annotations

import hashlib
from typing import Final

from kubetune_api.resource import GROUP

GROUP_PREFIX: Final = GROUP
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "kubetune"}
JOB_LABEL: Final = f"{GROUP_PREFIX}/finetunejob"
NAMESPACE_LABEL: Final = f"{GROUP_PREFIX}/namespace"
UID_LABEL: Final = f"{GROUP_PREFIX}/job-uid"
ATTEMPT_LABEL: Final = f"{GROUP_PREFIX}/attempt"
ROLE_LABEL: Final = f"{GROUP_PREFIX}/role"
#: Taint put on provisioned GPU nodes so that only the job's pods land there.
GPU_TAINT_KEY: Final = "nvidia.com/gpu"
FINALIZER: Final = f"{GROUP_PREFIX}/release-nodes"
#: On the publish Job: the result its pod reported (URI, digest, size), recorded by the operator once
#: read, so that status.adapter is always derived from the operator's own child, never from status.
RESULT_ANNOTATION: Final = f"{GROUP_PREFIX}/result"
FIELD_MANAGER: Final = "kubetune-operator"
TRAINER_CONTAINER: Final = "trainer"
PUBLISH_CONTAINER: Final = "publish"
PREFLIGHT_CONTAINER: Final = "preflight"
SERVER_CONTAINER: Final = "server"
#: Values of ROLE_LABEL.
ROLE_TRAINER: Final = "trainer"
ROLE_PUBLISH: Final = "publish"
ROLE_PREFLIGHT: Final = "preflight"
ROLE_SERVER: Final = "server"


def pvc(job: str) -> str:
    """The job's checkpoint and output volume."""
    return f"{job}-workspace"


def config_map(job: str) -> str:
    return f"{job}-config"


def service(job: str) -> str:
    """The headless Service that gives training pods DNS names."""
    return f"{job}-train"


def training_job(job: str, attempt: int) -> str:
    """The Indexed Job of one gang attempt."""
    return f"{job}-train-{attempt}"


def rank_zero_host(job: str, attempt: int, namespace: str) -> str:
    """The DNS name of the rank-0 pod: hostname ``<Job>-0`` under the headless Service."""
    return f"{training_job(job, attempt)}-0.{service(job)}.{namespace}.svc"


#: Longest NodePool name: Karpenter names its NodeClaims ``<pool>-<5 characters>``, and a claim's name
#: becomes its node's kubernetes.io/hostname label (63 characters at most).
NODE_POOL_MAX: Final = 63 - 6
#: Karpenter's label on its NodeClaims and Nodes: the NodePool they belong to.
NODEPOOL_LABEL: Final = "karpenter.sh/nodepool"
#: Karpenter leaves a node alone (no consolidation, drift or expiry) while a pod with this annotation runs on it.
DO_NOT_DISRUPT: Final = "karpenter.sh/do-not-disrupt"


def node_pool(namespace: str, job: str, role: str) -> str:
    """The job's NodePool of ``role`` (trainer or server): cluster-scoped, so the namespace is part of the name.

    ``<namespace>-<job>-train-<hash>`` (or ``-serve-``): the hash of namespace and job keeps two jobs
    whose names join the same way (``a-b``/``c`` and ``a``/``b-c``) apart; a name too long for
    Karpenter's claim names has its readable part cut. The same on every pass.
    """
    return _pool(namespace, job, "serve" if role == ROLE_SERVER else "train")


def server_node_pool(namespace: str, server: str) -> str:
    """A ModelServer's NodePool: ``<namespace>-<server>-ms-<hash>``, apart from any job's by its suffix."""
    return _pool(namespace, server, "ms")


def _pool(namespace: str, owner: str, suffix: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{owner}".encode()).hexdigest()[:8]
    tail = f"-{suffix}-{digest}"
    return f"{namespace}-{owner}"[: NODE_POOL_MAX - len(tail)].rstrip("-.") + tail


def preflight_job(job: str) -> str:
    """The CPU Job that checks the sources, the data and the model before any node is provisioned."""
    return f"{job}-preflight"


def publish_job(job: str) -> str:
    """The Job that publishes the trained adapter to spec.output.destination and measures it."""
    return f"{job}-publish"


def serving(job: str) -> str:
    """The serving Deployment and its Service (the endpoint's host name)."""
    return f"{job}-serve"


#: On a ModelServer's children: the server they belong to.
SERVER_LABEL: Final = f"{GROUP_PREFIX}/modelserver"


def model_server(server: str) -> str:
    """A ModelServer's Deployment and Service (the host name of its endpoint)."""
    return f"{server}-server"


def server_adapters(server: str) -> str:
    """A ModelServer's ConfigMap: the adapters a starting replica loads before it reports ready."""
    return f"{server}-adapters"


def server_labels(namespace: str, server: str) -> dict[str, str]:
    """Labels on a ModelServer's children and pods."""
    return {**MANAGED_BY, SERVER_LABEL: server, NAMESPACE_LABEL: namespace, ROLE_LABEL: ROLE_SERVER}


def server_selector(namespace: str, server: str) -> str:
    """The label selector of a ModelServer's children (its pods, its NodePool and that pool's claims)."""
    return label_selector(server_labels(namespace, server))


def job_labels(namespace: str, job: str) -> dict[str, str]:
    """Labels on every child (cluster-scoped ones carry the namespace too)."""
    return {**MANAGED_BY, JOB_LABEL: job, NAMESPACE_LABEL: namespace}


def selector(namespace: str, job: str) -> str:
    return label_selector(job_labels(namespace, job))


def managed_selector() -> str:
    """The label selector of everything the operator creates, for every job."""
    return label_selector(MANAGED_BY)


def label_selector(labels: dict[str, str]) -> str:
    """``labels`` as an equality-based label selector (``k=v,k2=v2``)."""
    return ",".join(f"{k}={v}" for k, v in labels.items())
