"""The job as the builders see it: :class:`Target`, with the labels, owner reference and metadata of its children."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_api import FineTuneJobSpec
from kubetune_api.objects import Obj
from kubetune_api.resource import API_VERSION, KIND
from kubetune_operator import names
from kubetune_operator.settings import OperatorSettings


@dataclass(frozen=True, slots=True)
class Target:
    """A FineTuneJob with everything the builders need resolved."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneJobSpec
    settings: OperatorSettings
    gpus_per_node: int
    """GPUs each training pod requests (resolved from the spec, the NodeClaims or the byo default)."""
    attempt: int = 0
    reuse_prepared_data: bool = False
    """Whether the pre-flight passed and left the tokenized data on the job's volume for training."""

    @property
    def processes_per_node(self) -> int:
        return self.spec.distributed.processes_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.spec.distributed.nodes * self.processes_per_node

    @property
    def labels(self) -> dict[str, str]:
        return names.job_labels(self.namespace, self.name)

    @property
    def owner(self) -> Obj:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def meta(self, name: str, **extra_labels: str) -> Obj:
        """Metadata of a namespaced child: labels and the owner reference that garbage collection follows."""
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.labels, **extra_labels},
            "ownerReferences": [self.owner],
        }
