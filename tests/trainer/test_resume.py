"""A run killed after a checkpoint resumes there on restart and ends where an uninterrupted run ends.

The first run is SIGKILLed (as an evicted pod is) once a checkpoint is complete; the second run,
the same command, must start at that checkpoint's step, take the remaining steps only, and with
the same data order reach the very loss an uninterrupted run logs at the last step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from kubetune_trainer.training.train import COMPLETE_MARKER, latest_checkpoint
from tests.factories import wait_until
from tests.trainer.conftest import finetunejob, kubetune_train, start_train, write_manifest

pytestmark = pytest.mark.trainer

STEPS = 40
EVERY = 10


def test_killed_run_resumes_at_its_checkpoint_and_ends_at_the_same_step(
    toy_model: Path, toy_data: Path, tmp_path: Path
) -> None:
    training = {"maxSteps": STEPS, "checkpointEverySteps": EVERY, "keepCheckpoints": 2, "loggingEverySteps": 5}
    config = write_manifest(tmp_path, finetunejob(toy_model, toy_data, training=training))

    reference = kubetune_train(config, tmp_path / "reference")
    assert reference.code == 0, reference.log[-3000:]

    output = tmp_path / "out"
    first = start_train(config, output, log=tmp_path / "first.log")
    marker = output / "checkpoints" / f"checkpoint-{EVERY}" / COMPLETE_MARKER
    try:
        wait_until(marker.exists, timeout=240, what="the first complete checkpoint", interval=0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (output / "summary.json").exists(), "the first run finished before it was killed"
    saved = latest_checkpoint(output / "checkpoints")
    assert saved is not None
    saved_step = int(saved.name.removeprefix("checkpoint-"))
    assert EVERY <= saved_step < STEPS

    resumed = kubetune_train(config, output)
    assert resumed.code == 0, resumed.log[-3000:]
    assert f"resuming from {saved}" in resumed.log
    summary = resumed.summary
    print(
        f"resume: killed after checkpoint-{saved_step}; resumed at step {summary['resumed_from_step']}, ended at {summary['steps']}"
    )
    assert summary["resumed_from_step"] == saved_step
    assert summary["steps"] == STEPS
    state = json.loads((output / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    # The same data order and RNG state: the last logged loss is the uninterrupted run's.
    assert summary["losses"][-1]["step"] == reference.summary["losses"][-1]["step"] == STEPS
    assert summary["losses"][-1]["loss"] == pytest.approx(reference.summary["losses"][-1]["loss"], rel=1e-4)
    # Only the remaining steps' tokens were trained in the second run.
    assert summary["tokens"] == reference.summary["tokens"]


def test_a_partial_checkpoint_is_not_resumed_from(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / "checkpoint-10" / COMPLETE_MARKER).write_text("{}")
    (folder / "checkpoint-20" / COMPLETE_MARKER).write_text("{}")
    assert latest_checkpoint(folder) == folder / "checkpoint-20"
    assert latest_checkpoint(tmp_path / "none") is None
