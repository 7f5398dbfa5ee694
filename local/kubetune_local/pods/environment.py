"""What a container's process is started with: its environment and its command line.

The environment is this runtime's own (less what only the runtime may see), plus ``env`` and
``envFrom`` with ConfigMap, Secret, downward-API and resource references resolved and ``$(VAR)``
expanded. As a kubelet does, ``$(VAR)`` in values, commands and arguments expands only from the
container's own declared environment (and the API's service variables), never from the runtime's,
and ``$$`` stands for ``$``. Mount paths in values and arguments are rewritten to their folders and
the cluster DNS names of the runtime's pods to their addresses. A pod with a service-account token
mounted gets a kubeconfig holding it: in-cluster config, locally.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune_local.controlplane import MARK_ENV
from kubetune_local.kube import Obj
from kubetune_local.pods.context import PodContext
from kubetune_local.pods.sources import VolumeNotReady, field, files_of, read
from kubetune_local.pods.volumes import rewrite_paths

#: Environment variables of the runtime itself that a pod must not inherit: pods get the API
#: only through their own service-account token, as in a cluster.
_NOT_INHERITED: Final = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
_SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (its third_party ``expansion`` package, rule for rule).

    ``$(VAR)`` becomes VAR's value from ``env`` and stays as written when VAR is not there; ``$$``
    is an escaped ``$``, so ``$$(VAR)`` stays ``$(VAR)``; any other ``$`` is kept, as is an
    unclosed ``$(``.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            following = text[cursor + 1]
            if following == "$":  # an escaped operator
                out.append("$")
                cursor += 1
            elif following == "(":
                closer = text.find(")", cursor + 2)
                if closer == -1:  # an incomplete reference: kept as it is
                    out.append("$(")
                    cursor += 1
                else:
                    name = text[cursor + 2 : closer]
                    out.append(env.get(name, f"$({name})"))
                    cursor = closer
            else:  # not a reference: the operator and the character after it are kept
                out.append("$" + following)
                cursor += 1
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def service_variables(pod: PodContext) -> dict[str, str]:
    """The variables a kubelet gives every container for the API's Service, in any namespace."""
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(pod.runtime.apiserver_port),
    }


def _env_from_source(pod: PodContext, kind: str, name: str, optional: bool) -> dict[str, str]:
    obj = read(pod, kind, name, optional)
    if obj is None:
        return {}
    return {k: v.decode(errors="replace") for k, v in files_of(kind, obj, None).items()}


@dataclass(frozen=True, slots=True)
class Environment:
    """What a container's process is started with, and what its command line expands from."""

    process: dict[str, str]
    """The process's environment: the runtime's own (less what only it may see) and the container's."""
    variables: dict[str, str]
    """What ``$(VAR)`` expands from: the container's declared variables and the API's service variables,
    as a kubelet has them (values as declared, before mount paths and DNS names are made local)."""


def environment(pod: PodContext, container: Obj, mounts: dict[str, Path]) -> Environment:
    """The container's environment; VolumeNotReady when a referenced ConfigMap or Secret (key) is missing."""
    runtime = pod.runtime
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    home = pod.root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "HOSTNAME": pod.hostname,
            "PYTHONUNBUFFERED": "1",
            "KUBETUNE_LOCAL_HOME": str(runtime.home),
            MARK_ENV: str(runtime.home),
            "KUBETUNE_LOCAL_POD": pod.uid,
        }
    )
    services = service_variables(pod)
    spec_env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            values = _env_from_source(pod, "ConfigMap", ref["name"], ref.get("optional", False))
        else:
            ref = source["secretRef"]
            values = _env_from_source(pod, "Secret", ref["name"], ref.get("optional", False))
        spec_env.update({prefix + k: v for k, v in values.items()})
    for item in container.get("env", []):
        if "valueFrom" not in item:
            spec_env[item["name"]] = expand(str(item.get("value", "")), {**services, **spec_env})
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            spec_env[item["name"]] = field(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind = "ConfigMap" if "configMapKeyRef" in source else "Secret"
            ref = source["configMapKeyRef" if kind == "ConfigMap" else "secretKeyRef"]
            values = _env_from_source(pod, kind, ref["name"], ref.get("optional", False))
            if ref["key"] in values:
                spec_env[item["name"]] = values[ref["key"]]
            elif not ref.get("optional", False):
                raise VolumeNotReady(f'{kind.lower()} "{ref["name"]}" has no key {ref["key"]!r}')
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]
            section, _, kind = resource.partition(".")
            value = ((container.get("resources") or {}).get(section) or {}).get(kind, "0")
            spec_env[item["name"]] = str(value)
    subdomains = runtime.subdomains(pod.namespace)
    for key, value in spec_env.items():
        local_value = rewrite_paths(value, mounts)
        env[key] = runtime.addresses.resolve(local_value, pod.namespace, subdomains)
    token = mounts.get(_SERVICE_ACCOUNT_DIR)
    if token is not None and (token / "token").exists():
        env["KUBECONFIG"] = str(_service_account_kubeconfig(pod, token))
    env.update(services)
    return Environment(process=env, variables={**services, **spec_env})


def _service_account_kubeconfig(pod: PodContext, directory: Path) -> Path:
    """A kubeconfig holding the pod's own service-account token: in-cluster config, locally."""
    path = pod.root / "serviceaccount.kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "in-cluster",
                "cluster": {
                    "server": f"https://127.0.0.1:{pod.runtime.apiserver_port}",
                    "certificate-authority": str(directory / "ca.crt"),
                },
            }
        ],
        "users": [{"name": "pod", "user": {"token": (directory / "token").read_text().strip()}}],
        "contexts": [
            {"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "pod", "namespace": pod.namespace}}
        ],
        "current-context": "in-cluster",
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    path.chmod(0o600)
    return path


def command_line(pod: PodContext, container: Obj, env: Environment, mounts: dict[str, Path]) -> list[str]:
    """The container's command and args: ``$(VAR)`` expanded from the container's variables, mount paths and
    pod DNS names made local."""
    argv = [expand(a, env.variables) for a in [*container.get("command", []), *container.get("args", [])]]
    subdomains = pod.runtime.subdomains(pod.namespace)
    return [pod.runtime.addresses.resolve(rewrite_paths(a, mounts), pod.namespace, subdomains) for a in argv]
