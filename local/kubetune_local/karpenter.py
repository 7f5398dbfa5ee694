"""Real Karpenter for the local runtime: core's KWOK cloud provider, built from its Go module.

``karpenter-kwok`` is Karpenter core (``sigs.k8s.io/karpenter``) with its KWOK cloud provider
and a short main of ours (``local/karpenter/main.go``) that honours ``"Available": false`` in
the instance-type catalog. It is built once from a generated wrapper module, like the
Kubernetes binaries (see :mod:`kubetune_local.binaries`), and cached under
``~/.cache/kubetune/karpenter/<version>/bin``. The catalog is written from
:mod:`kubetune_local.catalog` in kwok's JSON format: each GPU type with its real vCPUs, memory
and ``nvidia.com/gpu`` count, an on-demand and a spot offering in its zone; a type listed as
unavailable keeps its offerings but none is available, which is how a launch failure is
injected. Karpenter creates the Node objects itself (``providerID: kwok://<node>``); the node
daemon adopts them (:class:`kubetune_local.adopt.KarpenterNodeAdopter`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Final

from kubetune_local.binaries import (
    KARPENTER_VERSION,
    BuildError,
    Progress,
    build_wrapper,
    cache_root,
    go_env,
    karpenter_module,
)
from kubetune_local.catalog import CATALOG, InstanceType, capacity_of
from kubetune_local.controlplane import spawn_logged
from kubetune_local.kube import Obj

BINARY: Final = "karpenter-kwok"
MAIN_GO: Final = Path(__file__).resolve().parent.parent / "karpenter" / "main.go"
NODECLASS_CRD: Final = "karpenter.kwok.sh_kwoknodeclasses.yaml"
NODECLASS_NAME: Final = "default"
"""The KWOKNodeClass every NodePool of the local runtime refers to."""
KWOK_NODE_CLASS: Final = ("karpenter.kwok.sh", "KWOKNodeClass")
"""(group, kind) of that NodeClass: Karpenter ignores claims of any other class."""
FEATURE_GATES: Final = (
    "NodeRepair=false,ReservedCapacity=true,SpotToSpotConsolidation=false,NodeOverlay=false,StaticCapacity=true"
)
SPOT_DISCOUNT: Final = 0.4
"""Spot price as a fraction of on-demand (no real price list: Karpenter only compares them)."""


def karpenter_root(version: str = KARPENTER_VERSION) -> Path:
    return cache_root().parent / "karpenter" / version


def binary_path(version: str = KARPENTER_VERSION) -> Path:
    """Where the binary built from this checkout's ``main.go`` lives: a changed main is a new binary."""
    source = hashlib.sha256(MAIN_GO.read_bytes()).hexdigest()[:12]
    return karpenter_root(version) / "bin" / source / BINARY


def _price(instance: InstanceType) -> float:
    """An on-demand hourly price that orders types sensibly: GPUs dominate, then vCPUs."""
    return round(instance.gpus * 3.0 + instance.cpu * 0.04 + instance.memory_gib * 0.005, 3)


def kwok_catalog(unavailable: Collection[str] = ()) -> list[Obj]:
    """The catalog in kwok's instance-type JSON; types in ``unavailable`` have no available offering."""
    entries: list[Obj] = []
    for instance in CATALOG.values():
        resources = capacity_of(instance)
        price = _price(instance)
        offerings = [
            {
                "Price": round(price * factor, 3),
                "Available": instance.name not in unavailable,
                "Requirements": [
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": [capacity_type]},
                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [instance.zone]},
                ],
            }
            for capacity_type, factor in (("on-demand", 1.0), ("spot", SPOT_DISCOUNT))
        ]
        entries.append(
            {
                "name": instance.name,
                "offerings": offerings,
                "architecture": "amd64",
                "operatingSystems": ["linux"],
                "resources": resources,
            }
        )
    return entries


def nodeclass_crd() -> Path:
    """The KWOKNodeClass CRD, from the Karpenter module, cached beside Karpenter's own CRDs."""
    target = karpenter_root() / NODECLASS_CRD
    if not target.exists():
        module = _module_dir()
        shutil.copyfile(module / "kwok" / "apis" / "crds" / NODECLASS_CRD, target)
    return target


def _module_dir() -> Path:
    return karpenter_module(karpenter_root(), env=go_env())


def ensure_binary(progress: Progress | None = None) -> Path:
    """The ``karpenter-kwok`` binary, built into the cache on first use (~6 min on 2 cores)."""
    target = binary_path()
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if shutil.which("go") is None:
        raise BuildError("the `go` command is needed once to build Karpenter (sigs.k8s.io/karpenter)")
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    say(f"building {BINARY} (Karpenter {KARPENTER_VERSION}, KWOK provider) into {target.parent} (first run only)")
    build_wrapper(
        BINARY,
        module="sigs.k8s.io/karpenter",
        version=KARPENTER_VERSION,
        main_go=MAIN_GO.read_text(encoding="utf-8"),
        target=target,
        work=karpenter_root() / "build" / BINARY,
        say=say,
    )
    for stale in target.parent.parent.iterdir():  # binaries of other versions of main.go
        if stale != target.parent:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    say(f"built {BINARY} in {time.monotonic() - started:.0f}s")
    return target


def command(binary: Path, catalog: Path, *, metrics_port: int, health_port: int) -> list[str]:
    """How the local runtime runs Karpenter against its apiserver (KUBECONFIG in the environment)."""
    return [
        str(binary),
        f"--instance-types-file-path={catalog}",
        "--disable-leader-election",
        f"--metrics-port={metrics_port}",
        f"--health-probe-port={health_port}",
        f"--feature-gates={FEATURE_GATES}",
        "--batch-idle-duration=1s",
        "--batch-max-duration=3s",
        "--log-level=info",
    ]


def write_catalog(path: Path, unavailable: Collection[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kwok_catalog(unavailable), indent=1) + "\n", encoding="utf-8")
    return path


#: Comma-separated instance types written to the catalog with no available offering.
UNAVAILABLE_ENV: Final = "KUBETUNE_LOCAL_UNAVAILABLE"


def nodeclass() -> Obj:
    """The one KWOKNodeClass; the CRD defaults its status to Ready."""
    return {
        "apiVersion": "karpenter.kwok.sh/v1alpha1",
        "kind": "KWOKNodeClass",
        "metadata": {"name": NODECLASS_NAME},
        "spec": {},
    }


def spawn(home: Path, binary: Path) -> int:
    """Start Karpenter against the cluster at ``home``; its log is ``logs/karpenter.log``."""
    unavailable = [n.strip() for n in os.environ.get(UNAVAILABLE_ENV, "").split(",") if n.strip()]
    catalog = write_catalog(home / "karpenter" / "instance-types.json", unavailable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KARPENTER_", "FEATURE_GATES"))}
    env["KUBECONFIG"] = str(home / "kubeconfig")
    # Port 0: the metrics and health servers take any free port (Karpenter binds them on every
    # interface; it has no bind-address option).
    return spawn_logged(command(binary, catalog, metrics_port=0, health_port=0), home / "logs" / "karpenter.log", env)
