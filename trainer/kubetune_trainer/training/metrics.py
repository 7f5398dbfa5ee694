"""Training progress as Prometheus gauges on rank 0, and as readable log lines.

Trainer pods have no API access: the operator learns how a job is doing by scraping rank 0's
``/metrics`` and mirrors it into ``status.progress``. The gauge names are a contract with the
operator (``kubetune_operator`` reads exactly these), so they are constants here and tested.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger("kubetune.train")

#: Gauge name → help text. The operator reads these names; change them only together with it.
GAUGES: Final[dict[str, str]] = {
    "kubetune_train_step": "Optimizer steps done.",
    "kubetune_train_total_steps": "Optimizer steps the run will take.",
    "kubetune_train_epoch": "Epochs done (fractional).",
    "kubetune_train_loss": "Training loss, averaged since the previous log line.",
    "kubetune_train_eval_loss": "Loss on the held-out data at the last evaluation.",
    "kubetune_train_learning_rate": "Learning rate at the last log line.",
    "kubetune_train_grad_norm": "Gradient norm before clipping at the last log line.",
    "kubetune_train_tokens_per_second": "Tokens (not padding) trained on per second, all processes together.",
    "kubetune_train_samples_per_second": "Examples trained on per second, all processes together.",
    "kubetune_train_peak_memory_bytes": "Peak accelerator memory of rank 0 (peak resident memory on a CPU).",
    "kubetune_train_eta_seconds": "Estimated seconds until the last step.",
}


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA's max allocated bytes, or the peak resident set on a CPU."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingMetrics:
    """The gauges, served over HTTP by rank 0 while training runs."""

    def __init__(self) -> None:
        # A registry of our own: no process collectors, and a second run in one process starts clean.
        self.registry = CollectorRegistry(auto_describe=True)
        self.gauges = {name: Gauge(name, text, registry=self.registry) for name, text in GAUGES.items()}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def set(self, name: str, value: float) -> None:
        """Set one gauge; NaN and infinities are skipped (Prometheus takes them, dashboards do not)."""
        if math.isfinite(value):
            self.gauges[name].set(value)

    def serve(self, port: int, *, address: str = "0.0.0.0") -> bool:  # noqa: S104 - scraped from other pods
        """Serve ``/metrics`` on ``address:port``; False (and a warning) when the port is taken."""
        try:
            self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            log.warning(
                "metrics: cannot listen on %s:%d (%s); training goes on without the endpoint", address, port, exc
            )
            return False
        log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", address, port)
        return True

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class Throughput:
    """Tokens and examples counted since the last log line, and when it was."""

    tokens: int = 0
    examples: int = 0
    since: float = field(default_factory=time.monotonic)
    step_times: list[float] = field(default_factory=list)

    def rates(self) -> tuple[float, float]:
        """Tokens/s and examples/s since the last reset."""
        elapsed = max(time.monotonic() - self.since, 1e-9)
        return self.tokens / elapsed, self.examples / elapsed

    def reset(self) -> None:
        """Start a new window."""
        self.tokens = self.examples = 0
        self.since = time.monotonic()


def progress_line(step: int, total: int, logs: dict[str, float], tokens_per_s: float, eta_s: float) -> str:
    """A log line a person can read: ``step 40/150 (27%) loss 1.234 lr 3.0e-03 …``."""
    parts = [f"step {step}/{total} ({step / max(total, 1):.0%})"]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if "eval_loss" in logs:
        parts.append(f"eval_loss {logs['eval_loss']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad_norm {logs['grad_norm']:.3f}")
    if tokens_per_s:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    if math.isfinite(eta_s) and eta_s > 0:
        parts.append(f"eta {_duration(eta_s)}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def is_tty() -> bool:
    """Whether standard error is a terminal (progress bars only there; logs are for files and pods)."""
    return sys.stderr.isatty()
