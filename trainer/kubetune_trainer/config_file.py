"""Read the one file ``kubetune train`` is given: a rendered TrainerConfig or a FineTuneJob manifest.

In a pod the operator renders a TrainerConfig (the spec plus where each volume is mounted). On a
workstation a user points the same command at the FineTuneJob they would apply, with local paths
as sources and ``--output DIR`` for the results. Both are validated here, with every problem listed
at once, before anything heavy is imported. This module is torch-free: it validates the
manifest's ``spec`` with the models of :mod:`kubetune_api`, as the operator does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from kubetune_api import ALLOW_LOCAL_PATHS, FineTuneJobSpec, Mounts, TrainerConfig, problems_of
from kubetune_api.problems import Problem
from kubetune_api.trainer_config import TRAINER_CONFIG_KIND, TRAINER_CONFIG_VERSION
from kubetune_trainer.errors import PermanentError

FINETUNEJOB_KIND: Final = "FineTuneJob"
_CONTEXT: Final = {ALLOW_LOCAL_PATHS: True}


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PermanentError.one(
            "--config", f"{path} does not exist; pass the TrainerConfig or FineTuneJob file"
        ) from None
    except UnicodeDecodeError as exc:
        raise PermanentError.one("--config", f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise PermanentError.one("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PermanentError.one("--config", f"{path} is neither JSON nor YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(document, dict):
        raise PermanentError.one(
            "--config", f"{path} holds {type(document).__name__}, not a TrainerConfig or FineTuneJob object"
        )
    return document


def load_config(
    path: Path,
    *,
    output: Path | None = None,
    metrics_port: int | None = None,
) -> TrainerConfig:
    """The validated :class:`TrainerConfig` in ``path``; a FineTuneJob manifest is turned into one.

    ``output`` overrides (TrainerConfig) or sets (FineTuneJob, where it is required) the folder for
    checkpoints, the adapter and the summary; ``metrics_port`` overrides the metrics port.
    Raises :class:`PermanentError` listing every problem found.
    """
    document = _read(path)
    kind = document.get("kind")
    if kind == TRAINER_CONFIG_KIND:
        config = _trainer_config(document, source=str(path))
        mounts = config.mounts
        if output is not None:
            mounts = mounts.model_copy(update={"output": str(output.resolve())})
        updates: dict[str, Any] = {"mounts": mounts}
    elif kind == FINETUNEJOB_KIND:
        config = _from_finetunejob(document, source=str(path), output=output)
        updates = {}
    else:
        raise PermanentError.one(
            "kind",
            f"{path} has kind {kind!r}; kubetune train reads kind {TRAINER_CONFIG_KIND} (rendered by the operator) "
            f"or kind {FINETUNEJOB_KIND} (a manifest with local paths, with --output DIR)",
        )
    if metrics_port is not None:
        if not 1024 <= metrics_port <= 65535:  # the TrainerConfig's own bounds
            raise PermanentError.one("--metrics-port", f"{metrics_port} is not a port between 1024 and 65535")
        updates["metrics_port"] = metrics_port
    return config.model_copy(update=updates)


def _trainer_config(document: dict[str, Any], *, source: str) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate(document, context=_CONTEXT)
    except ValidationError as exc:
        raise PermanentError(problems_of(exc), summary=f"{source} is not a valid TrainerConfig") from None


def _from_finetunejob(document: dict[str, Any], *, source: str, output: Path | None) -> TrainerConfig:
    problems: list[Problem] = []
    if document.get("apiVersion") != TRAINER_CONFIG_VERSION:
        problems.append(
            Problem("apiVersion", f"expected {TRAINER_CONFIG_VERSION}, found {document.get('apiVersion')!r}")
        )
    metadata = document.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        problems.append(Problem("metadata.name", "required field is missing"))
    namespace = metadata.get("namespace", "default") if isinstance(metadata, dict) else "default"
    if output is None:
        problems.append(
            Problem(
                "--output", "a FineTuneJob manifest needs --output DIR: the folder for checkpoints, adapter and summary"
            )
        )
    spec: FineTuneJobSpec | None = None
    try:
        spec = FineTuneJobSpec.model_validate(document.get("spec"), context=_CONTEXT)
    except ValidationError as exc:
        problems.extend(problems_of(exc, root="spec"))
    if problems or spec is None or output is None:
        raise PermanentError(problems, summary=f"{source} cannot be trained")
    return TrainerConfig(
        job_name=str(name)[:63],
        namespace=str(namespace)[:63],
        spec=spec,
        mounts=Mounts(output=str(output.resolve())),
    )


def render(config: TrainerConfig) -> str:
    """``config`` as the JSON the operator writes to the pod (camelCase, defaults included)."""
    return json.dumps(config.model_dump(mode="json", by_alias=True), indent=2) + "\n"
