"""``kubetune plan FILE``: print the memory plan of a FineTuneJob (or TrainerConfig) before running it.

The arithmetic is in :mod:`kubetune_api.plan` (torch-free, shared with the operator);
this module finds the model's ``config.json`` and prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune_api import ALLOW_LOCAL_PATHS, FineTuneJobSpec, parse_uri, problems_of
from kubetune_api.instances import instance_shape
from kubetune_api.plan import plan_job
from kubetune_api.uris import MODEL_SCHEMES
from kubetune_trainer.errors import EXIT_PERMANENT


def _spec(document: dict[str, Any]) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(document.get("spec"), context={ALLOW_LOCAL_PATHS: True})


def _model_config(spec: FineTuneJobSpec, explicit: str | None) -> dict[str, Any]:
    if explicit:
        path = Path(explicit)
    else:
        source = parse_uri(spec.model.source, (*MODEL_SCHEMES, "file"))
        if source.scheme != "file":
            raise ValueError(
                f"the model source {spec.model.source} is not a local folder; pass --model-config CONFIG_JSON"
            )
        path = Path("/" + source.location.lstrip("/")) / "config.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def main(args: argparse.Namespace) -> int:
    """Run ``kubetune plan``; 0 when the job fits, 1 when it does not, 2 on bad input."""
    try:
        document = yaml.safe_load(Path(args.file).read_text(encoding="utf-8"))
        spec = _spec(document if isinstance(document, dict) else {})
        model_config = _model_config(spec, args.model_config)
    except ValidationError as exc:
        for problem in problems_of(exc, root="spec"):
            print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_PERMANENT
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
        print(f"kubetune plan: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    shape = instance_shape(spec.resources.instance_type)
    known = shape.gpu_memory_gib if shape is not None and shape.gpus else None
    device_gib = args.gpu_memory or spec.resources.gpu_memory_gib or known or 80.0
    gpus = shape.gpus if shape is not None and shape.gpus else None
    result = plan_job(spec, model_config, device_gib=device_gib, gpus_per_node=gpus)
    print(result.describe())
    return 0 if result.fits else 1
