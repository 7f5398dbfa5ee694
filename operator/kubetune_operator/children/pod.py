"""The parts every pod of a FineTuneJob shares, in one copy.

Security contexts, placement on the job's nodes, resource requests, the failure policy of a
Job's container, the config, workspace, shared-memory and source volumes with their mounts, the
base environment, and :func:`pod_spec`, which assembles a pod template's spec from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kubetune_api import CONFIG_MOUNT, OUTPUT_MOUNT, SECRETS_MOUNT, SOURCES_MOUNT, Mounts, parse_uri
from kubetune_api.objects import Obj
from kubetune_api.uris import DATASET_SCHEMES, MODEL_SCHEMES, OUTPUT_SCHEMES
from kubetune_operator import names
from kubetune_operator.children.target import Target

CONFIG_FILE: Final = "config.json"
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
#: Exit code by which the trainer says "retrying will not help" (bad config, bad data).
PERMANENT_EXIT_CODE: Final = 2
NON_ROOT_UID: Final = 1000

# ------------------------------------------------------------------------------- security


def pod_security() -> Obj:
    """Non-root with the image's user and group, the default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> Obj:
    """No privilege escalation, no capabilities, non-root."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


# ------------------------------------------------------------------------------ placement


def placement(target: Target, role: str) -> tuple[Obj, list[Obj]]:
    """Node selector and tolerations: the nodes of the job's own NodePool of ``role`` (karpenter), or the byo selector."""
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in target.spec.resources.tolerations]
    if target.spec.resources.provisioner == "karpenter":
        tolerations.append({"key": names.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
        # Karpenter's own pool label tells its scheduler which pool the pending pods need; the uid
        # makes sure it is this job's pool and no other that happens to share the name.
        pool = names.node_pool(target.namespace, target.name, role)
        return {names.NODEPOOL_LABEL: pool, names.UID_LABEL: target.uid}, tolerations
    return dict(target.spec.resources.node_selector), tolerations


def gang_annotations(target: Target) -> Obj:
    """Annotations of pods that must not lose their node while they run: Karpenter never disrupts it (karpenter)."""
    return {names.DO_NOT_DISRUPT: "true"} if target.spec.resources.provisioner == "karpenter" else {}


def resources(target: Target, gpus: int) -> Obj:
    """Requests and limits of a container with ``gpus`` GPUs and the spec's CPU and memory (memory is also the limit)."""
    spec = target.spec.resources
    limits: Obj = {spec.gpu_resource_name: str(gpus)} if gpus else {}
    requests: Obj = dict(limits)
    if spec.cpu:
        requests["cpu"] = spec.cpu
    if spec.memory:
        requests["memory"] = spec.memory
        limits["memory"] = spec.memory
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def failure_policy(container: str) -> Obj:
    """A Job's podFailurePolicy: ``container`` exiting with PERMANENT_EXIT_CODE fails the Job at once."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": container, "operator": "In", "values": [PERMANENT_EXIT_CODE]},
            }
        ]
    }


# -------------------------------------------------------------------------------- volumes


def config_volume(target: Target) -> Obj:
    """The rendered trainer config (the ConfigMap of :func:`~.training.build_config_map`)."""
    return {"name": "config", "configMap": {"name": names.config_map(target.name)}}


def config_mount() -> Obj:
    return {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}


def workspace_claim(target: Target) -> str:
    """The checkpoint and output volume's claim: the spec's existing claim, or the job's own."""
    return target.spec.resources.storage.existing_claim or names.pvc(target.name)


def workspace_volume(target: Target) -> Obj:
    return {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(target)}}


def workspace_mount() -> Obj:
    return {"name": "workspace", "mountPath": OUTPUT_MOUNT}


def shm_volume(target: Target) -> Obj:
    """An in-memory /dev/shm of resources.sharedMemory, for NCCL and data loaders."""
    return {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": target.spec.resources.shared_memory}}


def shm_mount() -> Obj:
    return {"name": "shm", "mountPath": "/dev/shm"}  # noqa: S108 - a memory emptyDir for NCCL and data loaders


@dataclass(frozen=True, slots=True)
class SourceVolume:
    """A volume for a source, a destination or a Secret, and where it is mounted."""

    name: str
    source: Obj
    mount_path: str
    read_only: bool

    @property
    def volume(self) -> Obj:
        return {"name": self.name, **self.source}

    @property
    def mount(self) -> Obj:
        return {"name": self.name, "mountPath": self.mount_path, "readOnly": self.read_only}


def source_volumes(target: Target) -> tuple[list[SourceVolume], Mounts]:
    """Volumes for pvc:// and configmap:// sources and for secretRefs, and where the trainer finds them."""
    volumes: list[SourceVolume] = []
    claims: dict[str, str] = {}
    config_maps: dict[str, str] = {}
    secrets: dict[str, str] = {}
    workspace = workspace_claim(target)
    spec = target.spec
    uris = [(spec.model.source, MODEL_SCHEMES), (spec.dataset.source, DATASET_SCHEMES)]
    if spec.output.destination:
        uris.append((spec.output.destination, OUTPUT_SCHEMES))
    for uri, schemes in uris:
        source = parse_uri(uri, schemes)
        if source.scheme == "pvc":
            claim = source.authority
            if claim == workspace:
                claims[claim] = OUTPUT_MOUNT
            elif claim not in claims:
                path = f"{SOURCES_MOUNT}/pvc/{claim}"
                claims[claim] = path
                volumes.append(
                    SourceVolume(f"pvc-{len(claims)}", {"persistentVolumeClaim": {"claimName": claim}}, path, False)
                )
        elif source.scheme == "configmap" and source.authority not in config_maps:
            path = f"{SOURCES_MOUNT}/configmap/{source.authority}"
            config_maps[source.authority] = path
            volumes.append(
                SourceVolume(f"cm-{len(config_maps)}", {"configMap": {"name": source.authority}}, path, True)
            )
    for secret in (spec.model.secret_ref, spec.dataset.secret_ref, spec.output.secret_ref):
        if secret and secret not in secrets:
            path = f"{SECRETS_MOUNT}/{secret}"
            secrets[secret] = path
            volumes.append(SourceVolume(f"secret-{len(secrets)}", {"secret": {"secretName": secret}}, path, True))
    return volumes, Mounts(output=OUTPUT_MOUNT, claims=claims, config_maps=config_maps, secrets=secrets)


# ------------------------------------------------------------------------------ containers


@dataclass(frozen=True, slots=True)
class EnvRef:
    """``$(NAME)`` in a command line: the kubelet puts the container's variable ``NAME`` there."""

    name: str


def literal(text: str) -> str:
    """``text`` written so that it reaches the process unchanged as a command or argument.

    The kubelet expands ``$(VAR)`` in a container's command and args from the container's
    environment and turns ``$$`` into ``$``: with every ``$`` doubled, a ``$(VAR)`` in a user's
    string (a model name, a URI, a path) stays what the user wrote.
    """
    return text.replace("$", "$$")


def argv(*parts: str | EnvRef) -> list[str]:
    """A container's command line: every string as a :func:`literal`, every :class:`EnvRef` for the kubelet to expand.

    Every builder writes its commands through this, so no string from a spec is ever expanded.
    """
    return [f"$({part.name})" if isinstance(part, EnvRef) else literal(part) for part in parts]


def base_env(*, termination_message: bool = False) -> list[Obj]:
    """The environment of every container: PYTHONUNBUFFERED, after KUBETUNE_TERMINATION_MESSAGE_PATH for those that report."""
    reports = [{"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH}]
    return [*(reports if termination_message else []), {"name": "PYTHONUNBUFFERED", "value": "1"}]


def termination_message() -> Obj:
    """The container fields of a reporting container: its message file, else the end of its log."""
    return {"terminationMessagePath": TERMINATION_MESSAGE_PATH, "terminationMessagePolicy": "FallbackToLogsOnError"}


def cpus(quantity: str) -> float:
    """A CPU quantity (``2``, ``500m``) in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def thread_env(target: Target, processes: int) -> list[Obj]:
    """OMP_NUM_THREADS from the pod's CPU request shared by its ``processes``; none without a CPU request.

    torchrun sets it to 1 only with several processes per node; a single process per pod would
    otherwise start a thread per core of the machine, which oversubscribes shared nodes badly.
    """
    if not target.spec.resources.cpu:
        return []
    threads = max(1, int(cpus(target.spec.resources.cpu) // processes))
    return [{"name": "OMP_NUM_THREADS", "value": str(threads)}]


def pod_spec(
    target: Target,
    role: str | None,
    *,
    containers: list[Obj],
    volumes: list[Obj],
    init_containers: list[Obj] | None = None,
    subdomain: str | None = None,
    restart_policy: str | None = None,
) -> Obj:
    """A pod template's spec: no API token nor service links, the pod security, placed on the nodes of ``role``
    (anywhere the scheduler finds room, without the GPU nodes' toleration, when ``role`` is None)."""
    selector, tolerations = placement(target, role) if role else ({}, [])
    return {
        **({"subdomain": subdomain} if subdomain else {}),
        **({"restartPolicy": restart_policy} if restart_policy else {}),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
        **({"nodeSelector": selector} if selector else {}),
        **({"tolerations": tolerations} if tolerations else {}),
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": containers,
        "volumes": volumes,
    }
