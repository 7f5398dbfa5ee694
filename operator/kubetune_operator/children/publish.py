"""Publishing: where the result is, and the Job that publishes it to spec.output.destination."""

from __future__ import annotations

from kubetune_api import CONFIG_MOUNT
from kubetune_api.objects import Obj
from kubetune_operator import names
from kubetune_operator.children import pod
from kubetune_operator.children.target import Target


def result_folder(target: Target) -> str:
    """The folder the trainer leaves the result in: ``adapter`` (or ``model`` for full fine-tuning)."""
    return target.spec.method.result_folder


def default_result_uri(target: Target) -> str:
    """Where the result is when spec.output.destination is unset: the job's own volume."""
    return f"pvc://{pod.workspace_claim(target)}/{result_folder(target)}"


def result_uri(target: Target) -> str:
    """Where the result is published: spec.output.destination, else the job's own volume."""
    return target.spec.output.destination or default_result_uri(target)


def build_publish_job(target: Target) -> Obj:
    """The Job that publishes the trained result to spec.output.destination and reports its URI, digest and size.

    It runs on the training nodes (they are released only after it) with the job's volume, the
    trainer config and the output Secret; no GPU. Its termination message is the JSON result that
    the operator copies into status.adapter. Exit 2 (a wrong credential, say) fails it at once.
    """
    sources, _ = pod.source_volumes(target)
    labels = {**target.labels, names.ROLE_LABEL: names.ROLE_PUBLISH}
    container: Obj = {
        "name": names.PUBLISH_CONTAINER,
        "image": target.settings.trainer_image,
        "command": pod.argv(
            "kubetune",
            "publish",
            "--config",
            f"{CONFIG_MOUNT}/{pod.CONFIG_FILE}",
            "--default-uri",
            default_result_uri(target),
        ),
        "env": pod.base_env(termination_message=True),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": pod.container_security(),
        **pod.termination_message(),
        "volumeMounts": [pod.config_mount(), pod.workspace_mount(), *(v.mount for v in sources)],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": target.meta(names.publish_job(target.name), **{names.ROLE_LABEL: names.ROLE_PUBLISH}),
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": pod.failure_policy(names.PUBLISH_CONTAINER),
            "template": {
                "metadata": {"labels": labels, **({"annotations": a} if (a := pod.gang_annotations(target)) else {})},
                "spec": pod.pod_spec(
                    target,
                    names.ROLE_TRAINER,  # on the training nodes, which are released after it
                    restart_policy="Never",
                    containers=[container],
                    volumes=[pod.config_volume(target), pod.workspace_volume(target), *(v.volume for v in sources)],
                ),
            },
        },
    }
