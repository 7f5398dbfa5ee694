"""The two kinds of failure a trainer-image command reports, and how each one leaves the process.

A permanent failure (a bad config, bad data, a combination this machine cannot run) fails the
same way on every retry, so ``kubetune train`` exits 2 and the operator's pod failure policy fails
the job at once instead of spending restarts on it. Anything else (a lost node, a network error,
out of memory) exits 1 and the gang restarts from its last checkpoint. Either way the reason is
written, as one paragraph, where the pod's termination message is read from. ``kubetune publish``,
``pull`` and ``fetch-model`` exit the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from kubetune_api.problems import Problem

EXIT_OK: Final = 0
#: A failure that may pass on a retry: the operator restarts the gang from the last checkpoint.
EXIT_RETRYABLE: Final = 1
#: A failure that will not pass on a retry (bad config or data): the operator fails the job.
EXIT_PERMANENT: Final = 2

#: Env var naming the file whose content Kubernetes shows as the container's termination message.
TERMINATION_MESSAGE_ENV: Final = "KUBETUNE_TERMINATION_MESSAGE_PATH"
#: Kubernetes keeps at most 4096 bytes of a termination message.
_TERMINATION_MESSAGE_LIMIT: Final = 4000


class PermanentError(Exception):
    """A problem that retrying cannot fix; ``problems`` lists every one found, each naming its field."""

    def __init__(self, problems: Iterable[Problem], *, summary: str = "the training job cannot run") -> None:
        self.problems = list(problems)
        self.summary = summary
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{summary} ({count} problem{'s' if count != 1 else ''}):\n{lines}")

    @classmethod
    def one(cls, field: str, message: str, *, summary: str = "the training job cannot run") -> PermanentError:
        """A permanent error with a single problem."""
        return cls([Problem(field, message)], summary=summary)

    def paragraph(self) -> str:
        """The reason on one line, for a termination message."""
        return f"{self.summary}: " + "; ".join(str(p) for p in self.problems)


class ProblemList:
    """Collects problems so that validation reports every one at once, then raises them together."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, field: str, message: str) -> None:
        """Record one problem with ``field`` (dotted, as in the manifest) and what to do about it."""
        self.problems.append(Problem(field, message))

    def extend(self, problems: Iterable[Problem]) -> None:
        """Record several problems."""
        self.problems.extend(problems)

    def raise_if_any(self, summary: str) -> None:
        """Raise a :class:`PermanentError` with every recorded problem, if there is one."""
        if self.problems:
            raise PermanentError(self.problems, summary=summary)


def one_paragraph(text: str) -> str:
    """``text`` folded to a single paragraph that fits in a termination message."""
    folded = " ".join(text.split())
    return folded if len(folded) <= _TERMINATION_MESSAGE_LIMIT else folded[: _TERMINATION_MESSAGE_LIMIT - 1] + "…"


def write_termination_message(text: str, *, path: str | None = None) -> None:
    """Write ``text`` as one paragraph to the termination-message file, when one is named.

    ``path`` defaults to ``$KUBETUNE_TERMINATION_MESSAGE_PATH``; nothing is written when neither is
    set (a workstation run). A write error is ignored: the reason is in the log as well.
    """
    target = path or os.environ.get(TERMINATION_MESSAGE_ENV)
    if not target:
        return
    with contextlib.suppress(OSError):
        Path(target).write_text(one_paragraph(text) + "\n", encoding="utf-8")
