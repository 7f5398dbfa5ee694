"""Turn pydantic's validation errors into one line per problem, each naming its field.

Users read these in ``kubectl`` output, in ``kubetune validate`` and in the trainer's log, so a
line says where (``spec.method.lora.r``), what is wrong, and where it helps, what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest."""

    field: str
    """Dotted path of the field, for example ``spec.method.lora.r`` or ``spec.resources.tolerations[0]``."""
    message: str
    """What is wrong and, where possible, how to fix it."""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(base: str, field: str) -> str:
    return f"{base}.{field}" if base else field


def problems_of(error: ValidationError, *, root: str = "") -> list[Problem]:
    """Every problem in ``error``, with field paths prefixed by ``root`` (for example ``spec``)."""
    found: list[Problem] = []
    for detail in error.errors(include_url=False):
        where = _join(root, _path(tuple(detail["loc"]))) if detail["loc"] else root or "(manifest)"
        kind = detail["type"]
        ctx = detail.get("ctx") or {}
        if kind == "cross_field":
            found.extend(Problem(_join(where, field), message) for field, message in ctx["problems"])
        elif kind == "extra_forbidden":
            found.append(
                Problem(where, "unknown field; check its spelling and place (kubectl explain finetunejob.spec)")
            )
        elif kind == "missing":
            found.append(Problem(where, "required field is missing"))
        else:
            found.append(Problem(where, str(detail["msg"]).removeprefix("Value error, ")))
    return found


class InvalidManifestError(ValueError):
    """A manifest that the models refuse; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[Problem], *, source: str = "manifest") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}")
