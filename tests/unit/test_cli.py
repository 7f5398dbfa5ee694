"""The ``kubetune`` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_operator.crd import render_crd
from tests.conftest import BAD_INPUT, EXAMPLES, REPO
from tests.factories import LLAMA_8B_CONFIG

pytestmark = pytest.mark.unit


def kubetune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args], capture_output=True, text=True, check=False
    )


def test_crd_prints_the_generated_crd() -> None:
    result = kubetune("crd")
    assert result.returncode == 0
    assert result.stdout == render_crd()


def test_crd_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    assert kubetune("crd", "--output", str(out)).returncode == 0
    assert out.read_text(encoding="utf-8") == render_crd()


def test_validate_checks_model_servers_too(tmp_path: Path) -> None:
    result = kubetune("validate", str(REPO / "examples" / "modelserver.yaml"))
    assert result.returncode == 0, result.stderr
    assert "ModelServer llama-shared is valid" in result.stdout
    assert "FineTuneJob support-bot is valid" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: ModelServer\nmetadata: {name: s}\n"
        "spec: {model: {source: 'hf://org/base'}, adapterClaim: adapters}\n"
    )
    result = kubetune("validate", str(bad))
    assert result.returncode == 2
    assert "spec.model.source" in result.stderr
    assert "runtime: vllm" in result.stderr


def test_validate_accepts_the_examples() -> None:
    result = kubetune("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("is valid") == len(EXAMPLES)


def test_validate_lists_problems_and_exits_2() -> None:
    bad = next(p for p in BAD_INPUT if p.stem == "full-with-lora")
    result = kubetune("validate", str(bad))
    assert result.returncode == 2
    assert "spec.method.lora: full fine-tuning takes no LoRA block" in result.stderr


def test_validate_reads_multi_document_files(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text(EXAMPLES[0].read_text() + "\n---\n" + BAD_INPUT[0].read_text())
    result = kubetune("validate", str(both))
    assert result.returncode == 2
    assert "(document 1): FineTuneJob" in result.stdout
    assert "(document 2) is invalid" in result.stderr


def test_no_subcommand_is_an_error() -> None:
    result = kubetune()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_operator_refuses_a_consolidate_after_karpenter_would_refuse() -> None:
    result = kubetune("operator", "--consolidate-after", "5 minutes")
    assert result.returncode == 2
    assert "--consolidate-after '5 minutes': expected a duration such as 30s" in result.stderr


def test_plan_takes_the_gpu_memory_of_the_instance_type(tmp_path: Path) -> None:
    """Llama 3.1 8B fully fine-tuned on one A10G (g5.xlarge, 24 GiB) does not fit; on 200 GiB it does."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_8B_CONFIG))
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "big"},
                "spec": {
                    "model": {"source": "hf://meta-llama/Llama-3.1-8B"},
                    "dataset": {"source": "https://example.org/d.jsonl"},
                    "method": {"type": "full"},
                    "resources": {"provisioner": "karpenter", "instanceType": "g5.xlarge"},
                },
            }
        )
    )
    on_a10g = kubetune("plan", str(job), "--model-config", str(config))
    assert on_a10g.returncode == 1, on_a10g.stderr
    assert "does NOT fit in 24.00 GiB per device" in on_a10g.stdout
    assert "try: method.type: qlora" in on_a10g.stdout
    roomy = kubetune("plan", str(job), "--model-config", str(config), "--gpu-memory", "200")
    assert roomy.returncode == 0, roomy.stdout
    assert "fits in 200.00 GiB per device" in roomy.stdout
