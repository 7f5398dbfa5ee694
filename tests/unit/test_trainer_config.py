"""The trainer's torch-free parts: reading its config file, the DeepSpeed config, and the memory planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import ALLOW_LOCAL_PATHS, FineTuneJobSpec, TrainerConfig
from kubetune_api.plan import GiB, ModelShape, Setup, estimate, plan, plan_job
from kubetune_trainer.config_file import load_config, render
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.training.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.unit

LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def job_spec(**sections: Any) -> FineTuneJobSpec:
    body = {"model": {"source": "/m"}, "dataset": {"source": "/d"}, **sections}
    return FineTuneJobSpec.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def write(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


class TestLoadConfig:
    def test_a_finetunejob_becomes_a_trainer_config_with_the_output_folder(self, tmp_path: Path) -> None:
        manifest = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bot", "namespace": "ml"},
            "spec": {"model": {"source": "/models/base"}, "dataset": {"source": "file:///data/train.jsonl"}},
        }
        config = load_config(write(tmp_path / "job.yaml", manifest), output=tmp_path / "out", metrics_port=9999)
        assert (config.job_name, config.namespace, config.metrics_port) == ("bot", "ml", 9999)
        assert config.mounts.output == str(tmp_path / "out")
        assert config.spec.model.source == "file:///models/base"

    def test_every_problem_is_listed_at_once(self, tmp_path: Path) -> None:
        manifest = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {},
            "spec": {
                "model": {"source": "ftp://x"},
                "dataset": {"source": "/d"},
                "method": {"type": "full", "lora": {}},
            },
        }
        with pytest.raises(PermanentError) as raised:
            load_config(write(tmp_path / "job.yaml", manifest))
        fields = [p.field for p in raised.value.problems]
        assert fields == ["metadata.name", "--output", "spec.model.source"]

    def test_a_rendered_trainer_config_round_trips(self, tmp_path: Path) -> None:
        config = TrainerConfig(job_name="j", spec=job_spec(training={"maxSteps": 5}), attempt=2)
        path = tmp_path / "config.json"
        path.write_text(render(config))
        loaded = load_config(path, output=tmp_path / "o")
        assert loaded.spec == config.spec
        assert loaded.attempt == 2
        assert loaded.mounts.output == str(tmp_path / "o")
        assert json.loads(path.read_text())["kind"] == "TrainerConfig"

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            ("kind: Pod\n", "has kind 'Pod'"),
            ("- a\n- b\n", "holds list"),
            ("{unclosed", "neither JSON nor YAML"),
        ],
    )
    def test_a_file_that_is_no_config_is_refused(self, tmp_path: Path, content: str, message: str) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(content)
        with pytest.raises(PermanentError, match=message):
            load_config(path)

    def test_the_train_command_exits_2_on_a_bad_config(self, tmp_path: Path) -> None:
        path = write(tmp_path / "c.yaml", {"kind": "TrainerConfig", "spec": {}})
        message = tmp_path / "termination-log"
        result = subprocess.run(
            [sys.executable, "-m", "kubetune_cli.main", "train", "--config", str(path)],
            capture_output=True,
            text=True,
            check=False,
            env={"KUBETUNE_TERMINATION_MESSAGE_PATH": str(message), "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 2, result.stderr
        assert "jobName: required field is missing" in result.stderr
        assert "spec.model: required field is missing" in message.read_text()


class TestDeepSpeedConfig:
    @pytest.mark.parametrize("stage", [0, 1, 2, 3])
    def test_the_zero_stage_and_auto_values(self, stage: int) -> None:
        config = deepspeed_config(job_spec(distributed={"deepspeed": {"zeroStage": stage}}))
        assert config["zero_optimization"]["stage"] == stage
        for key in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "gradient_clipping",
        ):
            assert config[key] == "auto"
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
        assert ("stage3_gather_16bit_weights_on_model_save" in config["zero_optimization"]) == (stage == 3)
        assert "optimizer" not in config

    def test_offload_brings_deepspeeds_own_optimizer_and_no_pinned_memory_on_cpu(self) -> None:
        spec = job_spec(
            distributed={"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParameters": "cpu"}}
        )
        on_gpu, on_cpu = deepspeed_config(spec), deepspeed_config(spec, accelerator="cpu")
        assert on_gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert on_gpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
        assert on_cpu["zero_optimization"]["offload_param"]["pin_memory"] is False
        assert on_cpu["zero_optimization"]["overlap_comm"] is False
        assert on_gpu["optimizer"]["params"]["lr"] == "auto"

    def test_deepspeed_is_used_only_where_it_helps(self) -> None:
        z2 = job_spec(distributed={"deepspeed": {"zeroStage": 2}})
        assert not z2.distributed.deepspeed.used_with(1)
        assert z2.distributed.deepspeed.used_with(2)
        assert not job_spec(distributed={"deepspeed": {"zeroStage": 0}}).distributed.deepspeed.used_with(8)
        assert job_spec(
            distributed={"deepspeed": {"zeroStage": 1, "offloadOptimizer": "cpu"}}
        ).distributed.deepspeed.used_with(1)


class TestPlanner:
    def test_model_shape_from_a_llama_config(self) -> None:
        shape = ModelShape.from_config(LLAMA_8B)
        assert shape.parameters == 8_030_261_248  # Llama-3.1-8B as published
        assert shape.kv_heads == 8
        assert shape.head_dim == 128

    @pytest.mark.parametrize(("stage", "bytes_per_parameter"), [(0, 16), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)])
    def test_model_states_follow_the_zero_paper(self, stage: int, bytes_per_parameter: float) -> None:
        shape = ModelShape.from_config(LLAMA_8B)
        spec = job_spec(method={"type": "full"}, distributed={"deepspeed": {"zeroStage": stage}})
        setup = Setup.from_spec(spec, world_size=8)
        setup = Setup(**{**{f: getattr(setup, f) for f in setup.__dataclass_fields__}, "deepspeed": True})
        memory = estimate(shape, setup)
        states = memory.parameters + memory.gradients + memory.optimizer
        assert states == pytest.approx(bytes_per_parameter * shape.parameters)

    def test_qlora_stores_about_half_a_byte_per_weight(self) -> None:
        shape = ModelShape.from_config(LLAMA_8B)
        memory = estimate(shape, Setup.from_spec(job_spec(method={"type": "qlora"}), world_size=1))
        quantized = memory.parameters - shape.other_parameters * 2 - memory.trainable_parameters * 4
        assert 0.5 < quantized / shape.linear_parameters < 0.52
        assert memory.trainable_parameters == 16 * sum(a + b for a, b in shape.linear_shapes().values()) * 32

    def test_a_job_that_does_not_fit_gets_suggestions_that_do(self) -> None:
        spec = job_spec(
            method={"type": "full"},
            training={"batchSizePerDevice": 4},
            distributed={"nodes": 1, "processesPerNode": 8, "deepspeed": {"zeroStage": 2}},
            resources={"gpusPerNode": 8},
        )
        result = plan_job(spec, LLAMA_8B, device_gib=32)  # ≈ 39 GiB predicted with ZeRO-2
        assert result.fits is False
        assert result.suggestions
        assert any("zeroStage: 3" in s for s in result.suggestions)
        assert plan_job(spec, LLAMA_8B, device_gib=80).fits is True

    def test_lora_on_one_gpu_fits_and_full_does_not(self) -> None:
        shape = ModelShape.from_config(LLAMA_8B)
        lora = plan(shape, Setup.from_spec(job_spec(), world_size=1), device_bytes=48 * GiB)
        full = plan(shape, Setup.from_spec(job_spec(method={"type": "full"}), world_size=1), device_bytes=48 * GiB)
        assert lora.fits
        assert not full.fits
        assert any("qlora" in s or "offload" in s for s in full.suggestions)
