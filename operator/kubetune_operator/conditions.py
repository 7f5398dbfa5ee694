"""Condition types and reasons, as constants in one place, the pure helper that sets them, and
:class:`Conditions`, which collects what one pass sets.

Conditions follow the Kubernetes shape: a transition time changes only when the status flips,
and each carries the generation it was computed from.
"""

from __future__ import annotations

import datetime
from typing import Final, Literal

from kubetune_api.objects import now as _now
from kubetune_api.resource import Condition

# Types
VALID: Final = "Valid"
NODES_READY: Final = "NodesReady"
TRAINING: Final = "Training"
COMPLETE: Final = "Complete"
FAILED: Final = "Failed"
SUSPENDED: Final = "Suspended"
SERVING_READY: Final = "ServingReady"
PREFLIGHT_PASSED: Final = "PreflightPassed"
#: Every type the operator sets: a pass starts from the previous conditions of these types only
#: (their transition times carry over), so a condition written into status by hand does not stay.
TYPES: Final = frozenset({PREFLIGHT_PASSED, NODES_READY, TRAINING, COMPLETE, FAILED, SUSPENDED, SERVING_READY})

# Reasons
SPEC_VALID: Final = "SpecValid"
INVALID_SPEC: Final = "InvalidSpec"
PREFLIGHT_RUNNING: Final = "PreflightRunning"
PREFLIGHT_OK: Final = "PreflightPassed"
PREFLIGHT_FAILED: Final = "PreflightFailed"
WOULD_NOT_FIT: Final = "WouldNotFit"
PREFLIGHT_SKIPPED: Final = "PreflightSkipped"
WAITING_FOR_NODES: Final = "WaitingForNodes"
NODE_CLAIM_FAILED: Final = "NodeClaimFailed"
KARPENTER_MISSING: Final = "KarpenterNotInstalled"
NODE_POOL_NOT_READY: Final = "NodePoolNotReady"
NODES_PROVISIONED: Final = "NodesReady"
NODES_RELEASED: Final = "NodesReleased"
QUEUED: Final = "Queued"
STARTING: Final = "PodsStarting"
RUNNING: Final = "Running"
TRAINING_SUCCEEDED: Final = "TrainingSucceeded"
RESTARTING: Final = "RestartingFromCheckpoint"
PERMANENT_FAILURE: Final = "PermanentFailure"
RESTARTS_EXHAUSTED: Final = "RestartsExhausted"
DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
SUSPENDED_BY_USER: Final = "SuspendedByUser"
NOT_SUSPENDED: Final = "NotSuspended"
PUBLISHING: Final = "Publishing"
PUBLISHED: Final = "Published"
PUBLISH_FAILED: Final = "PublishFailed"
SERVING_STARTING: Final = "ServingStarting"
SERVING: Final = "Serving"
SERVING_DISABLED: Final = "ServingDisabled"
SCALED_TO_ZERO: Final = "ScaledToZero"
SERVER_NOT_FOUND: Final = "ModelServerNotFound"
ADAPTER_LOADING: Final = "AdapterLoading"
ADAPTER_REFUSED: Final = "AdapterRefused"

Status = Literal["True", "False", "Unknown"]


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: Status,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime.datetime | None = None,
) -> list[Condition]:
    """A new list with ``kind`` set; the transition time is kept when the status did not change."""
    previous = next((c for c in conditions if c.type == kind), None)
    changed = previous is None or previous.status != status
    condition = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=(now or _now()) if changed or previous is None else previous.last_transition_time,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != kind), condition]


def get(conditions: list[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


class Conditions:
    """The conditions of one job as a pass sets them, each :meth:`set` through :func:`set_condition`."""

    def __init__(self, items: list[Condition], *, generation: int | None, now: datetime.datetime) -> None:
        self.items = list(items)
        self._generation = generation
        self._now = now

    def set(self, kind: str, status: Status, reason: str, message: str) -> None:
        self.items = set_condition(
            self.items, kind, status, reason, message, generation=self._generation, now=self._now
        )

    def get(self, kind: str) -> Condition | None:
        return get(self.items, kind)

    def has(self, kind: str) -> bool:
        return self.get(kind) is not None
