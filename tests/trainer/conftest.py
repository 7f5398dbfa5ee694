"""Shared pieces of the trainer tests: a toy Llama built once per session, and ``kubetune train`` runs.

Training runs are real ``kubetune train`` processes (the command the operator runs in a pod) on a
tiny Llama and tokenizer that the session builds itself; nothing is downloaded. Each run is given
one CPU thread per process: on a 2-core machine, tiny models train several times faster so than
with threads that contend for the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.runs import train_command
from kubetune_local.controlplane import free_port
from kubetune_trainer.toy import ToySize, build_toy
from tests import factories

#: Settings under which the toy facts are learned in 150 steps by every method.
TOY_TRAINING: dict[str, Any] = {
    "maxSteps": 150,
    "learningRate": 3.0e-3,
    "lrScheduler": "constant",
    "warmupRatio": 0,
    "batchSizePerDevice": 16,
    "precision": "fp32",
    "gradientCheckpointing": False,
    "checkpointEverySteps": 1000,
    "loggingEverySteps": 10,
}


def train_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def finetunejob(
    model: Path, data: Path, *, method: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A FineTuneJob manifest with local paths; ``sections`` are merged over the toy defaults."""
    base: dict[str, dict[str, Any]] = {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "maxSeqLength": 32},
        "method": method or {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": TOY_TRAINING,
    }
    return factories.finetunejob("toy", base=base, **sections)


def write_manifest(folder: Path, manifest: dict[str, Any], name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return path


@dataclass
class Run:
    """A finished ``kubetune train``."""

    code: int
    log: str
    output: Path

    @property
    def summary(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.output / "summary.json").read_text())
        return loaded


def kubetune_train(
    config: Path, output: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> Run:
    """Run ``kubetune train --config CONFIG --output OUTPUT ARGS`` to the end."""
    command = train_command(config, output, *args)
    if "--metrics-port" not in args:
        command += ["--metrics-port", str(free_port())]
    result = subprocess.run(
        command, env=env or train_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    return Run(result.returncode, result.stdout + result.stderr, output)


def start_train(
    config: Path, output: Path, *args: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``kubetune train`` in the background (its own process group), logging to ``log``."""
    command = train_command(config, output, *args)
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, env=env or train_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy base model (``model/``) and facts (``data/train.jsonl``, prompt-completion), built once."""
    return build_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def toy_model(toy: Path) -> Path:
    return toy / "model"


@pytest.fixture(scope="session")
def toy_data(toy: Path) -> Path:
    return toy / "data" / "train.jsonl"


@pytest.fixture(scope="session")
def toy_tokenizer(toy_model: Path) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(toy_model)


__all__ = [
    "TOY_TRAINING",
    "Run",
    "ToySize",
    "finetunejob",
    "free_port",
    "kubetune_train",
    "start_train",
    "train_command",
    "train_env",
    "write_manifest",
]
