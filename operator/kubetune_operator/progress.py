"""Read training progress from the rank-0 trainer's Prometheus endpoint into status.progress.

The trainer publishes; the operator observes. Trainer pods need no API access: the operator
scrapes ``http://<rank-0 pod IP>:<port>/metrics`` (throttled by the caller) and maps the gauges.
"""

from __future__ import annotations

import logging
import math
import urllib.error
import urllib.request
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

from kubetune_api.resource import Progress

log = logging.getLogger("kubetune.progress")

#: Trainer gauge → Progress field.
GAUGES: Final = {
    "kubetune_train_step": "step",
    "kubetune_train_total_steps": "total_steps",
    "kubetune_train_epoch": "epoch",
    "kubetune_train_loss": "loss",
    "kubetune_train_eval_loss": "eval_loss",
    "kubetune_train_learning_rate": "learning_rate",
    "kubetune_train_tokens_per_second": "tokens_per_second",
    "kubetune_train_eta_seconds": "eta_seconds",
}
_INTEGERS: Final = frozenset({"step", "total_steps", "eta_seconds"})


def parse(text: str) -> Progress | None:
    """Progress from a metrics page; None when it has no training gauges yet."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = GAUGES.get(family.name)
        if field is not None and family.samples:
            values[field] = float(family.samples[0].value)
    if "step" not in values:
        return None
    fields: dict[str, float | int] = {
        k: (int(v) if k in _INTEGERS else v) for k, v in values.items() if not math.isnan(v)
    }
    total = values.get("total_steps")
    if total:
        fields["percent"] = max(0, min(100, int(100 * values["step"] / total)))
    return Progress.model_validate(fields)


def scrape(pod_ip: str, port: int, *, timeout: float = 2.0) -> Progress | None:
    """Read the rank-0 trainer's progress; None when it does not answer (yet)."""
    url = f"http://{pod_ip}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.debug("no progress from %s: %s", url, exc)
        return None
