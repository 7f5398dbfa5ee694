"""``kubetune preflight``: everything that can fail a job, checked on a CPU before any GPU node is paid for.

The operator runs it as a small Job (no GPU, no service-account token, the trainer image) before
it provisions nodes. It runs the same stages as :func:`~.prepare.prepare_run`, with the same
messages: the config's combinations, the sources (located, then fetched; a hub model without its
weight files, whose presence is checked from the repository's listing), the model's layout
against the method's target modules, the tokenizer, and the whole dataset read, detected,
templated, tokenized, truncated and split exactly as training will. With ``--keep`` the
tokenized data stays on the job's volume for training to reuse.

It ends with one JSON line (stdout and the termination message) that the operator records:
the data's figures and the part of the model's ``config.json`` that the memory planner reads;
the operator plans the memory for the job's devices (:mod:`kubetune_api.plan`). Exit codes are
the trainer's: 0 checked, 2 a permanent problem (its message is the one training would give),
1 anything a retry may fix (a source that did not answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Final

from kubetune_api import TrainerConfig
from kubetune_api.plan import ModelShape
from kubetune_trainer.config_file import load_config
from kubetune_trainer.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PermanentError,
    ProblemList,
    write_termination_message,
)
from kubetune_trainer.fetch import HubSource, hub_files
from kubetune_trainer.process import setup_logging
from kubetune_trainer.training.data.tokenize import DataStats
from kubetune_trainer.training.prepare import (
    fetch_sources,
    keep_data,
    locate_sources,
    log_combination,
    tokenize_into,
)

log = logging.getLogger("kubetune.preflight")

#: The keys of a model's config.json that the memory planner reads (ModelShape.from_config).
PLANNER_KEYS: Final = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def planner_config(model_dir: Path) -> dict[str, Any] | None:
    """The planner's part of the model's config.json, or ``None`` when it does not describe a decoder it can plan."""
    try:
        loaded: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        text = loaded.get("text_config", loaded)
        subset = {key: text[key] for key in PLANNER_KEYS if key in text}
        if "tie_word_embeddings" in loaded:
            subset["tie_word_embeddings"] = bool(loaded["tie_word_embeddings"])
        ModelShape.from_config(subset)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return subset


def check(config: TrainerConfig, *, keep: bool) -> dict[str, Any]:
    """Run every check; the findings as a JSON-ready dict. Raises PermanentError on a problem training would meet."""
    from kubetune_trainer.training.model import check_model, weights_problem_in  # noqa: PLC0415 - imports transformers

    spec = config.spec
    problems = ProblemList()
    log_combination(config, cuda=False)
    located = locate_sources(config, problems)
    model_at = located["model"]
    weights_checked = False
    if isinstance(model_at, HubSource):
        # Only the config and tokenizer are fetched; the weights are checked from the listing.
        weights = weights_problem_in(hub_files(model_at), f"hf://{model_at.repo_id}")
        if weights:
            problems.add("spec.model.source", weights)
            problems.raise_if_any("the model does not fit the spec")
        weights_checked = True
    fetched = fetch_sources(config, located, problems, weights=False)
    model_dir = fetched["model"]
    check_model(model_dir, spec, problems, weights_checked=weights_checked)
    problems.raise_if_any("the model does not fit the spec")
    stats: DataStats
    if keep:
        folder, stats = keep_data(config, model_dir, fetched["dataset"])
        log.info("the tokenized data stays in %s for training", folder)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="kubetune-preflight-"))
        try:
            stats = tokenize_into(config, model_dir, fetched["dataset"], scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    shape = planner_config(model_dir)
    if shape is None:
        log.info("the model's config.json does not describe a decoder the memory planner knows; memory is not planned")
    return {
        "format": stats.format,
        "records": stats.records,
        "trainExamples": stats.train_examples,
        "evalExamples": stats.eval_examples,
        "tokens": stats.train_tokens,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "kept": keep,
        "modelConfig": shape,
    }


def main(args: argparse.Namespace) -> int:
    """Run ``kubetune preflight``; return its exit code."""
    setup_logging()
    started = time.monotonic()
    try:
        config = load_config(Path(args.config), output=Path(args.output) if args.output else None)
        findings = check(config, keep=args.keep)
    except PermanentError as exc:
        log.error("%s", exc)
        write_termination_message(exc.paragraph())
        return EXIT_PERMANENT
    except Exception as exc:  # a source that did not answer, say: worth a retry, with its reason recorded
        log.error("pre-flight failed: %s", "".join(traceback.format_exception(exc)).rstrip())
        write_termination_message(f"pre-flight failed ({type(exc).__name__}): {exc}")
        return EXIT_RETRYABLE
    line = json.dumps(findings, separators=(",", ":"), sort_keys=True)
    log.info("pre-flight passed in %.1f s", time.monotonic() - started)
    print(line, flush=True)
    write_termination_message(line)
    return EXIT_OK
