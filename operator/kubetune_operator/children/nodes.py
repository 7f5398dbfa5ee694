"""Karpenter NodeClaims: one per training node, one per serving replica (cluster-scoped, released by the operator)."""

from __future__ import annotations

from typing import Final

from kubetune_api.objects import Obj
from kubetune_operator import names
from kubetune_operator.children.target import Target

NODE_CLAIM_API_VERSION: Final = "karpenter.sh/v1"
NODE_CLAIM_KIND: Final = "NodeClaim"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"
#: The cluster-scoped kinds the operator creates for a job, as (apiVersion, kind): no owner reference
#: reaches them, so the finalizer releases them, and the operator's sweep deletes those whose job
#: is gone anyway (its finalizer was removed while no operator ran).
CLUSTER_SCOPED_CHILDREN: Final[tuple[tuple[str, str], ...]] = ((NODE_CLAIM_API_VERSION, NODE_CLAIM_KIND),)


def _node_claim(target: Target, name: str, instance_type: str, role: str) -> Obj:
    """A Karpenter NodeClaim of ``instance_type``, GPU-tainted, labelled with the job and the ``role`` of its pods."""
    node_class = target.settings.node_class
    return {
        "apiVersion": NODE_CLAIM_API_VERSION,
        "kind": NODE_CLAIM_KIND,
        "metadata": {
            "name": name,
            # Cluster-scoped: no owner reference; the finalizer releases them. Karpenter copies
            # these labels onto the node, so the job's pods can select exactly these nodes.
            "labels": {**target.labels, names.UID_LABEL: target.uid, names.ROLE_LABEL: role},
        },
        "spec": {
            "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": node_class.name},
            "requirements": [
                {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [instance_type]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": names.GPU_TAINT_KEY, "value": target.settings.gpu_taint_value, "effect": "NoSchedule"}],
        },
    }


def build_node_claims(target: Target) -> list[Obj]:
    """One Karpenter NodeClaim per training node, of the spec's instance type."""
    instance_type = target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return [
        _node_claim(target, names.node_claim(target.namespace, target.name, index), instance_type, names.ROLE_TRAINER)
        for index in range(target.spec.distributed.nodes)
    ]


def build_serving_node_claims(target: Target) -> list[Obj]:
    """One NodeClaim per serving replica, of serving.instanceType (else the training instance type)."""
    instance_type = target.spec.serving.instance_type or target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return [
        _node_claim(
            target, names.serving_node_claim(target.namespace, target.name, index), instance_type, names.ROLE_SERVER
        )
        for index in range(target.spec.serving.replicas)
    ]
