"""The pre-flight: the CPU Job that checks a job's sources, model and data before any node is provisioned."""

from __future__ import annotations

from kubetune_api import CONFIG_MOUNT, OUTPUT_MOUNT
from kubetune_api.objects import Obj
from kubetune_operator import names
from kubetune_operator.children import pod
from kubetune_operator.children.target import Target


def keeps_data(target: Target) -> bool:
    """Whether the pre-flight writes the tokenized data to the job's volume for training to reuse.

    Only a ReadWriteMany volume is mounted: a ReadWriteOnce disk bound on the CPU node where the
    pre-flight ran could tie the training pods to that node's zone, so the pre-flight then works
    in a scratch folder and training tokenizes the data again.
    """
    storage = target.spec.resources.storage
    return storage.effective_access_mode(target.spec.distributed.nodes) == "ReadWriteMany"


def reads_workspace(target: Target) -> bool:
    """Whether a source lives on the job's own volume (an existing claim named by a pvc:// source)."""
    workspace = pod.workspace_claim(target)
    return any(uri.startswith(f"pvc://{workspace}/") for uri in (target.spec.model.source, target.spec.dataset.source))


def build_preflight_job(target: Target) -> Obj:
    """The pre-flight Job: ``kubetune preflight`` in the trainer image, on any node with room, no GPU, no token.

    It mounts the trainer config, the sources and their Secrets (not the output's push
    credentials), and the job's volume when it keeps the tokenized data there. Exit 2 (a problem
    training would meet) fails it at once; anything else is retried twice. Its termination message
    is the JSON of its findings, which the operator records on the Job and plans the memory from.
    """
    keep = keeps_data(target)
    spec = target.spec
    sources, _ = pod.source_volumes(target)
    output_secret = spec.output.secret_ref
    if output_secret not in (spec.model.secret_ref, spec.dataset.secret_ref):
        sources = [v for v in sources if v.source.get("secret", {}).get("secretName") != output_secret]
    on_volume = keep or reads_workspace(target)
    workspace: Obj = (
        pod.workspace_volume(target) if on_volume else {"name": "workspace", "emptyDir": {"sizeLimit": "20Gi"}}
    )
    settings = target.settings
    container: Obj = {
        "name": names.PREFLIGHT_CONTAINER,
        "image": settings.trainer_image,
        "command": pod.argv(
            "kubetune", "preflight", "--config", f"{CONFIG_MOUNT}/{pod.CONFIG_FILE}", *(["--keep"] if keep else [])
        ),
        "env": [*pod.base_env(termination_message=True), {"name": "OMP_NUM_THREADS", "value": "1"}],
        "resources": {
            "requests": {"cpu": settings.preflight_cpu, "memory": settings.preflight_memory},
            "limits": {"memory": settings.preflight_memory},
        },
        "securityContext": pod.container_security(),
        **pod.termination_message(),
        "volumeMounts": [
            pod.config_mount(),
            {"name": "workspace", "mountPath": OUTPUT_MOUNT},
            *(v.mount for v in sources),
        ],
    }
    labels = {**target.labels, names.ROLE_LABEL: names.ROLE_PREFLIGHT}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": target.meta(names.preflight_job(target.name), **{names.ROLE_LABEL: names.ROLE_PREFLIGHT}),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": settings.preflight_deadline_seconds,
            "podFailurePolicy": pod.failure_policy(names.PREFLIGHT_CONTAINER),
            "template": {
                "metadata": {"labels": labels},
                "spec": pod.pod_spec(
                    target,
                    None,  # a CPU pod: not on the GPU nodes, which do not exist yet
                    restart_policy="Never",
                    containers=[container],
                    volumes=[pod.config_volume(target), workspace, *(v.volume for v in sources)],
                ),
            },
        },
    }
