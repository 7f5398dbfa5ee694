"""The ``train`` cases of the hostile-input corpus (tests/hostile/): real ``kubetune train`` runs, each refused with exit 2.

The model is the session's toy model, copied into a claim (``pvc://models/tiny``) or changed as a
case asks; every source lives in the test's folder, mounted as claims of a TrainerConfig.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.hostile import HostileCase, build_files, load_hostile, mounts_of
from tests.trainer.conftest import TOY_TRAINING, finetunejob, kubetune_train, train_env, write_manifest

pytestmark = pytest.mark.trainer


class _Payload:
    """What a hostile pickle holds: a call that torch's restricted unpickler refuses (a harmless print)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return print, ("a pickled model ran code",)


def pickle_only_model(toy_model: Path, folder: Path) -> Path:
    """The toy model with its weights replaced by a ``pytorch_model.bin`` pickle that torch blocks."""
    model = folder / "pickled-model"
    shutil.copytree(toy_model, model)
    for weights in model.glob("*.safetensors*"):
        weights.unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload()}))
    return model


def config_for(case: HostileCase, tmp_path: Path, toy_model: Path, toy_data: Path) -> Path:
    """The --config file of a case: its raw text, a FineTuneJob with local paths, or a TrainerConfig over claims."""
    spec = case.spec
    if "config" in spec:
        path = tmp_path / "config.yaml"
        path.write_text(str(spec["config"]), encoding="utf-8")
        return path
    if spec.get("model") == "pickle-only":
        model = pickle_only_model(toy_model, tmp_path)
        return write_manifest(tmp_path, finetunejob(model, toy_data, training={**TOY_TRAINING, "maxSteps": 1}))
    build_files(tmp_path, spec)
    shutil.copytree(toy_model, tmp_path / "claims" / "models" / "tiny")
    config = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "TrainerConfig",
        "jobName": "hostile",
        "namespace": "team",
        "spec": {
            "model": {"source": spec["model"]},
            "dataset": {"source": spec["dataset"], "maxSeqLength": 32},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "training": {**TOY_TRAINING, "maxSteps": 1},
        },
        "mounts": mounts_of(tmp_path),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", load_hostile("train"), ids=lambda c: c.name)
def test_hostile_training_inputs_exit_2(case: HostileCase, tmp_path: Path, toy_model: Path, toy_data: Path) -> None:
    config = config_for(case, tmp_path, toy_model, toy_data)
    termination = tmp_path / "termination-log"
    run = kubetune_train(
        config, tmp_path / "out", env=train_env(KUBETUNE_TERMINATION_MESSAGE_PATH=str(termination)), timeout=240
    )
    assert run.code == case.exit, run.log[-3000:]
    case.assert_reason(termination.read_text(encoding="utf-8"))
    assert "a pickled model ran code" not in run.log
    assert not (tmp_path / "out" / "adapter").exists(), "nothing may be trained"
