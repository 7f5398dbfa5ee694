"""The Helm chart renders, refuses bad values, grants only what the operator uses, and stays in step.

Rendered with the real helm binary (no cluster): lint, every ci/ scenario, the schema and the
``fail`` guards, the RBAC rules, the operator pod's hardening, and the flags the Deployment passes,
parsed by the real ``kubetune`` argument parser. Drift guards tie the chart to the code: the CRD
copy, kopf's peering resources, the resources kopf watches, the metric names of the dashboard.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf._cogs.structs import references as kopf_references
from prometheus_client.metrics import MetricWrapperBase

from kubetune_api.resource import load_job
from kubetune_cli.main import build_parser
from kubetune_operator import metrics as operator_metrics
from kubetune_operator import names
from kubetune_operator.children.target import Target
from kubetune_operator.children.training import build_training_job
from kubetune_operator.crd import render_crd
from kubetune_operator.handlers import build_registry
from kubetune_operator.progress import GAUGES as TRAINER_GAUGES
from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE, OperatorSettings
from tests.chart.conftest import CHART, SCENARIOS, Helm, Manifest
from tests.conftest import REPO, load_yaml

pytestmark = pytest.mark.unit

RBAC_KINDS = ("ClusterRole", "Role")
#: Verbs that would let the operator widen its own rights or act as someone else.
ESCALATING_VERBS = {"escalate", "bind", "impersonate", "*"}
#: Every verb the chart may grant at all (the operator reads by list/watch, never by get).
KNOWN_VERBS = {"list", "watch", "create", "patch", "update", "delete"}


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def operator_container(manifests: list[Manifest]) -> dict[str, Any]:
    container: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container


def operator_args(manifests: list[Manifest]) -> argparse.Namespace:
    """The Deployment's command line, parsed by the real `kubetune` parser (so every flag must exist)."""
    container = operator_container(manifests)
    assert container["command"] == ["kubetune"]
    return build_parser().parse_args(container["args"])


def grants(manifests: list[Manifest]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples over every ClusterRole and Role."""
    return {
        (group, resource, verb)
        for role in manifests
        if role["kind"] in RBAC_KINDS
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.fixture(params=sorted(SCENARIOS), scope="module")
def scenario(request: pytest.FixtureRequest, helm: Helm) -> tuple[str, list[Manifest]]:
    name: str = request.param
    return name, helm.template("--values", str(SCENARIOS[name]))


# ------------------------------------------------------------------------------- rendering


def test_every_ci_scenario_exists() -> None:
    assert set(SCENARIOS) >= {"default", "namespaced", "ha", "monitoring"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lint_is_clean(helm: Helm, name: str) -> None:
    result = helm.run("lint", str(CHART), "--strict", "--values", str(SCENARIOS[name]))
    assert "0 chart(s) failed" in result.stdout, result.stdout


#: What each scenario renders beyond the operator's Deployment, ServiceAccount and RBAC.
EXPECTED_KINDS = {
    "default": {"Service"},
    "namespaced": {"Service"},
    "ha": {"Service", "ClusterKopfPeering"},
    "monitoring": {"Service", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"},
}
#: The Role (and its binding) every install has: list events in namespace default, where Karpenter's
#: events about cluster-scoped NodePools and NodeClaims are kept.
EVENTS_ROLE = "kubetune-karpenter-events"


def watched_roles(manifests: list[Manifest], kind: str = "Role") -> list[Manifest]:
    """The Roles (or RoleBindings) of the watched namespaces: all but the Karpenter events Role."""
    return [m for m in of_kind(manifests, kind) if m["metadata"]["name"] != EVENTS_ROLE]


def test_scenario_renders_what_it_promises(scenario: tuple[str, list[Manifest]]) -> None:
    name, manifests = scenario
    kinds = {m["kind"] for m in manifests}
    base = {
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    }
    assert kinds == base | EXPECTED_KINDS[name]
    crds = {m["metadata"]["name"] for m in of_kind(manifests, "CustomResourceDefinition")}
    assert crds == {
        "finetunejobs.kubetune.io",
        "modelservers.kubetune.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }


def test_defaults_watch_the_cluster_with_one_standalone_replica(helm: Helm) -> None:
    manifests = helm.template()
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two standalone operators at once"
    args = operator_args(manifests)
    assert args.command == "operator"
    assert args.namespace is None, "no --namespace: every namespace"
    assert args.peering is None, "one replica runs standalone"
    assert args.metrics_port == 8080
    assert args.trainer_image == DEFAULT_TRAINER_IMAGE, "the chart's default trainer is the operator's default"
    assert args.allow_private_network is None, "URL sources reach only public addresses by default"
    assert not watched_roles(manifests), "cluster scope: everything in the ClusterRole"


def test_the_only_role_outside_watched_namespaces_lists_events_in_default(helm: Helm) -> None:
    for manifests in (helm.template(), helm.template("--values", str(SCENARIOS["namespaced"]))):
        (role,) = [r for r in of_kind(manifests, "Role") if r["metadata"]["name"] == EVENTS_ROLE]
        (binding,) = [b for b in of_kind(manifests, "RoleBinding") if b["metadata"]["name"] == EVENTS_ROLE]
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "default"
        assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["list"]}]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]


def test_consolidate_after_is_passed_and_checked(helm: Helm) -> None:
    assert operator_args(helm.template()).consolidate_after == "5m"
    assert operator_args(helm.template("--set", "karpenter.consolidateAfter=Never")).consolidate_after == "Never"
    refused = helm.run("template", "kt", str(CHART), "--set", "karpenter.consolidateAfter=5 minutes", check=False)
    assert refused.returncode != 0
    assert "consolidateAfter" in refused.stderr


def test_private_networks_for_sources_are_passed_to_the_operator(helm: Helm) -> None:
    manifests = helm.template("--set", "sources.allowPrivateNetworks={10.20.0.0/16,fd00::/8}")
    assert operator_args(manifests).allow_private_network == ["10.20.0.0/16", "fd00::/8"]


def test_namespaced_install_passes_each_namespace_and_binds_a_role_in_each(helm: Helm) -> None:
    manifests = helm.template("--values", str(SCENARIOS["namespaced"]))
    args = operator_args(manifests)
    assert args.namespace == ["team-a", "team-b"]
    roles = {r["metadata"]["namespace"] for r in watched_roles(manifests)}
    bindings = {b["metadata"]["namespace"]: b for b in watched_roles(manifests, "RoleBinding")}
    assert roles == set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]
    cluster_role = one(manifests, "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {"nodes", "nodepools", "nodeclaims", "customresourcedefinitions", "namespaces"}


def test_namespaced_install_defaults_to_the_release_namespace(helm: Helm) -> None:
    manifests = helm.template("--set", "watch.scope=namespaces", namespace="ml")
    assert operator_args(manifests).namespace == ["ml"]
    assert {r["metadata"]["namespace"] for r in watched_roles(manifests)} == {"ml"}


def test_ha_peers_through_kopf(helm: Helm) -> None:
    manifests = helm.template("--values", str(SCENARIOS["ha"]))
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert operator_args(manifests).peering == "kubetune"
    assert one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "kubetune"
    env = {e["name"]: e for e in operator_container(manifests)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "kopf's peer identity"
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in grants(manifests)
    patch_rule = next(
        r
        for r in one(manifests, "ClusterRole")["rules"]
        if "clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"]
    )
    assert patch_rule["resourceNames"] == ["kubetune"], "a replica patches only its own peering object"


def test_ha_in_namespaces_peers_per_namespace(helm: Helm) -> None:
    manifests = helm.template("--values", str(SCENARIOS["namespaced"]), "--set", "replicaCount=2")
    peerings = of_kind(manifests, "KopfPeering")
    assert {p["metadata"]["namespace"] for p in peerings} == {"team-a", "team-b"}
    assert not of_kind(manifests, "ClusterKopfPeering")
    for role in watched_roles(manifests):
        assert any("kopfpeerings" in rule["resources"] for rule in role["rules"])


def test_metrics_off_removes_the_endpoint_and_the_service(helm: Helm) -> None:
    manifests = helm.template("--set", "metrics.enabled=false")
    assert operator_args(manifests).metrics_port == 0, "the operator starts no metrics server on port 0"
    assert not of_kind(manifests, "Service")
    assert [p["name"] for p in operator_container(manifests)["ports"]] == ["healthz"]


def test_monitoring_objects_select_what_they_scrape(helm: Helm) -> None:
    manifests = helm.template("--values", str(SCENARIOS["monitoring"]))
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True, "keeps the jobs' own namespace label"
    pods = one(manifests, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "kubetune"
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["metadata"]["labels"]["release"] == pods["metadata"]["labels"]["release"] == "monitoring"


def test_the_trainer_pod_monitor_matches_the_pods_the_operator_builds(helm: Helm) -> None:
    job = load_job(load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml"))
    target = Target(
        name=job.name, namespace="ml", uid="uid", spec=job.spec, settings=OperatorSettings(), gpus_per_node=1
    )
    pod = build_training_job(target)["spec"]["template"]
    monitor = one(helm.template("--values", str(SCENARIOS["monitoring"])), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    relabeled = {r["sourceLabels"][0] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    for label in (names.JOB_LABEL, names.ATTEMPT_LABEL, "batch.kubernetes.io/job-completion-index"):
        assert "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9]", "_", label) in relabeled


def test_dashboard_queries_only_metrics_that_exist(helm: Helm) -> None:
    config_map = one(helm.template("--values", str(SCENARIOS["monitoring"])), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["kubetune.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bkubetune_\w+", expr)}
    exposed = set(TRAINER_GAUGES)
    for collector in vars(operator_metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
                exposed |= {family.name + suffix for suffix in suffixes}
    assert used <= exposed, f"the dashboard queries metrics nobody exposes: {sorted(used - exposed)}"
    wanted = {
        "kubetune_jobs",
        "kubetune_train_loss",
        "kubetune_train_tokens_per_second",
        "kubetune_gpu_seconds_total",
        "kubetune_reconcile_duration_seconds_bucket",
    }
    assert wanted <= used, f"the dashboard lacks {sorted(wanted - used)}"


# --------------------------------------------------------------------------- refused values


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("metrics.prot=9000", "prot"),
        ("replicas=2", "replicas"),
        ("watch.namespace={a}", "namespace"),
        ("image.tags=x", "tags"),
        ("securityContext.runAsUser=0", "runAsUser"),
        ("watch.scope=namespace", "scope"),
    ],
)
def test_schema_refuses_typos_naming_them(helm: Helm, assignment: str, named: str) -> None:
    result = helm.run("template", "kt", str(CHART), "--set", assignment, check=False)
    assert result.returncode != 0, f"--set {assignment} was accepted"
    assert "schema" in result.stderr
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (
            ["metrics.enabled=false", "metrics.serviceMonitor.enabled=true"],
            "enable metrics or disable the ServiceMonitor",
        ),
        (["watch.namespaces={ml}"], "set watch.scope=namespaces"),
        (["metrics.port=8081"], "kopf's health endpoint"),
        (["serviceAccount.create=false"], "name the existing ServiceAccount"),
    ],
)
def test_contradictory_values_fail_with_the_fix(helm: Helm, assignments: list[str], message: str) -> None:
    args = [arg for assignment in assignments for arg in ("--set", assignment)]
    result = helm.run("template", "kt", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------------------------- RBAC


def test_rbac_has_no_wildcards_and_no_escalation(scenario: tuple[str, list[Manifest]]) -> None:
    _, manifests = scenario
    roles = [m for m in manifests if m["kind"] in RBAC_KINDS]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            where = f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule, where
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), where
                assert not any("*" in value for value in rule.get(key, [])), where
            assert set(rule["verbs"]) <= KNOWN_VERBS, where
            assert not set(rule["verbs"]) & ESCALATING_VERBS, where
            assert not {"secrets", "serviceaccounts/token", "roles", "rolebindings"} & set(rule["resources"]), where


def test_rbac_is_the_same_in_both_scopes(helm: Helm) -> None:
    """A namespace-scoped install splits the cluster-wide rules; it must not gain or lose any."""
    cluster = grants(helm.template())
    namespaced = grants(helm.template("--set", "watch.scope=namespaces"))
    assert namespaced - cluster == {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert cluster - namespaced == set()


def test_rbac_covers_every_resource_kopf_watches(helm: Helm) -> None:
    """Each resource of a kopf handler is listed and watched; a new handler fails here until granted."""
    registry = build_registry(OperatorSettings())
    handlers = [
        *registry._watching.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
        *registry._changing.get_all_handlers(),
    ]
    # kopf's own resource observer reads the handlers the same way; a selector names its resource
    # by plural or, as given to the decorator, by any_name.
    watched = {
        (h.selector.group or "", h.selector.plural or h.selector.any_name) for h in handlers if h.selector is not None
    }
    assert {("kubetune.io", "finetunejobs"), ("kubetune.io", "modelservers")} <= watched
    granted = grants(helm.template())
    for group, plural in watched:
        assert {(group, plural, "list"), (group, plural, "watch")} <= granted, f"{group}/{plural}"


@pytest.mark.parametrize("scope", ["cluster", "namespaces"])
def test_every_rbac_rule_says_why(helm: Helm, scope: str) -> None:
    rendered = helm.run("template", "kt", str(CHART), "--set", f"watch.scope={scope}", "--set", "replicaCount=2")
    lines = rendered.stdout.splitlines()
    rule_starts = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rule_starts) >= 10
    for index in rule_starts:
        assert lines[index - 1].strip().startswith("#"), f"rule without a comment: {lines[index]}"


# ------------------------------------------------------------------------------ pod security


def test_operator_pod_is_non_root_with_a_read_only_root(scenario: tuple[str, list[Manifest]]) -> None:
    _, manifests = scenario
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host_namespace)
    container = pod["containers"][0]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on the read-only root"
    assert all("hostPath" not in v for v in volumes.values())
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["healthz"] == 8081
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


def test_platform_chosen_user_keeps_the_pod_non_root(helm: Helm) -> None:
    manifests = helm.template("--set", "securityContext.runAsUser=null", "--set", "securityContext.runAsGroup=null")
    context = one(manifests, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert "runAsUser" not in context
    assert context["runAsNonRoot"] is True


# ------------------------------------------------------------------------------ drift guards


@pytest.mark.parametrize(("file", "kind"), [("finetunejobs", "FineTuneJob"), ("modelservers", "ModelServer")])
def test_chart_crd_is_the_generated_one(file: str, kind: str) -> None:
    chart_copy = (CHART / "crds" / f"kubetune.io_{file}.yaml").read_text(encoding="utf-8")
    committed = (REPO / "crds" / f"kubetune.io_{file}.yaml").read_text(encoding="utf-8")
    fix = f"cp crds/kubetune.io_{file}.yaml charts/kubetune/crds/"
    assert chart_copy == committed, f"the chart's CRD differs from the repository's: {fix}"
    assert chart_copy == render_crd(kind), f"run `make crds`, then {fix}"


def test_peering_crds_are_the_ones_kopf_uses() -> None:
    crds = {
        d["spec"]["names"]["kind"]: d
        for d in yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text())
    }
    for kind, selector, scope in (
        ("ClusterKopfPeering", kopf_references.CLUSTER_PEERINGS_K, "Cluster"),
        ("KopfPeering", kopf_references.NAMESPACED_PEERINGS_K, "Namespaced"),
    ):
        crd = crds[kind]
        assert (crd["spec"]["group"], crd["spec"]["names"]["plural"], crd["spec"]["scope"]) == (
            selector.group,
            selector.any_name,
            scope,
        )
        assert [v["name"] for v in crd["spec"]["versions"]] == [selector.version]
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        assert "subresources" not in crd["spec"]["versions"][0], "kopf patches the keep-alives into the main object"


def test_chart_version_follows_the_project() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.30.0-0"


def _schema_objects(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if schema.get("type") == "object" or "properties" in schema:
        yield path or "(root)", schema
    for name, sub in schema.get("properties", {}).items():
        yield from _schema_objects(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _schema_objects(schema[key], f"{path}[]")
    for sub in schema.get("anyOf", []):
        yield from _schema_objects(sub, path)


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    for path, node in _schema_objects(schema):
        assert "additionalProperties" in node, f"{path} accepts any key"
        if "properties" in node:
            assert node["additionalProperties"] is False, f"{path} has properties but accepts others"


def test_every_value_is_in_the_schema_and_commented() -> None:
    """Each key of a fixed-shape object in values.yaml has a schema entry and a comment line above it."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()

    def check(node: dict[str, Any], value: dict[str, Any], indent: int, start: int) -> None:
        # An empty object ({}) is an open slot (affinity); otherwise values.yaml shows every key.
        assert set(value) <= set(node["properties"]), (
            f"not in the schema: {sorted(set(value) - set(node['properties']))}"
        )
        if value:
            assert set(value) == set(node["properties"]), (
                f"values.yaml lacks {sorted(set(node['properties']) - set(value))}"
            )
        for key, sub in value.items():
            line = next(i for i in range(start, len(lines)) if re.match(rf"^{' ' * indent}{re.escape(key)}:", lines[i]))
            above = lines[line - 1].strip()
            assert above.startswith("#"), f"values.yaml: {key!r} (line {line + 1}) has no comment above it"
            child = node["properties"][key]
            if "properties" in child and isinstance(sub, dict):
                check(child, sub, indent + 2, line + 1)

    check(schema, values, 0, 0)
