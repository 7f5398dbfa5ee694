"""A real Prometheus scrapes what the chart's monitors select, runs the chart's alert rules, and answers
every query of the shipped dashboard, during a training job on the local runtime.

The chart is rendered by the real helm binary with its ServiceMonitor, PodMonitor, PrometheusRule
and dashboard; :func:`scrape_configs` translates the two monitors the way the Prometheus Operator
does (a keep rule per selector label and for the port name, the monitors' own relabelings, then
the namespace/pod/service target labels), so the selectors are what is tested. Debian's Prometheus
(``make prometheus``) is built without Kubernetes service discovery, so :class:`Discovery` plays
that part: every second it writes every pod's ports and every Endpoints address of the local
apiserver, with the ``__meta_kubernetes_*`` labels Kubernetes discovery gives them, to the files
Prometheus reads (``file_sd``); Prometheus' own relabeling then picks the targets. The operator runs
as a process here, not as a pod: the chart's metrics Service is created
as rendered, without a selector, with an Endpoints object pointing at the operator process on this
machine's address (Kubernetes refuses loopback endpoints).

Also here: ``promtool check metrics`` on every /metrics endpoint (operator, rank 0 of a training
job, the built-in server), an alert that fires for real (a job that cannot get nodes, with a
threshold of seconds), the job's Events, and ``kubectl wait`` as the README shows it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune_local import cluster
from kubetune_local.binaries import ensure_binaries
from kubetune_local.controlplane import free_port
from kubetune_operator import names
from tests.chart.conftest import CHART
from tests.factories import create_job, finetunejob, read_job, wait_until
from tests.integration.conftest import OperatorProcess
from tests.integration.test_operator_serving import condition
from tests.integration.test_operator_training import toy_claim, toy_job

pytestmark = [pytest.mark.integration, pytest.mark.trainer]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
#: Grafana's variables in the dashboard's queries, as the test fills them in.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "1h"}
#: The GPU-hours panel's query: answered only once it counts some (the job asks for one GPU per node).
GPU_HOURS = "GPU-hours by namespace (over the dashboard's range) #0"


def host_address() -> str:
    """This machine's first non-loopback IPv4 address (an Endpoints object may not point at loopback)."""
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    addresses = [a for a in found if "." in a and not a.startswith("127.")]
    assert addresses, "this machine has no non-loopback IPv4 address for the operator's Endpoints"
    return addresses[0]


def render(namespace: str) -> list[dict[str, Any]]:
    helm = ensure_binaries(with_helm=True).helm
    assert helm is not None
    values = [
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=1s",
        "metrics.serviceMonitor.scrapeTimeout=1s",
        "trainerPodMonitor.enabled=true",
        "trainerPodMonitor.interval=1s",
        "trainerPodMonitor.scrapeTimeout=1s",
        "prometheusRule.enabled=true",
        "prometheusRule.provisioningFor=3s",
        "dashboard.enabled=true",
    ]
    args = [str(helm), "template", "kubetune", str(CHART), "--namespace", namespace]
    for value in values:
        args += ["--set", value]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def _keep(label: str, value: str) -> dict[str, Any]:
    return {"source_labels": [label], "regex": re.escape(value), "action": "keep"}


def _meta(label: str) -> str:
    """A Kubernetes label as Prometheus' service discovery names it (``__meta_…_label_<sanitized>``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabelings(endpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """A monitor's relabelings in Prometheus' own spelling (camelCase to snake_case)."""
    spelled = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{spelled.get(k, k): v for k, v in r.items()} for r in endpoint.get("relabelings", [])]


def scrape_configs(monitors: list[dict[str, Any]], discovered: Path) -> list[dict[str, Any]]:
    """The Prometheus Operator's translation of a ServiceMonitor and a PodMonitor, in its essentials."""
    configs = []
    for monitor in monitors:
        spec, meta = monitor["spec"], monitor["metadata"]
        pod = monitor["kind"] == "PodMonitor"
        (endpoint,) = spec["podMetricsEndpoints" if pod else "endpoints"]
        kind = "pod" if pod else "service"
        relabel = [
            _keep(f"__meta_kubernetes_{kind}_label_{_meta(k)}", v) for k, v in spec["selector"]["matchLabels"].items()
        ]
        names = spec.get("namespaceSelector", {}).get("matchNames")
        if names:
            relabel.append(
                {
                    "source_labels": ["__meta_kubernetes_namespace"],
                    "regex": "|".join(map(re.escape, names)),
                    "action": "keep",
                }
            )
        if pod:
            # The operator's own rule: finished pods are no targets.
            relabel.append(
                {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"}
            )
        port_label = "__meta_kubernetes_pod_container_port_name" if pod else "__meta_kubernetes_endpoint_port_name"
        relabel.append(_keep(port_label, endpoint["port"]))
        relabel += [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        if pod:
            relabel.append({"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"})
        else:
            relabel += [
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
            ]
        relabel += _relabelings(endpoint)
        configs.append(
            {
                "job_name": f"{monitor['kind']}/{meta['namespace']}/{meta['name']}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": endpoint["interval"],
                "scrape_timeout": endpoint["scrapeTimeout"],
                "file_sd_configs": [
                    {"files": [str(discovered / ("pods.json" if pod else "endpoints.json"))], "refresh_interval": "1s"}
                ],
                "relabel_configs": relabel,
            }
        )
    return configs


def _labels(prefix: str, labels: dict[str, str] | None) -> dict[str, str]:
    found = {}
    for key, value in (labels or {}).items():
        found[f"{prefix}_label_{_meta(key)}"] = value
        found[f"{prefix}_labelpresent_{_meta(key)}"] = "true"
    return found


class Discovery:
    """Kubernetes service discovery for Prometheus, from the apiserver into file_sd files, every second."""

    def __init__(self, api: client.ApiClient, folder: Path) -> None:
        self.core = client.CoreV1Api(api)
        self.folder = folder
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self.write()

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            with contextlib.suppress(Exception):  # a pass that missed the apiserver is redone a second later
                self.write()

    def _put(self, name: str, groups: list[dict[str, Any]]) -> None:
        staged = self.folder / f".{name}"
        staged.write_text(json.dumps(groups), encoding="utf-8")
        staged.replace(self.folder / name)

    def write(self) -> None:
        pods = []
        for pod in self.core.list_pod_for_all_namespaces().items:
            if not pod.status.pod_ip:
                continue
            meta = {
                "__meta_kubernetes_namespace": pod.metadata.namespace,
                "__meta_kubernetes_pod_name": pod.metadata.name,
                "__meta_kubernetes_pod_ip": pod.status.pod_ip,
                "__meta_kubernetes_pod_phase": pod.status.phase or "",
                **_labels("__meta_kubernetes_pod", pod.metadata.labels),
            }
            for container in pod.spec.containers:
                for port in container.ports or []:
                    labels = {
                        **meta,
                        "__meta_kubernetes_pod_container_name": container.name,
                        "__meta_kubernetes_pod_container_port_name": port.name or "",
                        "__meta_kubernetes_pod_container_port_number": str(port.container_port),
                    }
                    pods.append({"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": labels})
        services = {
            (s.metadata.namespace, s.metadata.name): s for s in self.core.list_service_for_all_namespaces().items
        }
        endpoints = []
        for found in self.core.list_endpoints_for_all_namespaces().items:
            service = services.get((found.metadata.namespace, found.metadata.name))
            if service is None:
                continue
            meta = {
                "__meta_kubernetes_namespace": found.metadata.namespace,
                "__meta_kubernetes_endpoints_name": found.metadata.name,
                "__meta_kubernetes_service_name": service.metadata.name,
                **_labels("__meta_kubernetes_service", service.metadata.labels),
            }
            for subset in found.subsets or []:
                for address in subset.addresses or []:
                    for port in subset.ports or []:
                        labels = {**meta, "__meta_kubernetes_endpoint_port_name": port.name or ""}
                        endpoints.append({"targets": [f"{address.ip}:{port.port}"], "labels": labels})
        self._put("pods.json", pods)
        self._put("endpoints.json", endpoints)


class Prometheus:
    """A real Prometheus on loopback, asked through its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            answer = json.loads(reply.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr``, without NaN samples (a quantile of nothing is NaN)."""
        result = self.get("/api/v1/query", query=expr)["result"]
        return [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]


@pytest.fixture(scope="module")
def monitoring(
    local_cluster: cluster.Cluster,
    operator: OperatorProcess,
    api: client.ApiClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Prometheus, list[dict[str, Any]]]]:
    """Prometheus scraping what the rendered chart selects, with its rules; yields it and the manifests."""
    assert Path(PROMETHEUS).is_file(), "prometheus is missing: run `make prometheus` (Debian's prometheus package)"
    home = tmp_path_factory.mktemp("prometheus")
    release = "kubetune-monitoring"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": release}})
    manifests = render(release)
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    service["spec"].pop("selector")  # the operator is a process here: its endpoints are written by hand
    core.create_namespaced_service(release, service)
    (port,) = service["spec"]["ports"]
    core.create_namespaced_endpoints(
        release,
        {
            "metadata": {"name": service["metadata"]["name"], "labels": service["metadata"]["labels"]},
            "subsets": [
                {
                    "addresses": [{"ip": host_address()}],
                    "ports": [{"name": port["name"], "port": operator.metrics_port}],
                }
            ],
        },
    )
    monitors = [m for m in manifests if m["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert {m["kind"] for m in monitors} == {"ServiceMonitor", "PodMonitor"}
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    (home / "rules.yml").write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    discovery = Discovery(api, home)
    discovery.thread.start()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(home / "rules.yml")],
        "scrape_configs": scrape_configs(monitors, home),
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(home / "prometheus.yml")], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    web = free_port()
    with open(home / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{web}")
    try:

        def operator_up() -> bool:
            try:
                return bool(prometheus.query('up{service!="", endpoint="metrics"} == 1'))
            except OSError:
                assert process.poll() is None, (home / "prometheus.log").read_text()[-3000:]
                return False

        wait_until(operator_up, timeout=60, what="Prometheus to scrape the operator through the ServiceMonitor")
        yield prometheus, manifests
    finally:
        discovery.stopped.set()
        process.terminate()
        process.wait(timeout=30)
        core.delete_namespace(release)


def dashboard_queries(manifests: list[dict[str, Any]], namespace: str) -> dict[str, str]:
    """Every query of the shipped dashboard (``title #n`` → PromQL), its Grafana variables filled in."""
    (config_map,) = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(config_map["data"]["kubetune.json"])
    variables = {**GRAFANA_VARIABLES, "$namespace": namespace}
    queries = {}
    for panel in dashboard["panels"]:
        for index, target in enumerate(panel.get("targets", [])):
            expr = target["expr"]
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
            queries[f"{panel['title']} #{index}"] = expr
    return queries


def check_metrics(url: str) -> str:
    """``promtool check metrics`` on one /metrics endpoint: its complaints (empty when clean)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read()
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, check=False)
    return str((checked.stdout + checked.stderr).decode())


def test_prometheus_answers_every_dashboard_query_and_the_alerts_fire(
    monitoring: tuple[Prometheus, list[dict[str, Any]]],
    operator: OperatorProcess,
    local_cluster: cluster.Cluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    prometheus, manifests = monitoring
    toy_claim(api, namespace, fmt="messages")

    # A job that can never get nodes: KubetuneJobProvisioningTooLong (threshold 3 s) fires for it.
    stuck = finetunejob(
        "stuck",
        model={"source": "pvc://models/model"},
        resources={"provisioner": "byo", "nodeSelector": {"kubetune.io/test": "no-such-node"}, "gpusPerNode": 0},
    )
    create_job(api, namespace, stuck)

    # A job with one GPU per node (the local g5.xlarge), evaluation, and the built-in server.
    # Long enough for a few scrapes of rank 0 even on a fast machine (160 steps took 6 s in CI).
    job = toy_job("watched", steps=800, nodes=1, every=1000)
    job["spec"]["resources"].update({"instanceType": "g5.xlarge", "gpusPerNode": 1})
    job["spec"]["distributed"]["processesPerNode"] = 1
    job["spec"]["dataset"].update({"maxSeqLength": 48, "validation": {"fraction": 0.2}})
    job["spec"]["training"].update({"evalEverySteps": 100, "loggingEverySteps": 2})
    port = free_port()
    job["spec"]["serving"] = {"enabled": True, "runtime": "transformers", "port": port}
    create_job(api, namespace, job)

    queries = dashboard_queries(manifests, namespace)
    answered: dict[str, list[dict[str, Any]]] = {}
    trainer_metrics = ""

    def every_query_answered() -> bool:
        nonlocal trainer_metrics
        status = read_job(api, namespace, "watched").get("status", {})
        assert status.get("phase") != "Failed", json.dumps(status, indent=1)
        for title, expr in queries.items():
            if title in answered or not (result := prometheus.query(expr)):
                continue
            if title == GPU_HOURS and not any(float(r["value"][1]) > 0 for r in result):
                continue  # the series is there from the first pass, at 0 until a GPU pod runs
            answered[title] = result
        if not trainer_metrics and status.get("phase") == "Training":
            pods = (
                client.CoreV1Api(api)
                .list_namespaced_pod(
                    namespace, label_selector=f"{names.selector(namespace, 'watched')},{names.ROLE_LABEL}=trainer"
                )
                .items
            )
            running = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
            if running:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    trainer_metrics = check_metrics(f"http://{running[0].status.pod_ip}:9400/metrics") or "clean"
        return len(answered) == len(queries)

    try:
        wait_until(every_query_answered, timeout=900, interval=1.0, what="every dashboard query to return data")
    except pytest.fail.Exception:
        missing = sorted(set(queries) - set(answered))
        pytest.fail(f"dashboard queries without data: {[(t, queries[t]) for t in missing]}")
    assert trainer_metrics == "clean", f"promtool check metrics on rank 0: {trainer_metrics}"
    loss = answered["Training loss #0"][0]
    assert loss["metric"]["finetunejob"] == "watched", "the PodMonitor's relabeling names the job"
    assert loss["metric"]["namespace"] == namespace
    assert float(answered[GPU_HOURS][0]["value"][1]) > 0

    # The alert fired for the stuck job, by its name, for real.
    def stuck_alert() -> list[dict[str, Any]]:
        return [
            a
            for a in prometheus.firing()
            if a["labels"]["alertname"] == "KubetuneJobProvisioningTooLong" and a["labels"]["finetunejob"] == "stuck"
        ]

    (alert,) = wait_until(stuck_alert, timeout=60, what="KubetuneJobProvisioningTooLong to fire for the stuck job")
    assert alert["labels"]["namespace"] == namespace
    assert alert["labels"]["severity"] == "warning"
    assert not [a for a in prometheus.firing() if a["labels"].get("finetunejob") == "watched"], "the healthy job alerts"

    # kubectl wait, as the README shows it.
    waited = local_cluster.kubectl(
        "-n", namespace, "wait", "--for=condition=Complete", "finetunejob/watched", "--timeout=600s", check=False
    )
    assert waited.returncode == 0, waited.stderr
    assert "condition met" in waited.stdout
    waited = local_cluster.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=jsonpath={.status.phase}=Serving",
        "finetunejob/watched",
        "--timeout=300s",
        check=False,
    )
    assert waited.returncode == 0, waited.stderr

    # Every phase change is an Event on the job, named after the phase.
    status = wait_until(
        lambda: (
            (s := read_job(api, namespace, "watched").get("status", {}))
            and condition(s, "ServingReady").get("status") == "True"
            and s
        ),
        timeout=300,
        what="the server to be ready",
    )
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=watched").items
    reasons = {e.reason for e in events}
    assert {"Provisioning", "Training", "Publishing", "Serving"} <= reasons, reasons
    stuck_events = (
        client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=stuck").items
    )
    assert "Provisioning" in {e.reason for e in stuck_events}

    # promtool is content with the operator's and the built-in server's /metrics too.
    assert check_metrics(f"http://127.0.0.1:{operator.metrics_port}/metrics") == ""
    (server,) = (
        client.CoreV1Api(api)
        .list_namespaced_pod(
            namespace, label_selector=f"{names.selector(namespace, 'watched')},{names.ROLE_LABEL}=server"
        )
        .items
    )
    assert check_metrics(f"http://{server.status.pod_ip}:{port}/metrics") == ""
    assert status["phase"] == "Serving"
