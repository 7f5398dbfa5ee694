"""What a reconcile pass decided: the Decision the controller carries out, with the Events it records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubetune_api.objects import Obj
from kubetune_api.resource import FineTuneJobStatus

Deletion = tuple[str, str, str | None, str]
"""(apiVersion, kind, namespace, name) of an object to delete."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    """What the caller must do."""

    status: FineTuneJobStatus
    create: list[Obj] = field(default_factory=list)
    """Objects created once and never re-applied (Jobs: their template is immutable; Kueue owns suspend)."""
    apply: list[Obj] = field(default_factory=list)
    """Objects applied server-side on every pass (idempotent)."""
    delete: list[Deletion] = field(default_factory=list)
    """(apiVersion, kind, namespace, name) to delete."""
    patch: list[tuple[Obj, Obj]] = field(default_factory=list)
    """(object, merge patch) pairs, for fields the operator toggles (a Job's suspend)."""
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    scrape_progress: bool = False
    """Whether the caller should read the rank-0 metrics before the next pass."""
