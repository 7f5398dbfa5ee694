"""Two nodes on one machine, as the operator runs them: ``kubetune train --nnodes 2 --node-rank R`` each.

Each "node" is its own ``kubetune train`` with one process, meeting the other through torchrun's
static rendezvous on 127.0.0.1 with gloo; DeepSpeed ZeRO-2 and ZeRO-3 shard the work. One adapter
comes out, and peft loads it. A worker's permanent failure reaches the launcher as exit code 2
through torchrun, which itself only says 1.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import ALLOW_LOCAL_PATHS, TrainerConfig
from kubetune_trainer.config_file import render
from kubetune_trainer.errors import EXIT_PERMANENT, EXIT_RETRYABLE
from kubetune_trainer.toy import toy_match_rate
from kubetune_trainer.training.launch import Topology, _launch_workers
from tests.trainer.conftest import Run, finetunejob, free_port, start_train, write_manifest

pytestmark = pytest.mark.trainer


def two_nodes(config: Path, output: Path, folder: Path) -> list[Run]:
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    processes = [
        start_train(
            config,
            output,
            *common,
            "--node-rank",
            str(rank),
            "--metrics-port",
            str(free_port()),
            log=folder / f"node{rank}.log",
        )
        for rank in (1, 0)
    ]
    try:
        codes = [p.wait(timeout=400) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return [
        Run(code, (folder / f"node{rank}.log").read_text(), output) for code, rank in zip(codes, (1, 0), strict=True)
    ]


@pytest.mark.parametrize("zero", [2, 3])
def test_two_nodes_train_one_adapter_that_peft_loads(
    zero: int, toy_model: Path, toy_data: Path, toy_tokenizer: Any, tmp_path: Path
) -> None:
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    training = {"batchSizePerDevice": 8}
    manifest = finetunejob(toy_model, toy_data, training=training, distributed={"deepspeed": {"zeroStage": zero}})
    config = write_manifest(tmp_path, manifest)
    runs = two_nodes(config, tmp_path / "out", tmp_path)
    for run in runs:
        assert run.code == 0, run.log[-4000:]
    node0 = runs[1]
    assert f"DeepSpeed ZeRO-{zero}" in node0.log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["deepspeed_zero_stage"] == zero
    assert summary["steps"] == 150
    first, last = summary["losses"][0]["loss"], summary["losses"][-1]["loss"]
    adapters = sorted(
        p.parent.name for p in (tmp_path / "out").rglob("adapter_model.safetensors") if "checkpoint" not in str(p)
    )
    assert adapters == ["adapter"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model), tmp_path / "out" / "adapter")
    rate = toy_match_rate(model, toy_tokenizer)
    print(f"2 nodes, ZeRO-{zero}: loss {first:.3f} → {last:.3f}; matches {rate:.0%}")
    assert last < first / 5
    assert rate >= 0.9


def test_a_workers_permanent_failure_exits_2_through_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "config.json").write_text(json.dumps({"kind": "TrainerConfig", "spec": {}}))
    message = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(message))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = _launch_workers(Topology(1, 0, 2, "127.0.0.1", free_port()), prepared)
    assert code == EXIT_PERMANENT
    reason = message.read_text()
    assert "jobName" in reason or "job_name" in reason, reason
    assert "\n" not in reason.strip()


def test_a_workers_other_failure_is_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    config = TrainerConfig.model_validate(
        {"jobName": "t", "spec": {"model": {"source": "/m"}, "dataset": {"source": "/d"}}},
        context={ALLOW_LOCAL_PATHS: True},
    )
    (prepared / "config.json").write_text(render(config))  # a good config, but prepared.json is missing
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = _launch_workers(Topology(1, 0, 2, "127.0.0.1", free_port()), prepared)
    assert code == EXIT_RETRYABLE
    # Both ranks hit the same error; which one writes its record before torchrun stops the other is a race,
    # so the message names whichever rank reported (the lowest of those that did) and the real cause.
    message = (tmp_path / "termination-log").read_text()
    assert re.match(r"rank [01]: FileNotFoundError", message), message
    assert "prepared.json" in message
    assert os.environ.get("KUBETUNE_FAILURE_DIR") is None
