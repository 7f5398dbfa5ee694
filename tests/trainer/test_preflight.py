"""``kubetune preflight``: the checks training makes, on a CPU, with the findings the operator plans from.

Real commands on the session's toy Llama; the data the pre-flight keeps is what training then
trains on (the dataset file is removed in between to prove it is not read again).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.config_file import load_config, render
from kubetune_trainer.training.preflight import PLANNER_KEYS
from kubetune_trainer.training.prepare import PREFLIGHT_FOLDER, data_key
from tests.trainer.conftest import finetunejob, kubetune_train, train_env, write_manifest

pytestmark = pytest.mark.trainer


def preflight(config: Path, output: Path, *args: str, message: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_cli.main",
            "preflight",
            "--config",
            str(config),
            "--output",
            str(output),
            *args,
        ],
        env=train_env(KUBETUNE_TERMINATION_MESSAGE_PATH=str(message)),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_findings_then_training_on_the_kept_data(toy_model: Path, toy_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(toy_data.read_bytes())
    manifest = finetunejob(toy_model, data, training={"maxSteps": 20})
    job = write_manifest(tmp_path, manifest)
    output = tmp_path / "out"
    result = preflight(job, output, "--keep", message=tmp_path / "termination-log")
    assert result.returncode == 0, result.stderr[-3000:]
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "termination-log").read_text()) == found
    records = sum(1 for line in toy_data.read_text().splitlines() if line.strip())
    assert found["records"] == records
    assert found["trainExamples"] == records
    assert found["tokens"] > records
    assert found["truncated"] == 0
    assert found["kept"] is True
    toy_config = json.loads((toy_model / "config.json").read_text())
    assert found["modelConfig"] == {k: toy_config[k] for k in PLANNER_KEYS if k in toy_config}
    config = load_config(job, output=output)
    kept = output / PREFLIGHT_FOLDER / data_key(config)
    assert (kept / "train").is_dir()
    assert (kept / "prepared.json").is_file()

    # Training told to reuse it trains without the dataset file.
    data.unlink()
    reusing = tmp_path / "config.json"
    reusing.write_text(render(config.model_copy(update={"reuse_prepared_data": True})), encoding="utf-8")
    run = kubetune_train(reusing, output)
    assert run.code == 0, run.log[-3000:]
    assert "reusing what the pre-flight tokenized" in run.log
    assert run.summary["data"]["train_tokens"] == found["tokens"]

    # Without that word from the operator, training reads its dataset itself (and here finds it gone).
    alone = kubetune_train(job, tmp_path / "out-alone")
    assert alone.code == 2
    assert "train.jsonl" in alone.log


def test_a_target_module_the_model_lacks_fails_before_any_data_is_read(
    toy_model: Path, toy_data: Path, tmp_path: Path
) -> None:
    method = {"type": "lora", "lora": {"r": 8, "alpha": 16, "targetModules": ["query_key_value"]}}
    job = write_manifest(tmp_path, finetunejob(toy_model, toy_data, method=method))
    result = preflight(job, tmp_path / "out", message=tmp_path / "termination-log")
    assert result.returncode == 2, result.stderr[-3000:]
    message = (tmp_path / "termination-log").read_text()
    assert "spec.method.lora.targetModules" in message
    assert "query_key_value" in message
    assert "q_proj" in message


def test_an_unreachable_source_is_worth_a_retry(toy_model: Path, tmp_path: Path) -> None:
    job = write_manifest(
        tmp_path,
        finetunejob(toy_model, tmp_path / "unused.jsonl", dataset={"source": "https://127.0.0.1:9/train.jsonl"}),
    )
    manifest_config = load_config(job, output=tmp_path / "out")
    config = tmp_path / "config.json"
    config.write_text(render(manifest_config.model_copy(update={"allow_private_addresses": True})), encoding="utf-8")
    result = preflight(config, tmp_path / "out", message=tmp_path / "termination-log")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "127.0.0.1:9" in (tmp_path / "termination-log").read_text()
