"""The operator's own Prometheus metrics (served on the operator's metrics port)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

JOBS_BY_PHASE: Final = Gauge("kubetune_jobs", "FineTuneJobs by phase", ["phase"])
JOBS_CREATED: Final = Counter("kubetune_jobs_created", "FineTuneJobs seen for the first time")
JOBS_SUCCEEDED: Final = Counter("kubetune_jobs_succeeded", "FineTuneJobs that completed")
JOBS_FAILED: Final = Counter("kubetune_jobs_failed", "FineTuneJobs that failed")
JOBS_RESTARTED: Final = Counter("kubetune_job_restarts", "Gang restarts from a checkpoint")
RECONCILE_SECONDS: Final = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time of one reconcile pass (observe, decide, act)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PROVISIONING_SECONDS: Final = Histogram(
    "kubetune_provisioning_latency_seconds",
    "From the end of a job's pre-flight (its creation when it has none) to its nodes being ready",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
FIRST_STEP_SECONDS: Final = Histogram(
    "kubetune_time_to_first_step_seconds",
    "From a job's creation to its first training step",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
#: In seconds, Prometheus' base unit (promtool refuses hours); the dashboard shows hours.
GPU_SECONDS: Final = Counter("kubetune_gpu_seconds", "GPU-seconds used by training pods", ["namespace"])

# Per job (one series per FineTuneJob, dropped when it is deleted): what the alert rules ask about.
JOB_PHASE: Final = Gauge(
    "kubetune_job_phase", "1 for the FineTuneJob's current phase", ["namespace", "finetunejob", "phase"]
)
JOB_CONDITION: Final = Gauge(
    "kubetune_job_condition",
    "1 when the FineTuneJob's condition is True, else 0",
    ["namespace", "finetunejob", "condition"],
)
JOB_RESTARTS: Final = Gauge(
    "kubetune_job_gang_restarts", "Gang restarts of the FineTuneJob so far", ["namespace", "finetunejob"]
)
RECONCILE_ERRORS: Final = Counter(
    "kubetune_reconcile_errors", "Reconcile passes that raised (retried after a delay)", ["kind"]
)

for _kind in ("FineTuneJob", "ModelServer"):
    RECONCILE_ERRORS.labels(kind=_kind)  # the series exist from the start, at 0, for rate() and increase()
