"""training.reportTo: TensorBoard event files on the job's volume and runs on a real MLflow tracking server.

The MLflow server is MLflow's own (``mlflow server``, a SQLite store) started on loopback by the
test; the runs are read back with ``MlflowClient``, the event files with TensorBoard's reader.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import wait_until
from tests.trainer.conftest import TOY_TRAINING, Run, finetunejob, free_port, kubetune_train, train_env, write_manifest

pytestmark = pytest.mark.trainer

#: A short toy run: 30 steps, the loss logged every 5 (and at step 1), one checkpoint.
SHORT: dict[str, Any] = {**TOY_TRAINING, "maxSteps": 30, "loggingEverySteps": 5, "checkpointEverySteps": 30}


def config_of(training: dict[str, Any], *, dataset: str = "https://example.org/data.jsonl?X-Amz-Signature=abc") -> Any:
    from kubetune_api import TrainerConfig  # noqa: PLC0415

    spec = {"model": {"source": "hf://org/base"}, "dataset": {"source": dataset}, "training": training}
    return TrainerConfig.model_validate(
        {"jobName": "bot", "namespace": "ml", "attempt": 2, "spec": spec, "mounts": {"output": "/workspace"}}
    )


def test_only_rank_0_reports_and_every_rank_drops_the_stock_callbacks() -> None:
    from transformers.integrations.integration_utils import MLflowCallback, TensorBoardCallback  # noqa: PLC0415

    from kubetune_trainer.training.tracking import MLflow, TensorBoard, trackers  # noqa: PLC0415

    config = config_of({"reportTo": ["tensorboard", "mlflow"], "tracking": {"mlflowTrackingUri": "http://mlflow:5000"}})
    other = trackers(config, rank=1, params={})
    assert other.callbacks == []
    assert other.replaced == [TensorBoardCallback, MLflowCallback]
    zero = trackers(config, rank=0, params={"kubetune.method": "lora"})
    assert isinstance(zero.tensorboard, TensorBoard)
    assert zero.tensorboard.logging_dir == "/workspace/runs/attempt-2"
    assert isinstance(zero.mlflow, MLflow)
    assert (zero.mlflow.uri, zero.mlflow.experiment) == ("http://mlflow:5000", "ml/bot")
    assert zero.mlflow.tags == {"kubetune.io/namespace": "ml", "kubetune.io/job": "bot", "kubetune.io/attempt": "2"}
    named = config_of(
        {"reportTo": ["mlflow"], "tracking": {"mlflowTrackingUri": "http://mlflow:5000", "experimentName": "sweep"}}
    )
    assert trackers(named, rank=0, params={}).mlflow is not None
    assert trackers(named, rank=0, params={}).mlflow.experiment == "sweep"  # type: ignore[union-attr]
    assert trackers(config_of({}), rank=0, params={}).callbacks == []


def test_params_name_the_spec_without_a_presigned_urls_query() -> None:
    from kubetune_trainer.training.train import tracking_params  # noqa: PLC0415

    params = tracking_params(config_of({}), world_size=1, precision="fp32")
    assert params["kubetune.dataset"] == "https://example.org/data.jsonl"
    assert params["kubetune.model"] == "hf://org/base"
    assert params["kubetune.deepspeed_zero_stage"] == "off", "one process trains without DeepSpeed"
    assert (params["kubetune.method"], params["kubetune.lora_r"], params["kubetune.lora_alpha"]) == (
        "lora",
        "16",
        "32",
    )
    assert tracking_params(config_of({}), world_size=4, precision="bf16")["kubetune.deepspeed_zero_stage"] != "off"


def logged_steps(run: Run) -> list[int]:
    return [entry["step"] for entry in run.summary["losses"]]


def test_tensorboard_event_files_beside_the_checkpoints(toy_model: Path, toy_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    manifest = finetunejob(toy_model, toy_data, training={**SHORT, "reportTo": ["tensorboard"]})
    run = kubetune_train(write_manifest(tmp_path, manifest), tmp_path / "out")
    assert run.code == 0, run.log[-4000:]

    events = tmp_path / "out" / "runs" / "attempt-0"
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-30").is_dir()
    files = list(events.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"one event file for the attempt, found {files}"
    assert run.summary["tracking"] == {"tensorboard": {"dir": str(events)}}
    assert f"tensorboard: event files in {events}" in run.log

    reader = EventAccumulator(str(events))
    reader.Reload()
    losses = reader.Scalars("train/loss")
    assert [e.step for e in losses] == logged_steps(run) == [1, 5, 10, 15, 20, 25, 30]
    assert [e.value for e in losses] == pytest.approx([e["loss"] for e in run.summary["losses"]], rel=1e-5)
    assert losses[-1].value < losses[0].value, "the toy loss falls"
    scalars = set(reader.Tags()["scalars"])
    assert {"train/learning_rate", "train/grad_norm", "train/train_runtime", "kubetune/tokens_per_second"} <= scalars
    assert reader.Scalars("kubetune/tokens")[-1].value == run.summary["tokens"]


# ------------------------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def serve_mlflow(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real MLflow tracking server on loopback (SQLite store, local artifacts) while in the block; its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--default-artifact-root", (folder / "artifacts").as_uri(), *args]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )

    def healthy() -> bool:
        assert server.poll() is None, f"the MLflow server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(healthy, timeout=120, what="the MLflow server's /health", interval=0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow tracking server without authentication."""
    with serve_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def test_mlflow_run_with_params_step_losses_and_final_metrics(
    mlflow_server: str, toy_model: Path, toy_data: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    training = {**SHORT, "reportTo": ["mlflow"], "tracking": {"mlflowTrackingUri": mlflow_server}}
    run = kubetune_train(
        write_manifest(tmp_path, finetunejob(toy_model, toy_data, training=training)), tmp_path / "out"
    )
    assert run.code == 0, run.log[-4000:]
    reported = run.summary["tracking"]["mlflow"]
    assert reported["error"] is None, reported
    assert "mlflow: run " in run.log
    assert "training goes on without MLflow" not in run.log

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("default/toy")
    assert experiment is not None, "the default experiment is <namespace>/<job>"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [reported["run_id"]]
    found = runs[0]
    assert found.info.run_name == "toy-attempt-0"
    assert found.info.status == "FINISHED"
    assert {k: found.data.tags[k] for k in ("kubetune.io/namespace", "kubetune.io/job", "kubetune.io/attempt")} == {
        "kubetune.io/namespace": "default",
        "kubetune.io/job": "toy",
        "kubetune.io/attempt": "0",
    }
    params = found.data.params
    assert float(params["learning_rate"]) == SHORT["learningRate"]
    assert params["max_steps"] == "30"
    assert params["per_device_train_batch_size"] == str(SHORT["batchSizePerDevice"])
    assert params["kubetune.method"] == "lora"
    assert params["kubetune.lora_r"] == "16"
    assert params["kubetune.model"] == toy_model.as_uri()

    history = client.get_metric_history(found.info.run_id, "loss")
    assert [m.step for m in history] == logged_steps(run) == [1, 5, 10, 15, 20, 25, 30]
    assert [m.value for m in history] == pytest.approx([e["loss"] for e in run.summary["losses"]], rel=1e-5)
    assert history[-1].value < history[0].value, "the toy loss falls"
    metrics = found.data.metrics
    assert {"train_runtime", "train_loss", "grad_norm", "learning_rate"} <= set(metrics)
    assert metrics["tokens"] == run.summary["tokens"]
    assert metrics["tokens_per_second"] == pytest.approx(run.summary["tokens_per_second"])


def test_an_unreachable_tracking_server_costs_a_warning_not_the_training(
    toy_model: Path, toy_data: Path, tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    training = {**SHORT, "maxSteps": 10, "reportTo": ["mlflow", "tensorboard"], "tracking": {"mlflowTrackingUri": uri}}
    run = kubetune_train(
        write_manifest(tmp_path, finetunejob(toy_model, toy_data, training=training)),
        tmp_path / "out",
        env=train_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1"),
    )
    assert run.code == 0, run.log[-4000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    error = run.summary["tracking"]["mlflow"]["error"]
    assert error is not None
    assert error.startswith(f"starting the run failed on {uri}: ")
    assert f"mlflow: {error}; training goes on without MLflow for this attempt" in run.log
    assert run.log.count("training goes on without MLflow") == 1, "one warning, no retry at every step"
    assert run.summary["steps"] == 10
    assert list((tmp_path / "out" / "runs" / "attempt-0").glob("events.out.tfevents.*")), "TensorBoard still reports"


def test_mlflow_credentials_from_the_environment_reach_a_basic_auth_server(
    toy_model: Path, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's basic-auth app: the right password makes the run; a wrong one is a warning, and training goes on.

    The operator puts the Secret's MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD into these
    variables (tests/unit/test_builders.py checks the secretKeyRefs); here the test sets them.
    """
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    password = "kubetune-test-password-1"  # a throwaway server's admin
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    with serve_mlflow(
        tmp_path / "server",
        "--app-name",
        "basic-auth",
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "kubetune-test-csrf"},
    ) as uri:
        training = {**SHORT, "maxSteps": 10, "reportTo": ["mlflow"], "tracking": {"mlflowTrackingUri": uri}}
        manifest = write_manifest(tmp_path / "job", finetunejob(toy_model, toy_data, training=training))

        refused = kubetune_train(
            manifest,
            tmp_path / "refused",
            env=train_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong"),
        )
        assert refused.code == 0, refused.log[-4000:]
        error = refused.summary["tracking"]["mlflow"]["error"]
        assert error.startswith(f"starting the run failed on {uri}: "), error
        assert "401" in error, error
        assert "training goes on without MLflow" in refused.log

        accepted = kubetune_train(
            manifest,
            tmp_path / "accepted",
            env=train_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password),
        )
        assert accepted.code == 0, accepted.log[-4000:]
        assert accepted.summary["tracking"]["mlflow"]["error"] is None
        assert "credentials: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD" in accepted.log

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        found = MlflowClient(tracking_uri=uri).get_run(accepted.summary["tracking"]["mlflow"]["run_id"])
        assert found.info.status == "FINISHED"
        assert [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(found.info.run_id, "loss")] == [
            1,
            5,
            10,
        ]
