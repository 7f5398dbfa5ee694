"""The chart's alert rules, checked and run by the real promtool on synthetic series.

The PrometheusRule is rendered by the real helm binary; its groups go to ``promtool check rules``
and to ``promtool test rules`` with series that make each alert fire, and series that must not
(a job that left the phase in time, a step that moved, a ready server).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import Helm

pytestmark = pytest.mark.unit

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ALERTS = {
    "KubetuneJobProvisioningTooLong",
    "KubetuneJobQueuedTooLong",
    "KubetuneJobRestarting",
    "KubetuneJobFailed",
    "KubetuneTrainingStalled",
    "KubetuneServingNotReady",
    "KubetuneReconcileErrors",
}


def rules(helm: Helm, *values: str) -> dict[str, Any]:
    """The PrometheusRule's spec (its rule groups), rendered with ``values``."""
    manifests = helm.template("--set", "prometheusRule.enabled=true", *values)
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    spec: dict[str, Any] = rule["spec"]
    return spec


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert Path(PROMTOOL).is_file(), "promtool is missing: run `make prometheus` (Debian's prometheus package)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def annotations_of(spec: dict[str, Any], alert: str, labels: dict[str, str], value: str = "") -> dict[str, str]:
    """What the alert's annotations say for ``labels`` (Prometheus' template, done by hand for the test)."""
    rule = next(r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert)

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return text.replace("{{ $value }}", value)

    return {k: fill(v) for k, v in rule["annotations"].items()}


def test_the_rules_are_valid_and_each_has_a_runbook_entry(helm: Helm, tmp_path: Path) -> None:
    spec = rules(helm, "--set", "prometheusRule.runbookUrl=https://example.org/kubetune/README.md#alerts")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    checked = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    found = {r["alert"] for g in spec["groups"] for r in g["rules"]}
    assert found == ALERTS
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for group in spec["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"] == "https://example.org/kubetune/README.md#alerts"
            assert f"`{rule['alert']}`" in readme, f"README's Alerts section has no runbook line for {rule['alert']}"


def test_without_a_runbook_url_there_is_no_runbook_annotation(helm: Helm) -> None:
    spec = rules(helm)
    assert all("runbook_url" not in r["annotations"] for g in spec["groups"] for r in g["rules"])


def test_each_alert_fires_on_its_series_and_only_there(helm: Helm, tmp_path: Path) -> None:
    spec = rules(helm)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    phase = 'kubetune_job_phase{{namespace="ml",finetunejob="{job}",phase="{phase}"}}'

    def alert(name: str, severity: str, value: str = "", **labels: str) -> dict[str, Any]:
        return {
            "exp_labels": {"severity": severity, **labels},
            "exp_annotations": annotations_of(spec, name, labels, value),
        }

    job = {"namespace": "ml", "finetunejob": "a"}
    tests = [
        {
            # a waits for nodes 40 min; b found them after 10.
            "interval": "1m",
            "input_series": [
                {"series": phase.format(job="a", phase="Provisioning"), "values": "1x40"},
                {"series": phase.format(job="b", phase="Provisioning"), "values": "1x10 _x30"},
                {"series": phase.format(job="c", phase="Queued"), "values": "1x150"},
            ],
            "alert_rule_test": [
                {"eval_time": "29m", "alertname": "KubetuneJobProvisioningTooLong", "exp_alerts": []},
                {
                    "eval_time": "35m",
                    "alertname": "KubetuneJobProvisioningTooLong",
                    "exp_alerts": [alert("KubetuneJobProvisioningTooLong", "warning", **job)],
                },
                {
                    "eval_time": "2h10m",
                    "alertname": "KubetuneJobQueuedTooLong",
                    "exp_alerts": [alert("KubetuneJobQueuedTooLong", "info", namespace="ml", finetunejob="c")],
                },
            ],
        },
        {
            # a restarts twice within the hour; b once.
            "interval": "5m",
            "input_series": [
                {"series": 'kubetune_job_gang_restarts{namespace="ml",finetunejob="a"}', "values": "0 0 1 1 2 2 2"},
                {"series": 'kubetune_job_gang_restarts{namespace="ml",finetunejob="b"}', "values": "0 0 0 1 1 1 1"},
                {"series": phase.format(job="d", phase="Failed"), "values": "1x6"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneJobRestarting",
                    "exp_alerts": [alert("KubetuneJobRestarting", "warning", "2", **job)],
                },
                {
                    "eval_time": "10m",
                    "alertname": "KubetuneJobFailed",
                    "exp_alerts": [alert("KubetuneJobFailed", "warning", namespace="ml", finetunejob="d")],
                },
            ],
        },
        {
            # a's step stops moving at minute 10; b's keeps moving; both Training.
            "interval": "1m",
            "input_series": [
                {"series": phase.format(job="a", phase="Training"), "values": "1x40"},
                {"series": phase.format(job="b", phase="Training"), "values": "1x40"},
                {"series": 'kubetune_train_step{namespace="ml",finetunejob="a",pod="a-0"}', "values": "0+5x10 50x30"},
                {"series": 'kubetune_train_step{namespace="ml",finetunejob="b",pod="b-0"}', "values": "0+5x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "KubetuneTrainingStalled", "exp_alerts": []},
                {
                    "eval_time": "30m",
                    "alertname": "KubetuneTrainingStalled",
                    "exp_alerts": [alert("KubetuneTrainingStalled", "critical", **job)],
                },
            ],
        },
        {
            # a serves without a ready replica; b is ready; errors in the operator's FineTuneJob passes.
            "interval": "1m",
            "input_series": [
                {"series": phase.format(job="a", phase="Serving"), "values": "1x30"},
                {"series": phase.format(job="b", phase="Serving"), "values": "1x30"},
                {
                    "series": 'kubetune_job_condition{namespace="ml",finetunejob="a",condition="ServingReady"}',
                    "values": "0x30",
                },
                {
                    "series": 'kubetune_job_condition{namespace="ml",finetunejob="b",condition="ServingReady"}',
                    "values": "0x2 1x28",
                },
                {"series": 'kubetune_reconcile_errors_total{kind="FineTuneJob"}', "values": "0+1x30"},
                {"series": 'kubetune_reconcile_errors_total{kind="ModelServer"}', "values": "0x30"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": "KubetuneServingNotReady",
                    "exp_alerts": [alert("KubetuneServingNotReady", "warning", **job)],
                },
                {
                    "eval_time": "25m",
                    "alertname": "KubetuneReconcileErrors",
                    "exp_alerts": [alert("KubetuneReconcileErrors", "warning", kind="FineTuneJob")],
                },
            ],
        },
    ]
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}), encoding="utf-8"
    )
    tested = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
