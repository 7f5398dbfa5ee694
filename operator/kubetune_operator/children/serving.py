"""Serving the result: the server's files and command (vLLM or the built-in server), its Deployment and Service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kubetune_api import CONFIG_MOUNT, SECRETS_MOUNT, SOURCES_MOUNT, parse_uri
from kubetune_api.objects import Obj
from kubetune_api.resource import FineTuneJob
from kubetune_api.rules import MAX_VLLM_LORA_RANK
from kubetune_api.uris import MODEL_SCHEMES, OUTPUT_SCHEMES
from kubetune_operator import names
from kubetune_operator.children import pod
from kubetune_operator.children.target import Target

#: Where a serving pod sees the base model and the adapter.
SERVE_MODEL_MOUNT: Final = "/var/run/kubetune/model"
SERVE_ADAPTER_MOUNT: Final = "/var/run/kubetune/adapter"
#: LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS: Final = (8, 16, 32, 64, 128, 256, 320, MAX_VLLM_LORA_RANK)


def serving_gpus(target: Target) -> int:
    """GPUs per replica: serving.gpus, else 1 for vLLM and 0 for the built-in server."""
    serving = target.spec.serving
    if serving.gpus is not None:
        return serving.gpus
    return 1 if serving.runtime == "vllm" else 0


def serving_model_name(target: Target) -> str:
    return target.spec.serving.model_name or target.name


def serving_model_name_of(job: FineTuneJob) -> str:
    """The model name clients ask for: serving.modelName, else the job's name."""
    return job.spec.serving.model_name or job.name


def endpoint_url(target: Target) -> str:
    """The in-cluster base URL of the OpenAI-compatible API."""
    return f"http://{names.serving(target.name)}.{target.namespace}.svc:{target.spec.serving.port}/v1"


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def _server_env() -> list[Obj]:
    """The environment of the server and its init containers (HOME writable for caches)."""
    return [*pod.base_env(), {"name": "HOME", "value": "/tmp"}]  # noqa: S108


@dataclass(frozen=True, slots=True)
class _ServingFiles:
    """How a serving pod gets the base model and the adapter: volumes, init containers and paths."""

    volumes: list[Obj]
    mounts: list[Obj]
    init_containers: list[Obj]
    model_path: str
    adapter_path: str | None
    """None when the merged model is served (vLLM with a DoRA adapter)."""
    model_revision: str | None = None
    """The hub revision of a public ``hf://org/name@revision`` model vLLM downloads itself."""


def _serving_files(target: Target, adapter_uri: str) -> _ServingFiles:
    spec = target.spec
    volumes: list[Obj] = [pod.config_volume(target)]
    mounts: list[Obj] = [pod.config_mount()]
    inits: list[Obj] = []
    claims: dict[str, str] = {}

    def claim_path(claim: str, path: str) -> str:
        if claim not in claims:
            claims[claim] = f"{SOURCES_MOUNT}/pvc/{claim}"
            name = f"pvc-{len(claims)}"
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": name, "mountPath": claims[claim], "readOnly": True})
        return f"{claims[claim]}/{path}".rstrip("/")

    def init(name: str, command: list[str], volume: str, mount: str) -> None:
        volumes.append({"name": volume, "emptyDir": {}})
        mounts.append({"name": volume, "mountPath": mount, "readOnly": True})
        inits.append(
            {
                "name": name,
                "image": target.settings.trainer_image,
                "command": pod.argv(*command),
                "env": _server_env(),
                "securityContext": pod.container_security(),
                "volumeMounts": [
                    *(m for m in mounts if m["name"] != volume),
                    {"name": volume, "mountPath": mount},
                ],
            }
        )

    if spec.output.secret_ref:
        volumes.append({"name": "output-secret", "secret": {"secretName": spec.output.secret_ref}})
        mounts.append(
            {"name": "output-secret", "mountPath": f"{SECRETS_MOUNT}/{spec.output.secret_ref}", "readOnly": True}
        )

    merged = spec.serving.runtime == "vllm" and spec.method.type == "dora"
    if merged:
        # vLLM cannot apply DoRA: serve the merged model the trainer wrote (output.merge, a CRD rule).
        return _ServingFiles(volumes, mounts, inits, claim_path(pod.workspace_claim(target), "merged"), None)

    result = parse_uri(adapter_uri, OUTPUT_SCHEMES)
    pull = ["kubetune", "pull", adapter_uri]
    docker_config = (
        ["--docker-config", f"{SECRETS_MOUNT}/{spec.output.secret_ref}/.dockerconfigjson"]
        if spec.output.secret_ref
        else []
    )
    if spec.method.type == "full":
        # A fully fine-tuned model is served on its own: it *is* the model.
        if result.scheme == "pvc":
            return _ServingFiles(volumes, mounts, inits, claim_path(result.authority, result.path), None)
        init("pull-model", [*pull, SERVE_MODEL_MOUNT, *docker_config], "model", SERVE_MODEL_MOUNT)
        return _ServingFiles(volumes, mounts, inits, SERVE_MODEL_MOUNT, None)

    model = parse_uri(spec.model.source, MODEL_SCHEMES)
    model_revision = None
    if model.scheme == "pvc":
        model_path = claim_path(model.authority, model.path)
    elif model.scheme == "hf" and spec.serving.runtime == "vllm" and not spec.model.secret_ref:
        # vLLM downloads public hub models itself; a revision is its own flag, not part of the name.
        model_path, _, revision = model.location.partition("@")
        model_revision = revision or None
    else:
        if spec.model.secret_ref:
            volumes.append({"name": "model-secret", "secret": {"secretName": spec.model.secret_ref}})
            mounts.append(
                {"name": "model-secret", "mountPath": f"{SECRETS_MOUNT}/{spec.model.secret_ref}", "readOnly": True}
            )
        command = [
            "kubetune",
            "fetch-model",
            "--config",
            f"{CONFIG_MOUNT}/{pod.CONFIG_FILE}",
            "--into",
            SERVE_MODEL_MOUNT,
        ]
        init("fetch-model", command, "model", SERVE_MODEL_MOUNT)
        model_path = SERVE_MODEL_MOUNT

    if result.scheme == "pvc":
        adapter_path = claim_path(result.authority, result.path)
    else:
        init("pull-adapter", [*pull, SERVE_ADAPTER_MOUNT, *docker_config], "adapter", SERVE_ADAPTER_MOUNT)
        adapter_path = SERVE_ADAPTER_MOUNT
    return _ServingFiles(volumes, mounts, inits, model_path, adapter_path, model_revision)


def serving_command(target: Target, files: _ServingFiles) -> list[str]:
    """The server's command line: ``kubetune serve`` or ``vllm serve``, every part a :func:`~.pod.literal`."""
    return pod.argv(*_serving_arguments(target, files))


def _serving_arguments(target: Target, files: _ServingFiles) -> list[str]:
    serving = target.spec.serving
    name = serving_model_name(target)
    port = str(serving.port)
    if serving.runtime == "vllm":
        command = ["vllm", "serve", files.model_path, "--host", "0.0.0.0", "--port", port]  # noqa: S104
        if files.model_revision:
            # vLLM takes the tokenizer from the default branch unless told otherwise.
            command += ["--revision", files.model_revision, "--tokenizer-revision", files.model_revision]
        if files.adapter_path is None:
            return [*command, "--served-model-name", name]
        lora = target.spec.method.effective_lora
        rank = max_lora_rank(lora.r if lora else 16)
        return [
            *command,
            "--enable-lora",
            "--lora-modules",
            f"{name}={files.adapter_path}",
            "--max-lora-rank",
            str(rank),
        ]
    command = ["kubetune", "serve", "--model", files.model_path, "--port", port]
    if files.adapter_path is None:
        return [*command, "--base-name", name]
    return [*command, "--adapter", f"{name}={files.adapter_path}"]


def server_probes(*, vllm: bool) -> Obj:
    """A server container's readiness, startup and liveness probes (vLLM's /health, or /readyz and /healthz)."""
    ready_path, live_path = ("/health", "/health") if vllm else ("/readyz", "/healthz")
    return {
        "readinessProbe": {
            "httpGet": {"path": ready_path, "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,  # a CPU server answers probes between generated tokens
            "failureThreshold": 3,
        },
        # Loading a large model takes minutes: the startup probe holds the liveness probe off until then.
        "startupProbe": {"httpGet": {"path": live_path, "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "livenessProbe": {
            "httpGet": {"path": live_path, "port": "http"},
            "periodSeconds": 15,
            "timeoutSeconds": 5,
            "failureThreshold": 4,
        },
    }


def serving_labels(target: Target) -> dict[str, str]:
    return {**target.labels, names.ROLE_LABEL: names.ROLE_SERVER}


def build_serving_deployment(target: Target, adapter_uri: str) -> Obj:
    """The Deployment of the OpenAI-compatible server for the published adapter."""
    serving = target.spec.serving
    files = _serving_files(target, adapter_uri)
    vllm = serving.runtime == "vllm"
    labels = serving_labels(target)
    container: Obj = {
        "name": names.SERVER_CONTAINER,
        "image": target.settings.vllm_image if vllm else target.settings.trainer_image,
        "command": serving_command(target, files),
        # The built-in server (not vLLM) gets OMP_NUM_THREADS from the CPU request.
        "env": [*_server_env(), *([] if vllm else pod.thread_env(target, 1))],
        "ports": [{"name": "http", "containerPort": serving.port}],
        "resources": pod.resources(target, serving_gpus(target)),
        **server_probes(vllm=vllm),
        "securityContext": pod.container_security(),
        "volumeMounts": [*files.mounts, *([pod.shm_mount()] if vllm else [])],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": target.meta(names.serving(target.name), **{names.ROLE_LABEL: names.ROLE_SERVER}),
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod.pod_spec(
                    target,
                    names.ROLE_SERVER,
                    init_containers=files.init_containers,
                    containers=[container],
                    volumes=[*files.volumes, *([pod.shm_volume(target)] if vllm else [])],
                ),
            },
        },
    }


def build_serving_service(target: Target) -> Obj:
    """The ClusterIP Service in front of the serving pods (status.endpoint.url names it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": target.meta(names.serving(target.name), **{names.ROLE_LABEL: names.ROLE_SERVER}),
        "spec": {
            "selector": serving_labels(target),
            "ports": [{"name": "http", "port": target.spec.serving.port, "targetPort": "http"}],
        },
    }
