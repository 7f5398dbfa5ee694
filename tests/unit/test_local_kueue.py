"""The Kueue groundwork's pure pieces: its Configuration, the webhook configurations rewritten for
loopback, the CRDs' conversion webhook, the serving certificate and the one-line patch of its main."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kubetune_local import kueue
from kubetune_local.binaries import BuildError

pytestmark = pytest.mark.unit

PORTS = kueue.Ports(webhook=41001, metrics=41002, health=41003)
CA_PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _hook(name: str, path: str, group: str, resource: str) -> dict[str, Any]:
    """One webhook as Kueue's config/components/webhook/manifests.yaml writes it."""
    return {
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
        "failurePolicy": "Fail",
        "name": name,
        "rules": [
            {
                "apiGroups": [group],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": [resource],
            }
        ],
        "sideEffects": "None",
    }


MUTATING: dict[str, Any] = {
    "apiVersion": "admissionregistration.k8s.io/v1",
    "kind": "MutatingWebhookConfiguration",
    "metadata": {"name": "mutating-webhook-configuration"},
    "webhooks": [
        _hook("mclusterqueue.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-clusterqueue", "kueue.x-k8s.io", "clusterqueues"),
        _hook("mdeployment.kb.io", "/mutate-apps-v1-deployment", "apps", "deployments"),
        _hook("mjob.kb.io", "/mutate-batch-v1-job", "batch", "jobs"),
        _hook("mpod.kb.io", "/mutate--v1-pod", "", "pods"),
        _hook("mrayjob.kb.io", "/mutate-ray-io-v1-rayjob", "ray.io", "rayjobs"),
    ],
}
VALIDATING: dict[str, Any] = {
    **MUTATING,
    "kind": "ValidatingWebhookConfiguration",
    "metadata": {"name": "validating-webhook-configuration"},
    "webhooks": [
        _hook("vjob.kb.io", "/validate-batch-v1-job", "batch", "jobs"),
        _hook("vworkload.kb.io", "/validate-kueue-x-k8s-io-v1beta2-workload", "kueue.x-k8s.io", "workloads"),
        _hook("vstatefulset.kb.io", "/validate-apps-v1-statefulset", "apps", "statefulsets"),
    ],
}


class TestConfiguration:
    def config(self) -> dict[str, Any]:
        return kueue.configuration(ports=PORTS, cert_dir=Path("/home/x/kueue/certs"))

    def test_it_is_the_v1beta2_configuration_with_only_the_job_integration(self) -> None:
        config = self.config()
        assert (config["apiVersion"], config["kind"]) == ("config.kueue.x-k8s.io/v1beta2", "Configuration")
        assert config["integrations"] == {"frameworks": ["batch/job"]}
        assert config["manageJobsWithoutQueueName"] is False
        assert config["namespace"] == "kueue-system"

    def test_leader_election_wait_for_pods_ready_and_internal_certificates_are_off(self) -> None:
        config = self.config()
        assert config["leaderElection"] == {"leaderElect": False}
        assert "waitForPodsReady" not in config, "in v1beta2 the section's presence turns it on"
        assert config["internalCertManagement"] == {"enable": False}

    def test_every_listener_is_on_loopback_on_its_own_port(self) -> None:
        config = self.config()
        assert config["webhook"] == {"host": "127.0.0.1", "port": 41001, "certDir": "/home/x/kueue/certs"}
        assert config["metrics"] == {"bindAddress": "127.0.0.1:41002"}
        assert config["health"] == {"healthProbeBindAddress": "127.0.0.1:41003"}
        assert config["featureGates"] == {"VisibilityOnDemand": False}, "it would bind :8082 on every interface"

    def test_it_survives_yaml_as_written_to_the_file(self) -> None:
        assert yaml.safe_load(yaml.safe_dump(self.config())) == self.config()

    def test_the_command_names_the_file(self) -> None:
        line = kueue.command(Path("/bin/kueue"), Path("/h/kueue/config.yaml"))
        assert line[:2] == ["/bin/kueue", "--config=/h/kueue/config.yaml"]


class TestWebhookConfigurations:
    def rewritten(self) -> dict[str, dict[str, Any]]:
        found = kueue.webhook_configurations([MUTATING, VALIDATING], port=PORTS.webhook, ca_bundle=CA_PEM)
        return {c["kind"]: c for c in found}

    def test_only_kueues_own_kinds_and_the_job_integration_are_kept(self) -> None:
        found = self.rewritten()
        names = {kind: [h["name"] for h in c["webhooks"]] for kind, c in found.items()}
        assert names == {
            "MutatingWebhookConfiguration": ["mclusterqueue.kb.io", "mjob.kb.io"],
            "ValidatingWebhookConfiguration": ["vjob.kb.io", "vworkload.kb.io"],
        }

    def test_each_webhook_calls_loopback_with_the_ca_bundle_and_no_service(self) -> None:
        job = self.rewritten()["MutatingWebhookConfiguration"]["webhooks"][1]
        assert job["clientConfig"] == {
            "url": "https://127.0.0.1:41001/mutate-batch-v1-job",
            "caBundle": base64.b64encode(CA_PEM).decode(),
        }
        assert base64.b64decode(job["clientConfig"]["caBundle"]) == CA_PEM
        assert (job["failurePolicy"], job["sideEffects"]) == ("Fail", "None"), "the rest is Kueue's"
        assert job["rules"] == MUTATING["webhooks"][2]["rules"]

    def test_configurations_are_named_as_kueue_names_them_and_the_input_is_untouched(self) -> None:
        found = self.rewritten()
        assert found["MutatingWebhookConfiguration"]["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
        assert "service" in MUTATING["webhooks"][2]["clientConfig"]

    def test_other_kinds_in_the_manifest_are_left_out(self) -> None:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webhook-service"}}
        assert kueue.webhook_configurations([service], port=1, ca_bundle=CA_PEM) == []

    @pytest.mark.skipif(
        not (kueue.kueue_root() / "manifests" / kueue.WEBHOOK_MANIFEST).exists(),
        reason="Kueue's manifests are not cached (make kueue)",
    )
    def test_the_real_manifest_keeps_the_job_and_kueue_webhooks_and_no_pod_one(self) -> None:
        path = kueue.kueue_root() / "manifests" / kueue.WEBHOOK_MANIFEST
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        found = kueue.webhook_configurations(documents, port=PORTS.webhook, ca_bundle=CA_PEM)
        hooks = {h["name"]: h for c in found for h in c["webhooks"]}
        assert {"mjob.kb.io", "vjob.kb.io", "mworkload.kb.io", "vclusterqueue.kb.io"} <= set(hooks)
        assert not {"mpod.kb.io", "vpod.kb.io", "mdeployment.kb.io", "mrayjob.kb.io"} & set(hooks)
        assert all(h["clientConfig"]["url"].startswith("https://127.0.0.1:41001/") for h in hooks.values())


class TestConversion:
    def test_only_patches_with_a_webhook_strategy_name_a_crd(self) -> None:
        patches = [
            {"metadata": {"name": "workloads.kueue.x-k8s.io"}, "spec": {"conversion": {"strategy": "Webhook"}}},
            {"metadata": {"name": "resourceflavors.kueue.x-k8s.io"}, "metadata_only": True},
        ]
        assert kueue.conversion_crds(patches) == {"workloads.kueue.x-k8s.io"}

    def test_a_converted_crd_calls_convert_on_loopback(self) -> None:
        crd = {"metadata": {"name": "workloads.kueue.x-k8s.io"}, "spec": {"group": "kueue.x-k8s.io"}}
        converted = kueue.with_conversion_webhook(crd, port=41001, ca_bundle=CA_PEM)
        assert converted["spec"]["conversion"] == {
            "strategy": "Webhook",
            "webhook": {
                "clientConfig": {
                    "url": "https://127.0.0.1:41001/convert",
                    "caBundle": base64.b64encode(CA_PEM).decode(),
                },
                "conversionReviewVersions": ["v1"],
            },
        }
        assert "conversion" not in crd["spec"]


class TestServingCertificate:
    def test_it_serves_127_0_0_1_and_localhost_and_chains_to_the_returned_ca(self, tmp_path: Path) -> None:
        bundle = kueue.serving_certificate(tmp_path / "pki", tmp_path / "certs")
        cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "tls.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert names.get_values_for_type(x509.DNSName) == ["localhost"]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
        ca = x509.load_pem_x509_certificate(bundle)
        assert bundle == (tmp_path / "pki" / "ca.crt").read_bytes(), "the cluster's CA"
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert (tmp_path / "certs" / "tls.key").stat().st_mode & 0o777 == 0o600

    def test_a_second_call_reuses_the_certificate(self, tmp_path: Path) -> None:
        kueue.serving_certificate(tmp_path / "pki", tmp_path / "certs")
        first = (tmp_path / "certs" / "tls.crt").read_bytes()
        kueue.serving_certificate(tmp_path / "pki", tmp_path / "certs")
        assert (tmp_path / "certs" / "tls.crt").read_bytes() == first


class TestPatchedMain:
    LINE = '\t\tmetricsCertPath := "/etc/kueue/metrics/certs"\n'

    def test_the_metrics_certificate_folder_comes_from_the_environment(self) -> None:
        patched = kueue.patched_main(f"package main\n{self.LINE}")
        assert '"/etc/kueue/metrics/certs"' in patched, "Kueue's own path stays the fallback"
        assert f'os.Getenv("{kueue.METRICS_CERT_ENV}")' in patched
        assert 'metricsCertPath := "/etc/kueue/metrics/certs"' not in patched

    @pytest.mark.parametrize("source", ["package main\n", f"package main\n{LINE}{LINE}"], ids=["absent", "twice"])
    def test_a_release_that_moved_the_line_fails_the_build_naming_the_fix(self, source: str) -> None:
        with pytest.raises(BuildError, match=r"update kubetune_local\.kueue\.patched_main"):
            kueue.patched_main(source)


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("true", True), ("Yes", True), ("0", False), ("", False)])
def test_the_environment_variable_turns_kueue_on(monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool) -> None:
    monkeypatch.setenv(kueue.KUEUE_ENV, value)
    assert kueue.enabled_by_environment() is enabled
