"""Real Kueue for the local runtime: its manager, CRDs and admission webhooks, from its Go module.

Kueue (``sigs.k8s.io/kueue``) is the cluster's job queueing: with it, a Job created with the
``kueue.x-k8s.io/queue-name`` label is suspended by Kueue's mutating webhook, becomes a Workload,
and runs when its ClusterQueue has quota for it. The local runtime runs Kueue's own manager as
a process of the cluster, as it runs Karpenter (:mod:`kubetune_local.karpenter`):

- **Binary.** ``cmd/kueue`` of the module, built once into
  ``~/.cache/kubetune/kueue/<version>/bin/kueue`` from a generated wrapper module whose
  ``main.go`` is Kueue's own with one line changed (:func:`patched_main`): the folder of the
  metrics certificate, hard-coded to ``/etc/kueue/metrics/certs`` when Kueue's internal
  certificate management is off, is read from ``$KUBETUNE_KUEUE_METRICS_CERT_DIR``.
- **Manifests.** The module's CRDs (``config/components/crd/bases``), its webhook configurations
  (``config/components/webhook/manifests.yaml``) and the names of the CRDs that its kustomization
  serves through the conversion webhook, copied once into ``~/.cache/kubetune/kueue/<version>``.
- **Webhooks on loopback.** Kueue serves its webhooks (and the CRD conversion at ``/convert``)
  on ``127.0.0.1`` with a serving certificate from the cluster's CA (:mod:`kubetune_local.pki`);
  the installed configurations call ``https://127.0.0.1:<port>/<path>`` with that CA as their
  ``caBundle`` instead of a Service. Only the webhooks of Kueue's own kinds and of the enabled
  integrations are installed: Kueue answers the others (pods, deployments, ...) with a no-op, and
  leaving them out keeps the creation of every pod independent of Kueue's process.
- **Configuration** (:func:`configuration`): ``config.kueue.x-k8s.io/v1beta2`` with the
  ``batch/job`` integration only, ``manageJobsWithoutQueueName: false``, no leader election, no
  ``waitForPodsReady``, internal certificate management off, and every listener on a loopback
  port of its own (webhooks, metrics, health). The visibility API server is off
  (``VisibilityOnDemand: false``): it would bind port 8082 on every interface and needs certificates
  in ``/visibility``.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import sys
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from kubetune_local.binaries import BuildError, Progress, build_wrapper, cache_root, go_env, go_module
from kubetune_local.controlplane import free_port, spawn_logged
from kubetune_local.kube import Obj
from kubetune_local.pki import CertificateAuthority

KUEUE_VERSION: Final = "v0.17.0"
"""sigs.k8s.io/kueue release; its go.mod asks for Go 1.25, its API is kueue.x-k8s.io/v1beta2."""
MODULE: Final = "sigs.k8s.io/kueue"
BINARY: Final = "kueue"
NAMESPACE: Final = "kueue-system"
"""The namespace Kueue's configuration names (it keeps its Secrets there; no pod runs in it)."""
QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
"""The label that puts a Job into a LocalQueue."""
API_GROUP: Final = "kueue.x-k8s.io"
API_VERSION: Final = "v1beta2"
"""The storage version of Kueue's kinds in this release (v1beta1 is still served, converted)."""

FRAMEWORKS: Final = ("batch/job",)
"""The integrations enabled in the configuration."""
FRAMEWORK_RESOURCES: Final[dict[str, tuple[str, str]]] = {"batch/job": ("batch", "jobs")}
"""(API group, resource) each integration's webhooks admit: which webhooks to install."""

METRICS_CERT_ENV: Final = "KUBETUNE_KUEUE_METRICS_CERT_DIR"
"""Where the patched manager looks for the metrics server's ``tls.crt`` and ``tls.key``."""
_METRICS_CERT_LINE: Final = 'metricsCertPath := "/etc/kueue/metrics/certs"'
_METRICS_CERT_PATCH: Final = (
    "metricsCertPath := func() string {"
    f' if dir := os.Getenv("{METRICS_CERT_ENV}"); dir != "" {{ return dir }};'
    ' return "/etc/kueue/metrics/certs" }()'
)

#: Environment variable that turns Kueue on for ``kubetune local up`` (any of 1, true, yes).
KUEUE_ENV: Final = "KUBETUNE_LOCAL_KUEUE"

WEBHOOK_MANIFEST: Final = "webhooks.yaml"
CONVERSION_LIST: Final = "conversion-webhook-crds.txt"


def kueue_root(version: str = KUEUE_VERSION) -> Path:
    return cache_root().parent / "kueue" / version


def binary_path(version: str = KUEUE_VERSION) -> Path:
    return kueue_root(version) / "bin" / BINARY


def enabled_by_environment() -> bool:
    """Whether ``$KUBETUNE_LOCAL_KUEUE`` asks for Kueue."""
    return os.environ.get(KUEUE_ENV, "").strip().lower() in ("1", "true", "yes")


def _module_dir() -> Path:
    return go_module(MODULE, KUEUE_VERSION, kueue_root(), env=go_env())


def patched_main(source: str) -> str:
    """Kueue's ``cmd/kueue/main.go`` with the metrics certificate folder read from the environment.

    With internal certificate management off, the manager insists on ``tls.crt`` and ``tls.key``
    in ``/etc/kueue/metrics/certs`` (a Secret mounted there in a cluster) and exits without them;
    a local cluster has no such mount and must not need root. Nothing else changes: unset, the
    variable leaves Kueue's own path.
    """
    if source.count(_METRICS_CERT_LINE) != 1:
        raise BuildError(
            f"Kueue {KUEUE_VERSION}'s cmd/kueue/main.go no longer holds `{_METRICS_CERT_LINE}` exactly once; "
            "update kubetune_local.kueue.patched_main for this release"
        )
    return source.replace(_METRICS_CERT_LINE, _METRICS_CERT_PATCH)


def ensure_binary(progress: Progress | None = None) -> Path:
    """The Kueue manager, built into the cache on first use (about 13 minutes on 2 busy cores)."""
    target = binary_path()
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if shutil.which("go") is None:
        raise BuildError(f"the `go` command is needed once to build Kueue ({MODULE}@{KUEUE_VERSION}); install Go 1.25+")
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    say(f"building {BINARY} (Kueue {KUEUE_VERSION}) into {target.parent} (first run only)")
    source = (_module_dir() / "cmd" / "kueue" / "main.go").read_text(encoding="utf-8")
    build_wrapper(
        BINARY,
        module=MODULE,
        version=KUEUE_VERSION,
        main_go=patched_main(source),
        target=target,
        work=kueue_root() / "build" / BINARY,
        ldflags=f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",
        say=say,
    )
    say(f"built {BINARY} in {time.monotonic() - started:.0f}s")
    return target


@dataclass(frozen=True, slots=True)
class Manifests:
    """Kueue's manifests, cached from its module."""

    crds: list[Path]
    webhooks: Path
    """The module's Mutating- and ValidatingWebhookConfiguration (Service client configs)."""
    conversion: frozenset[str]
    """Names of the CRDs that Kueue's kustomization serves through its conversion webhook."""


def manifests(progress: Progress | None = None) -> Manifests:
    """The CRDs, webhook configurations and conversion list, copied from the module once."""
    root = kueue_root() / "manifests"
    listing = root / CONVERSION_LIST
    if not listing.exists():
        if shutil.which("go") is None:
            raise BuildError(f"the `go` command is needed once to fetch Kueue's manifests ({MODULE}@{KUEUE_VERSION})")
        say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        say(f"fetching Kueue {KUEUE_VERSION} CRDs and webhook configurations from {MODULE}")
        components = _module_dir() / "config" / "components"
        (root / "crds").mkdir(parents=True, exist_ok=True)
        kustomization = yaml.safe_load((components / "crd" / "kustomization.yaml").read_text(encoding="utf-8"))
        for name in kustomization["resources"]:
            shutil.copyfile(components / "crd" / name, root / "crds" / Path(name).name)
        shutil.copyfile(components / "webhook" / "manifests.yaml", root / WEBHOOK_MANIFEST)
        names = conversion_crds(
            yaml.safe_load((components / "crd" / entry["path"]).read_text(encoding="utf-8"))
            for entry in kustomization.get("patches") or []
            if Path(entry["path"]).name.startswith("webhook_in_")
        )
        listing.write_text("".join(f"{name}\n" for name in sorted(names)), encoding="utf-8")
    return Manifests(
        crds=sorted((root / "crds").glob("*.yaml")),
        webhooks=root / WEBHOOK_MANIFEST,
        conversion=frozenset(listing.read_text(encoding="utf-8").split()),
    )


def conversion_crds(patches: Iterable[Obj]) -> set[str]:
    """The CRD names that kustomize patches give a ``Webhook`` conversion strategy."""
    return {
        str(patch["metadata"]["name"])
        for patch in patches
        if ((patch.get("spec") or {}).get("conversion") or {}).get("strategy") == "Webhook"
    }


# ------------------------------------------------------------------------------ pure manifests


def webhook_url(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def webhook_configurations(
    documents: Iterable[Obj], *, port: int, ca_bundle: bytes, frameworks: Collection[str] = FRAMEWORKS
) -> list[Obj]:
    """Kueue's webhook configurations, calling ``https://127.0.0.1:<port>`` instead of its Service.

    Each webhook keeps its name, rules, failure policy and path; its ``clientConfig`` becomes that
    URL with ``ca_bundle`` (PEM) as the trusted CA. Only the webhooks of Kueue's own kinds and of
    ``frameworks`` are kept, and each configuration is named ``kueue-<name>`` as Kueue's
    kustomization names it.
    """
    allowed = {API_GROUP} | {FRAMEWORK_RESOURCES[name][0] for name in frameworks}
    resources = {FRAMEWORK_RESOURCES[name] for name in frameworks}
    bundle = base64.b64encode(ca_bundle).decode("ascii")
    rewritten: list[Obj] = []
    for document in documents:
        if document.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        configuration = copy.deepcopy(document)
        configuration["metadata"] = {"name": f"kueue-{document['metadata']['name']}"}
        kept = []
        for hook in configuration.get("webhooks") or []:
            if not any(_admits(rule, allowed, resources) for rule in hook.get("rules") or []):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": webhook_url(port, path), "caBundle": bundle}
            kept.append(hook)
        configuration["webhooks"] = kept
        rewritten.append(configuration)
    return rewritten


def _admits(rule: Obj, groups: set[str], resources: set[tuple[str, str]]) -> bool:
    """Whether a webhook rule concerns Kueue's own group or one of the enabled (group, resource)."""
    rule_groups = set(rule.get("apiGroups") or [])
    if API_GROUP in rule_groups:
        return True
    return any((group, resource) in resources for group in rule_groups & groups for resource in rule["resources"])


def with_conversion_webhook(crd: Obj, *, port: int, ca_bundle: bytes) -> Obj:
    """``crd`` converting between its versions through Kueue's ``/convert`` on loopback."""
    converted = copy.deepcopy(crd)
    converted["spec"]["conversion"] = {
        "strategy": "Webhook",
        "webhook": {
            "clientConfig": {
                "url": webhook_url(port, "/convert"),
                "caBundle": base64.b64encode(ca_bundle).decode("ascii"),
            },
            "conversionReviewVersions": ["v1"],
        },
    }
    return converted


def crd_documents(found: Manifests, *, port: int, ca_bundle: bytes) -> list[Obj]:
    """Kueue's CRDs as installed: those its kustomization converts by webhook call ours."""
    documents = []
    for path in found.crds:
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        if crd["metadata"]["name"] in found.conversion:
            crd = with_conversion_webhook(crd, port=port, ca_bundle=ca_bundle)
        documents.append(crd)
    return documents


@dataclass(frozen=True, slots=True)
class Ports:
    """Kueue's loopback listeners."""

    webhook: int
    metrics: int
    health: int


def configuration(*, ports: Ports, cert_dir: Path, frameworks: Collection[str] = FRAMEWORKS) -> Obj:
    """Kueue's Configuration (``config.kueue.x-k8s.io/v1beta2``) for a local cluster.

    ``waitForPodsReady`` is absent, which is how v1beta2 leaves it off (the section's presence
    turns it on). The webhook server reads ``tls.crt``/``tls.key`` from ``cert_dir``.
    """
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.metrics}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "integrations": {"frameworks": list(frameworks)},
        "featureGates": {"VisibilityOnDemand": False},
    }


# ------------------------------------------------------------------------------- the process


@dataclass(frozen=True, slots=True)
class Setup:
    """What one cluster's Kueue runs with."""

    binary: Path
    manifests: Manifests
    ports: Ports
    cert_dir: Path
    """Holds ``tls.crt`` and ``tls.key``: the webhook and metrics servers' certificate."""
    ca_bundle: bytes
    """The PEM of the CA that issued it (the cluster's own)."""
    config: Path


def serving_certificate(pki: Path, cert_dir: Path) -> bytes:
    """Issue Kueue's serving certificate from the cluster CA in ``pki`` (reused once issued), put
    it in ``cert_dir`` as ``tls.crt``/``tls.key``, and return the CA's PEM."""
    ca = CertificateAuthority(pki)
    pair = ca.issue(
        "kueue-serving", common_name="kueue-webhook", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True
    )
    cert_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pair.cert, cert_dir / "tls.crt")
    shutil.copyfile(pair.key, cert_dir / "tls.key")
    (cert_dir / "tls.key").chmod(0o600)
    return ca.pair.cert.read_bytes()


def prepare(home: Path, binary: Path, found: Manifests) -> Setup:
    """For the cluster at ``home`` (its CA in ``pki``): choose free loopback ports, issue the
    serving certificate and write the Configuration file ``kueue/config.yaml``."""
    ports = Ports(webhook=free_port(), metrics=free_port(), health=free_port())
    cert_dir = home / "kueue" / "certs"
    ca_bundle = serving_certificate(home / "pki", cert_dir)
    config = home / "kueue" / "config.yaml"
    config.write_text(yaml.safe_dump(configuration(ports=ports, cert_dir=cert_dir), sort_keys=False), encoding="utf-8")
    return Setup(binary=binary, manifests=found, ports=ports, cert_dir=cert_dir, ca_bundle=ca_bundle, config=config)


def command(binary: Path, config: Path) -> list[str]:
    """How the local runtime runs Kueue (its kubeconfig comes from ``$KUBECONFIG``)."""
    return [str(binary), f"--config={config}", "--zap-log-level=info"]


def spawn(home: Path, setup: Setup) -> int:
    """Start Kueue against the cluster at ``home`` with the admin kubeconfig; log ``logs/kueue.log``."""
    env = {**os.environ, "KUBECONFIG": str(home / "kubeconfig"), METRICS_CERT_ENV: str(setup.cert_dir)}
    return spawn_logged(command(setup.binary, setup.config), home / "logs" / "kueue.log", env)
