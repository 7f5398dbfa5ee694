"""Experiment tracking: training.reportTo through transformers' own TensorBoard and MLflow callbacks, on rank 0.

* ``tensorboard``: :class:`TensorBoard` writes event files to ``<output>/runs/attempt-<n>/`` on the
  job's volume, beside ``checkpoints/``: every value the Trainer logs (``train/loss``,
  ``train/learning_rate``, ``train/grad_norm``, ``eval/loss``, the final ``train/train_runtime`` …),
  at the optimizer step it was logged at.
* ``mlflow``: :class:`MLflow` starts one run per attempt, named ``<job>-attempt-<n>``, in the
  experiment training.tracking.experimentName (``<namespace>/<job>`` when unset) on
  training.tracking.mlflowTrackingUri. transformers logs the TrainingArguments and the model's
  config as params and every logged value as a metric at its step; this adds the tags
  ``kubetune.io/namespace``, ``kubetune.io/job`` and ``kubetune.io/attempt``, the ``kubetune.*``
  params of the spec, and, when training ends, the summary's totals (``tokens``,
  ``tokens_per_second``, ``train_seconds``, ``peak_memory_bytes``). Credentials come from the
  environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD),
  which the operator fills from training.tracking.secretRef.

A tracking server that cannot be reached, or that refuses the run, never costs the training: the
first failure is logged as a warning naming the server and the error, MLflow reporting stops for
the rest of the attempt, and the summary's ``tracking.mlflow.error`` says what happened. HTTP
requests to it are retried 3 times with a 15 s timeout (MLflow's own defaults, 7 retries of up to
120 s, could hold the training for many minutes); the environment variables
MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT override these. Metrics are sent
synchronously, so a failure shows at the step it happened.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from transformers import TrainerCallback
from transformers.integrations.integration_utils import MLflowCallback, TensorBoardCallback

from kubetune_api import MLFLOW_CREDENTIAL_KEYS, TrainerConfig

log = logging.getLogger("kubetune.tracking")

#: The folder of the TensorBoard event files, under the job's output folder.
TENSORBOARD_FOLDER: Final = "runs"
#: transformers' stock callback of each reportTo name (replaced by this module's, which add the above).
STOCK_CALLBACKS: Final[dict[str, type[TrainerCallback]]] = {
    "tensorboard": TensorBoardCallback,
    "mlflow": MLflowCallback,
}
#: Retries and timeout (seconds) of requests to the tracking server unless the environment sets them.
HTTP_DEFAULTS: Final = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def run_name(config: TrainerConfig) -> str:
    """The run's name in trackers: ``<job>-attempt-<n>``."""
    return f"{config.job_name}-attempt-{config.attempt}"


def tensorboard_dir(config: TrainerConfig) -> Path:
    """Where the attempt's TensorBoard event files go: ``<output>/runs/attempt-<n>``."""
    return Path(config.mounts.output) / TENSORBOARD_FOLDER / f"attempt-{config.attempt}"


class TensorBoard(TensorBoardCallback):
    """transformers' TensorBoardCallback writing to :func:`tensorboard_dir`, open until :meth:`close`.

    The stock callback closes its writer when training ends; the evaluation after training would then
    open a second event file. This one flushes at the end of training and closes in :meth:`close`.
    """

    def __init__(self, logging_dir: Path) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.logging_dir = str(logging_dir)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tb_writer is not None:
            self.tb_writer.flush()

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write ``values`` under ``kubetune/`` at ``step``."""
        if self.tb_writer is None:
            self._init_summary_writer(None)  # type: ignore[no-untyped-call]
        for name, value in values.items():
            self.tb_writer.add_scalar(f"kubetune/{name}", value, step)
        self.tb_writer.flush()

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None


class MLflow(MLflowCallback):
    """transformers' MLflowCallback on the spec's server, with kubetune's tags and params; never fatal.

    The run stays open after training (the evaluation after it logs into the same run) until
    :meth:`finish` ends it, FINISHED or FAILED.
    """

    def __init__(self, *, uri: str, experiment: str, tags: Mapping[str, str], params: Mapping[str, str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.uri = uri
        self.experiment = experiment
        self.tags = dict(tags)
        self.params = dict(params)
        self.run_id: str | None = None
        self.error: str | None = None

    def setup(self, args: Any, state: Any, model: Any) -> None:
        if self.error is not None:
            return
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        credentials = [key for key in MLFLOW_CREDENTIAL_KEYS if os.environ.get(key)]

        def start() -> None:
            self._ml_flow.set_tracking_uri(self.uri)
            # The stock setup reads the experiment from the environment and creates it when missing.
            os.environ["MLFLOW_EXPERIMENT_NAME"] = self.experiment
            super(MLflow, self).setup(args, state, model)  # type: ignore[no-untyped-call]
            self._async_log = False  # synchronous: a failure shows at the step it happened
            self._ml_flow.set_tags(self.tags)
            self._ml_flow.log_params(self.params)
            self.run_id = self._ml_flow.active_run().info.run_id

        self._guard("starting the run", start)
        self._initialized = True  # after a failure too: no second attempt at every log
        if self.error is None:
            log.info(
                "mlflow: run %s (%s) in experiment %r on %s (credentials: %s)",
                self.run_id,
                args.run_name,
                self.experiment,
                self.uri,
                ", ".join(credentials) or "none",
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, model: Any = None, **kwargs: Any) -> None:
        if not self._initialized:
            self.setup(args, state, model)
        if self.error is None:
            self._guard(
                f"logging step {state.global_step}",
                lambda: super(MLflow, self).on_log(args, state, control, logs, model=model, **kwargs),  # type: ignore[no-untyped-call]
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.error is None:
            self._guard("logging the checkpoint", lambda: super(MLflow, self).on_save(args, state, control, **kwargs))  # type: ignore[no-untyped-call]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The run stays open for the evaluation after training; :meth:`finish` ends it."""

    def finish(self, values: Mapping[str, float], step: int, *, failed: bool) -> None:
        """Log ``values`` at ``step`` and end the run, FAILED when training failed."""
        if self.error is not None or self.run_id is None:
            return

        def end() -> None:
            if values:
                self._ml_flow.log_metrics(dict(values), step=step)
            self._ml_flow.end_run(status="FAILED" if failed else "FINISHED")

        self._guard("ending the run", end)
        self._auto_end_run = False

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # any tracker failure is reported and training goes on
            self.error = f"{what} failed on {self.uri}: {type(exc).__name__}: {exc}"
            self._auto_end_run = False  # no more requests to this server, not even at exit
            log.warning("mlflow: %s; training goes on without MLflow for this attempt", self.error)


@dataclass
class Trackers:
    """The trackers of one process (none but on rank 0), and what the summary says about them."""

    tensorboard: TensorBoard | None = None
    mlflow: MLflow | None = None
    replaced: list[type[TrainerCallback]] = field(default_factory=list)

    @property
    def callbacks(self) -> list[TrainerCallback]:
        return [c for c in (self.tensorboard, self.mlflow) if c is not None]

    def install(self, trainer: Any) -> None:
        """Replace the Trainer's stock callbacks of reportTo (on every rank) by this process's trackers."""
        for stock in self.replaced:
            trainer.pop_callback(stock)
        for callback in self.callbacks:
            trainer.add_callback(callback)

    def finish(self, values: Mapping[str, float], step: int, *, failed: bool = False) -> None:
        """Log the final ``values`` at ``step``, close the event files and end the MLflow run."""
        if self.tensorboard is not None:
            if values:
                self.tensorboard.add_scalars(values, step)
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.finish(values, step, failed=failed)

    def describe(self) -> dict[str, Any]:
        """The summary's ``tracking`` entry: the event folder, the MLflow run and any error."""
        out: dict[str, Any] = {}
        if self.tensorboard is not None:
            out["tensorboard"] = {"dir": self.tensorboard.logging_dir}
        if self.mlflow is not None:
            out["mlflow"] = {
                "uri": self.mlflow.uri,
                "experiment": self.mlflow.experiment,
                "run_id": self.mlflow.run_id,
                "error": self.mlflow.error,
            }
        return out


def trackers(config: TrainerConfig, *, rank: int, params: Mapping[str, str]) -> Trackers:
    """The trackers of training.reportTo for this process: rank 0 reports, the other ranks none."""
    training = config.spec.training
    found = Trackers(replaced=[STOCK_CALLBACKS[name] for name in training.report_to])
    if rank != 0:
        return found
    if "tensorboard" in training.report_to:
        found.tensorboard = TensorBoard(tensorboard_dir(config))
        log.info("tensorboard: event files in %s", found.tensorboard.logging_dir)
    if "mlflow" in training.report_to:
        uri = training.tracking.mlflow_tracking_uri
        if uri is None:  # the spec's rules refuse this; a config written by hand may still say so
            raise ValueError("reportTo mlflow needs training.tracking.mlflowTrackingUri")
        found.mlflow = MLflow(
            uri=uri,
            experiment=training.tracking.experiment(config.namespace, config.job_name),
            tags={
                "kubetune.io/namespace": config.namespace,
                "kubetune.io/job": config.job_name,
                "kubetune.io/attempt": str(config.attempt),
            },
            params=params,
        )
    return found
