"""The chart installed with helm into the local runtime's real control plane, and the operator it runs.

The Deployment's pod runs ``kubetune operator`` as a real process whose only credential is the
token of the chart's ServiceAccount (the local runtime hands the pod a kubeconfig holding its own
projected token, as a kubelet mounts it in a cluster). So a FineTuneJob taken from creation to its
training Job and NodePool, and back through the finalizer, proves that the chart's RBAC is
enough; ``kubectl auth can-i --as`` proves what it withholds. The install is namespace-scoped,
the stricter of the two modes: a Role in the watched namespace, a ClusterRole only for nodes,
NodePools, NodeClaims, CRDs and namespaces (a unit test shows cluster scope grants the same rules).
"""

from __future__ import annotations

import contextlib
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from kubernetes import client

from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local import cluster
from kubetune_local.controlplane import free_port
from kubetune_local.kube import api_client
from kubetune_operator import names
from tests.chart.conftest import CHART, Helm
from tests.factories import create_job, find_job, finetunejob, wait_until

pytestmark = pytest.mark.integration

RELEASE = "kt"
TRAINER_IMAGE = "registry.test/kubetune/trainer:chart-test"
#: kopf's health endpoint, fixed in the operator (handlers.run_operator); the pod binds it on this machine.
HEALTH_PORT = 8081

T = TypeVar("T")


@dataclass(frozen=True)
class Installed:
    """The release: where the operator runs, what it watches, and its identity."""

    namespace: str
    watched: str
    account: str
    metrics_port: int
    notes: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.account}"


def operator_pod(api: client.ApiClient, installed: Installed) -> client.V1Pod | None:
    pods = client.CoreV1Api(api).list_namespaced_pod(
        installed.namespace, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
    )
    return pods.items[0] if pods.items else None


def operator_log(local_cluster: cluster.Cluster, api: client.ApiClient, installed: Installed) -> str:
    pod = operator_pod(api, installed)
    if pod is None:
        return "(no operator pod)"
    with contextlib.suppress(FileNotFoundError):
        return cluster.pod_log(local_cluster.home, pod.metadata.name, namespace=installed.namespace)
    return "(no log yet)"


def wait_showing_log(
    check: Callable[[], T | None],
    what: str,
    local_cluster: cluster.Cluster,
    api: client.ApiClient,
    installed: Installed,
) -> T:
    """``wait_until``, failing with the operator's log: a refused call (403) shows up there first."""
    try:
        return wait_until(check, timeout=90, what=what)
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\noperator log:\n{operator_log(local_cluster, api, installed)[-4000:]}")


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status), response.read().decode()


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))  # where the operator will bind it
        except OSError:
            return False
        return True


def require_free(port: int) -> None:
    """Wait for ``port``: another operator on this machine (a benchmark, another suite) may hold it."""
    wait_until(
        lambda: port_free(port),
        timeout=120,
        what=f"port {port} to be free on this machine: the chart's operator serves kopf's health endpoint "
        "there, and another kopf operator holds it",
    )


@pytest.fixture(scope="module")
def installed(local_cluster: cluster.Cluster, api: client.ApiClient, helm: Helm) -> Iterator[Installed]:
    require_free(HEALTH_PORT)
    core = client.CoreV1Api(api)
    suffix = uuid.uuid4().hex[:6]
    operator_namespace, watched = f"kubetune-{suffix}", f"ml-{suffix}"
    core.create_namespace({"metadata": {"name": watched}})
    metrics_port = free_port()
    result = helm.run(
        "install",
        RELEASE,
        str(CHART),
        f"--kubeconfig={local_cluster.kubeconfig}",
        f"--namespace={operator_namespace}",
        "--create-namespace",
        "--set=watch.scope=namespaces",
        f"--set=watch.namespaces={{{watched}}}",
        f"--set=metrics.port={metrics_port}",
        "--set=trainerImage.repository=registry.test/kubetune/trainer",
        "--set=trainerImage.tag=chart-test",
    )
    release = Installed(operator_namespace, watched, "kt-kubetune", metrics_port, result.stdout)

    def running() -> client.V1Pod | None:
        pod = operator_pod(api, release)
        if pod is not None and pod.status.container_statuses:
            state = pod.status.container_statuses[0].state
            if state.terminated is not None:
                pytest.fail(f"the operator exited: {state.terminated}\n{operator_log(local_cluster, api, release)}")
        return pod if pod is not None and pod.status.phase == "Running" else None

    try:
        pod = wait_until(running, timeout=90, what="the operator pod to run")
        url = f"http://{pod.status.pod_ip}:{metrics_port}/metrics"
        wait_showing_log(lambda: answers(url), "the operator's metrics endpoint", local_cluster, api, release)
        # kopf serves /healthz once its start-up handlers are done, after the metrics server.
        health = f"http://{pod.status.pod_ip}:{HEALTH_PORT}/healthz"
        wait_showing_log(lambda: answers(health), "the operator's /healthz", local_cluster, api, release)
        yield release
    finally:
        custom = client.CustomObjectsApi(api)
        for job in custom.list_namespaced_custom_object(GROUP, VERSION, watched, PLURAL)["items"]:
            custom.delete_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, job["metadata"]["name"])
        try:
            wait_until(
                lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, watched, PLURAL)["items"],
                timeout=60,
                what="the watched namespace's FineTuneJobs to be released by the operator",
            )
        except pytest.fail.Exception:
            # Only after a failed test (the one that deletes its job checks the release): drop the
            # finalizers, so that the rest of the cleanup runs.
            for job in custom.list_namespaced_custom_object(GROUP, VERSION, watched, PLURAL)["items"]:
                patch = {"metadata": {"finalizers": None}}
                custom.patch_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, job["metadata"]["name"], patch)
        helm.run("uninstall", RELEASE, f"--kubeconfig={local_cluster.kubeconfig}", f"--namespace={operator_namespace}")
        wait_until(lambda: operator_pod(api, release) is None, timeout=60, what="the operator pod to be gone")
        core.delete_namespace(watched)
        core.delete_namespace(operator_namespace)


def test_operator_runs_as_the_charts_service_account(
    installed: Installed, api: client.ApiClient, local_cluster: cluster.Cluster
) -> None:
    pod = operator_pod(api, installed)
    assert pod is not None
    assert pod.spec.service_account_name == installed.account
    token_volumes = [
        v for v in pod.spec.volumes if v.projected and any(s.service_account_token for s in v.projected.sources)
    ]
    assert token_volumes, "the ServiceAccount admission plugin mounted the account's token"
    assert pod.spec.containers[0].command == ["kubetune"]
    assert pod.spec.security_context.run_as_non_root is True
    status, body = get(f"http://{pod.status.pod_ip}:{HEALTH_PORT}/healthz")
    assert status == 200, "the liveness probe's endpoint answers"
    status, body = get(f"http://{pod.status.pod_ip}:{installed.metrics_port}/metrics")
    assert status == 200
    assert "kubetune_reconcile_duration_seconds" in body
    crds = {c.metadata.name for c in client.ApiextensionsV1Api(api).list_custom_resource_definition().items}
    assert {
        "finetunejobs.kubetune.io",
        "modelservers.kubetune.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    } <= crds


def test_the_install_prints_what_to_try_next(installed: Installed) -> None:
    notes = installed.notes.split("NOTES:", 1)[1]
    assert f"kubectl -n {installed.namespace} rollout status deployment/kt-kubetune" in notes
    assert f"kubectl get ftj -n {installed.watched}" in notes
    assert f"kubectl auth can-i --list --as={installed.user} -n {installed.watched}" in notes


def test_a_finetunejob_runs_its_course_on_the_charts_rbac_alone(
    installed: Installed, api: client.ApiClient, local_cluster: cluster.Cluster, namespace: str
) -> None:
    custom, watched = client.CustomObjectsApi(api), installed.watched
    # One job where the operator is not allowed to look, one where it is.
    create_job(api, namespace, finetunejob("elsewhere"))
    resources = {"provisioner": "karpenter", "instanceType": "Standard_NC24ads_A100_v4"}
    create_job(api, watched, finetunejob("tune", resources=resources))

    # Provisioned (its NodePool applied: a dynamic pool's nodes come for the pending pods, so no
    # Karpenter is needed to get this far), staged (PVC, ConfigMap and Service applied) and launched
    # (training Job created) by the operator, with the chart's trainer image.
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)

    def launched() -> bool:
        staged = (
            core.list_namespaced_config_map(watched, label_selector=names.selector(watched, "tune")).items,
            core.list_namespaced_service(watched, label_selector=names.selector(watched, "tune")).items,
            core.list_namespaced_persistent_volume_claim(watched, label_selector=names.selector(watched, "tune")).items,
            batch.list_namespaced_job(watched, label_selector=names.selector(watched, "tune")).items,
        )
        return all(staged)

    wait_showing_log(launched, "the job's PVC, ConfigMap, Service and training Job", local_cluster, api, installed)
    job = batch.read_namespaced_job(names.training_job("tune", 0), watched)
    assert job.spec.template.spec.containers[0].image == TRAINER_IMAGE
    pools = custom.list_cluster_custom_object(
        "karpenter.sh", "v1", "nodepools", label_selector=names.selector(watched, "tune")
    )["items"]
    assert [p["metadata"]["name"] for p in pools] == [names.node_pool(watched, "tune", names.ROLE_TRAINER)]

    def phase() -> str | None:
        found = (find_job(api, watched, "tune") or {}).get("status", {}).get("phase")
        return found if found in {"Provisioning", "Initializing", "Training"} else None

    wait_showing_log(phase, "phase Provisioning in the status", local_cluster, api, installed)
    tune = find_job(api, watched, "tune")
    assert tune is not None
    assert names.FINALIZER in tune["metadata"]["finalizers"], "kopf patched its finalizer in"

    def event() -> bool:
        events = core.list_namespaced_event(watched).items
        return any(e.reason == "Provisioning" and e.source.component == "kubetune-operator" for e in events)

    wait_showing_log(event, "the operator's Event for the phase change", local_cluster, api, installed)

    # Left alone where it may not look: no status, no finalizer.
    elsewhere = find_job(api, namespace, "elsewhere")
    assert elsewhere is not None
    assert "status" not in elsewhere
    assert not elsewhere["metadata"].get("finalizers")

    # Deleting runs the finalizer, which releases the NodePool (cluster-scoped, no owner reference).
    custom.delete_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, "tune")
    wait_showing_log(
        lambda: find_job(api, watched, "tune") is None,
        "the finalizer to release the job",
        local_cluster,
        api,
        installed,
    )
    assert not custom.list_cluster_custom_object(
        "karpenter.sh", "v1", "nodepools", label_selector=names.selector(watched, "tune")
    )["items"]

    pod = operator_pod(api, installed)
    assert pod is not None
    _, metrics = get(f"http://{pod.status.pod_ip}:{installed.metrics_port}/metrics")
    assert "kubetune_jobs_created_total 1.0" in metrics
    log = operator_log(local_cluster, api, installed)
    for refused in ("Forbidden", "forbidden", "Not enough permissions", " 403"):
        assert refused not in log, f"the operator was refused something:\n{log[-4000:]}"


#: (verb, resource, where) the operator needs, and those it must never have. ``where`` is
#: "watched", "elsewhere" (a namespace it does not watch), "default" or "cluster".
ALLOWED = [
    ("watch", "finetunejobs.kubetune.io", "watched"),
    ("patch", "finetunejobs.kubetune.io/status", "watched"),
    ("create", "jobs.batch", "watched"),
    ("patch", "configmaps", "watched"),
    ("create", "events", "watched"),
    ("list", "nodes", "cluster"),
    ("create", "nodepools.karpenter.sh", "cluster"),
    ("patch", "nodepools.karpenter.sh", "cluster"),
    ("list", "nodepools.karpenter.sh", "cluster"),
    ("delete", "nodepools.karpenter.sh", "cluster"),
    ("list", "events", "default"),
    ("list", "workloads.kueue.x-k8s.io", "watched"),
    ("list", "nodeclaims.karpenter.sh", "cluster"),
    ("watch", "nodeclaims.karpenter.sh", "cluster"),
    ("patch", "deployments.apps", "watched"),
    ("delete", "deployments.apps", "watched"),
    ("list", "modelservers.kubetune.io", "watched"),
    ("watch", "modelservers.kubetune.io", "watched"),
    ("patch", "modelservers.kubetune.io/status", "watched"),
]
REFUSED = [
    ("get", "secrets", "watched"),
    # Kueue owns admission: the operator reads Workloads, never changes them.
    ("patch", "workloads.kueue.x-k8s.io", "watched"),
    ("list", "secrets", "cluster"),
    ("create", "pods", "watched"),
    ("delete", "pods", "watched"),
    ("create", "pods/exec", "watched"),
    ("delete", "finetunejobs.kubetune.io", "watched"),
    ("update", "finetunejobs.kubetune.io", "watched"),
    ("delete", "jobs.batch", "watched"),
    ("delete", "nodes", "cluster"),
    ("patch", "nodes", "cluster"),
    ("create", "serviceaccounts/token", "watched"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "cluster"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "watched"),
    ("patch", "finetunejobs.kubetune.io/status", "elsewhere"),
    ("create", "jobs.batch", "elsewhere"),
    ("list", "finetunejobs.kubetune.io", "elsewhere"),
    ("list", "finetunejobs.kubetune.io", "cluster"),
    ("create", "deployments.apps", "elsewhere"),
    ("delete", "services", "elsewhere"),
    ("patch", "clusterkopfpeerings.kopf.dev", "cluster"),
    # Karpenter makes the claims: the operator only reads them.
    ("create", "nodeclaims.karpenter.sh", "cluster"),
    ("delete", "nodeclaims.karpenter.sh", "cluster"),
    ("update", "nodepools.karpenter.sh", "cluster"),
    ("get", "nodepools.karpenter.sh", "cluster"),
    # ModelServers are the platform team's: the operator serves them, never makes or removes one.
    ("create", "modelservers.kubetune.io", "watched"),
    ("delete", "modelservers.kubetune.io", "watched"),
    ("patch", "modelservers.kubetune.io/status", "elsewhere"),
]


def can_i(
    local_cluster: cluster.Cluster, installed: Installed, verb: str, resource: str, where: str, other: str
) -> bool:
    scope = {
        "watched": [f"--namespace={installed.watched}"],
        "elsewhere": [f"--namespace={other}"],
        "default": ["--namespace=default"],
    }
    resource, _, subresource = resource.partition("/")
    if subresource:
        head, _, group = resource.partition(".")
        resource = head + ("." + group if group else "")
    args = [
        "auth",
        "can-i",
        verb,
        resource,
        f"--as={installed.user}",
        *([f"--subresource={subresource}"] if subresource else []),
        *scope.get(where, ["--all-namespaces"]),
    ]
    result = local_cluster.kubectl(*args, check=False)
    if "doesn't have a resource type" in result.stderr:
        # A kind this cluster does not serve (Kueue's Workloads: no Kueue here): kubectl cannot map
        # it, so ask the authorizer directly what RBAC grants the operator's account.
        return _review(local_cluster, installed, verb, resource, scope.get(where, [""])[0].removeprefix("--namespace="))
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, f"kubectl {' '.join(args)}: {result.stdout}{result.stderr}"
    return answer == "yes"


def _review(local_cluster: cluster.Cluster, installed: Installed, verb: str, resource: str, namespace: str) -> bool:
    """A SubjectAccessReview of ``verb`` on ``resource`` (plural.group) for the operator's ServiceAccount."""
    plural, _, group = resource.partition(".")
    review = client.AuthorizationV1Api(api_client(local_cluster.kubeconfig)).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": installed.user,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{installed.namespace}",
                    "system:authenticated",
                ],
                "resourceAttributes": {"verb": verb, "group": group, "resource": plural, "namespace": namespace},
            },
        }
    )
    return bool(review.status.allowed)


def test_the_service_account_can_only_do_what_the_operator_does(
    installed: Installed, local_cluster: cluster.Cluster, namespace: str
) -> None:
    allowed = [(v, r, w) for v, r, w in ALLOWED if can_i(local_cluster, installed, v, r, w, namespace)]
    assert allowed == ALLOWED, "the impersonated account lacks what the operator needs"
    granted = [(v, r, w) for v, r, w in REFUSED if can_i(local_cluster, installed, v, r, w, namespace)]
    assert granted == [], f"the operator's account may do what it must not: {granted}"
