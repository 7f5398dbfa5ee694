"""What a reconcile pass knows before it decides: :class:`Facts`, worked out once from the observations.

The training Jobs by attempt and their states, the attempt, node readiness, whether training and
publishing ended and how, whether the nodes go, and the :class:`~kubetune_operator.children.target.Target`
the builders get. Every phase of :func:`kubetune_operator.reconcile.decide` reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_api import FineTuneJobSpec
from kubetune_api.objects import Obj
from kubetune_api.resource import FineTuneJobStatus
from kubetune_operator.children.target import Target
from kubetune_operator.observed import JobState, NodeReadiness, Observed, attempt_of, job_state, node_readiness
from kubetune_operator.preflight import Verdict, verdict
from kubetune_operator.settings import OperatorSettings


@dataclass(frozen=True)
class Facts:
    """What a pass knows before it decides, worked out once from the observations."""

    observed: Observed
    settings: OperatorSettings
    previous: FineTuneJobStatus
    jobs: list[Obj]
    """The training Jobs, oldest attempt first."""
    current: Obj | None
    """The training Job of the newest attempt."""
    current_state: JobState | None
    failures: int
    """Attempts that failed in a way a restart may fix."""
    attempt: int
    readiness: NodeReadiness
    preflight: Verdict
    """Where the pre-flight stands; nothing is provisioned until it is clear."""
    publish_state: JobState | None
    """The publish Job's state, once training succeeded and the Job exists."""
    trained: bool
    terminal_success: bool
    publish_failed: bool
    terminal_failure: bool
    release: bool
    """Whether the nodes go now (the job ended and runPolicy.releaseNodes is OnCompletion)."""
    target: Target

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.observed.job.spec

    @property
    def terminal(self) -> bool:
        return self.terminal_success or self.terminal_failure


def facts_of(observed: Observed, settings: OperatorSettings) -> Facts:
    """The facts of one pass over ``observed``."""
    spec = observed.job.spec
    jobs = sorted(observed.training_jobs, key=attempt_of)
    current = jobs[-1] if jobs else None
    states = [job_state(j) for j in jobs]
    failures = states.count("FailedRetryable")
    attempt = attempt_of(current) if current is not None else 0
    current_state: JobState | None = states[-1] if current is not None else None
    readiness = node_readiness(observed)
    preflight = verdict(observed)
    trained = current_state == "Succeeded"
    publish_state = job_state(observed.publish_job) if trained and observed.publish_job is not None else None
    terminal_success = publish_state == "Succeeded"
    publish_failed = publish_state in ("FailedPermanent", "FailedRetryable")
    terminal_failure = (
        preflight.state == "Failed"
        or current_state == "FailedPermanent"
        or (current_state == "FailedRetryable" and failures > spec.run_policy.max_restarts)
        or publish_failed
    )
    terminal = terminal_success or terminal_failure
    return Facts(
        observed=observed,
        settings=settings,
        previous=observed.job.status or FineTuneJobStatus(),
        jobs=jobs,
        current=current,
        current_state=current_state,
        failures=failures,
        attempt=attempt,
        readiness=readiness,
        preflight=preflight,
        publish_state=publish_state,
        trained=trained,
        terminal_success=terminal_success,
        publish_failed=publish_failed,
        terminal_failure=terminal_failure,
        release=terminal and spec.run_policy.release_nodes == "OnCompletion",
        target=Target(
            name=observed.job.name,
            namespace=observed.job.namespace,
            uid=observed.uid,
            spec=spec,
            settings=settings,
            gpus_per_node=readiness.gpus_per_node,
            attempt=attempt,
            reuse_prepared_data=bool(
                preflight.state == "Passed" and preflight.findings and preflight.findings.prepared_data_kept
            ),
        ),
    )
