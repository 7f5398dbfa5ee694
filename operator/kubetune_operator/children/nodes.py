"""Karpenter NodePools: one for the job's training nodes, one for its server (cluster-scoped, released by the operator).

Each pool is the job's alone: its nodes are of the job's instance type and capacity type, carry
the GPU taint and the job's labels (its pods select the pool's ``karpenter.sh/nodepool`` label and
the job's uid), and it never grows past what the job asked for. In ``dynamic`` mode (the default)
the pool is empty until the job's pods are pending, and ``limits`` caps it at the job's nodes and
their GPUs; in ``static`` mode it keeps ``replicas`` nodes (Karpenter's StaticCapacity). Karpenter
names the NodeClaims ``<pool>-<5 characters>``; deleting the pool drains and deletes them.
"""

from __future__ import annotations

from typing import Final

from kubetune_api.instances import instance_shape
from kubetune_api.objects import Obj
from kubetune_operator import names
from kubetune_operator.children.target import Target
from kubetune_operator.settings import OperatorSettings

KARPENTER_API_VERSION: Final = "karpenter.sh/v1"
NODE_POOL_KIND: Final = "NodePool"
NODE_CLAIM_KIND: Final = "NodeClaim"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"
CAPACITY_TYPE_LABEL: Final = "karpenter.sh/capacity-type"
#: The cluster-scoped kinds the operator creates for a job, as (apiVersion, kind): no owner reference
#: reaches them, so the finalizer releases them, and the operator's sweep deletes those whose job
#: is gone anyway (its finalizer was removed while no operator ran).
CLUSTER_SCOPED_CHILDREN: Final[tuple[tuple[str, str], ...]] = ((KARPENTER_API_VERSION, NODE_POOL_KIND),)


def training_pool_name(target: Target) -> str:
    return names.node_pool(target.namespace, target.name, names.ROLE_TRAINER)


def serving_pool_name(target: Target) -> str:
    return names.node_pool(target.namespace, target.name, names.ROLE_SERVER)


def pool_labels(target: Target, role: str) -> dict[str, str]:
    """Labels of the pool, of its NodeClaims and of its Nodes (Karpenter copies the template's)."""
    return {**target.labels, names.UID_LABEL: target.uid, names.ROLE_LABEL: role}


def pool_template(settings: OperatorSettings, labels: dict[str, str], instance_type: str, capacity_type: str) -> Obj:
    """A pool's node template: the instance and capacity type, the operator's NodeClass, the GPU taint, ``labels``."""
    node_class = settings.node_class
    return {
        "metadata": {"labels": labels},
        "spec": {
            "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": node_class.name},
            "requirements": [
                {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [instance_type]},
                {"key": CAPACITY_TYPE_LABEL, "operator": "In", "values": [capacity_type]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": names.GPU_TAINT_KEY, "value": settings.gpu_taint_value, "effect": "NoSchedule"}],
            # The operator deletes the pool when its owner is done with it; a node never expires under a gang.
            "expireAfter": "Never",
        },
    }


def _node_pool(target: Target, name: str, instance_type: str, role: str, nodes: int) -> Obj:
    """A NodePool of at most (dynamic) or exactly (static) ``nodes`` nodes of ``instance_type``."""
    spec = target.spec.resources
    labels = pool_labels(target, role)
    pool: Obj = {"template": pool_template(target.settings, labels, instance_type, spec.capacity_type)}
    if spec.node_pool.mode == "static":
        # Static pools accept no other limit and ignore the disruption settings (Karpenter's CRD rules).
        pool["replicas"] = nodes
        pool["limits"] = {"nodes": str(nodes)}
    else:
        # Karpenter checks limits against whole instances: the GPUs of `nodes` instances, not the pods' requests.
        limits: Obj = {"nodes": str(nodes)}
        shape = instance_shape(instance_type)
        if shape is not None and shape.gpus:
            limits[spec.gpu_resource_name] = str(shape.gpus * nodes)
        pool["limits"] = limits
        keep = target.spec.run_policy.release_nodes == "OnDelete"
        pool["disruption"] = {
            "consolidationPolicy": "WhenEmpty",
            # OnDelete keeps the nodes until the job is deleted; otherwise an empty node (a suspended
            # job, a long gap) goes after a while, and pending pods bring it back.
            "consolidateAfter": "Never" if keep else target.settings.consolidate_after,
            "budgets": [{"nodes": "100%"}],
        }
    return {
        "apiVersion": KARPENTER_API_VERSION,
        "kind": NODE_POOL_KIND,
        # Cluster-scoped: no owner reference; the finalizer and the sweep release it.
        "metadata": {"name": name, "labels": labels},
        "spec": pool,
    }


def build_node_pool(target: Target) -> Obj:
    """The job's training NodePool: distributed.nodes nodes of resources.instanceType."""
    instance_type = target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return _node_pool(
        target, training_pool_name(target), instance_type, names.ROLE_TRAINER, target.spec.distributed.nodes
    )


def build_serving_node_pool(target: Target) -> Obj:
    """The server's NodePool: serving.replicas nodes of serving.instanceType (else the training instance type)."""
    instance_type = target.spec.serving.instance_type or target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return _node_pool(target, serving_pool_name(target), instance_type, names.ROLE_SERVER, target.spec.serving.replicas)
