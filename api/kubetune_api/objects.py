"""Kubernetes objects as the API returns them (plain dicts), and the API's timestamp format."""

from __future__ import annotations

import datetime
from typing import Any, Final

Obj = dict[str, Any]
"""A Kubernetes object, or a part of one, as JSON decodes it."""

#: RFC 3339 in UTC with whole seconds, as the apiserver writes metav1.Time.
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


def now() -> datetime.datetime:
    """The current time in UTC, to the second (the precision of metav1.Time)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def format_time(moment: datetime.datetime | None = None) -> str:
    """``moment`` (default: now) as metav1.Time writes it."""
    return (moment or now()).astimezone(datetime.UTC).strftime(TIME_FORMAT)


def parse_time(value: str | None) -> datetime.datetime | None:
    """A metav1.Time string as an aware datetime; None for None or an empty string."""
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
