"""The data of a job, from its source folder or file to training and evaluation rows for the Trainer.

:func:`prepare` reads the split, detects and checks the format, tokenizes and truncates, holds out
the validation examples (a seeded fraction, or a named split) and, with packing, packs the rows;
:func:`describe` is the log line about the result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_api import DatasetSpec
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.training.data.formats import Tokenizer, check_records, detect_format
from kubetune_trainer.training.data.load import read_split
from kubetune_trainer.training.data.tokenize import IGNORE_INDEX, DataStats, Example, pack, tokenize, truncate

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class TokenizedData:
    """Training and evaluation rows ready for the Trainer, and how they came about."""

    train: Dataset
    eval: Dataset | None
    stats: DataStats = field(default_factory=DataStats)


def _to_dataset(examples: Sequence[Example], *, packing: bool, max_length: int) -> Dataset:
    from datasets import Dataset  # noqa: PLC0415

    if packing:
        rows = pack(examples, max_length)
        return Dataset.from_dict(
            {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids", "num_examples")}
        )
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "num_examples": [1] * len(examples),
        }
    )


def prepare(path: Path, tokenizer: Tokenizer, spec: DatasetSpec, *, seed: int) -> TokenizedData:
    """Read, check, tokenize, truncate, split and (optionally) pack the dataset at ``path``."""
    stats = DataStats()
    records = read_split(path, spec.split)
    fmt = detect_format(records, spec.format)
    check_records(records, fmt)
    stats.format, stats.records = fmt, len(records)
    examples = truncate(
        tokenize(records, fmt, tokenizer, completion_only=spec.completion_only_loss), spec.max_seq_length, stats
    )

    eval_examples: list[Example] = []
    validation = spec.validation
    if validation is not None and validation.fraction is not None:
        count = max(1, round(len(examples) * validation.fraction))
        if len(examples) - count < 1:
            raise PermanentError.one(
                "spec.dataset.validation.fraction",
                f"holding out {validation.fraction} of {len(examples)} examples leaves none to train on; add data or lower the fraction",
                summary="the dataset is too small",
            )
        shuffled = list(range(len(examples)))
        random.Random(seed).shuffle(shuffled)  # noqa: S311 - a reproducible split, not a secret
        held = set(shuffled[:count])
        eval_examples = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    elif validation is not None and validation.split is not None:
        eval_records = read_split(path, validation.split)
        eval_fmt = detect_format(eval_records, fmt)
        check_records(eval_records, eval_fmt)
        eval_stats = DataStats()
        eval_examples = truncate(
            tokenize(eval_records, eval_fmt, tokenizer, completion_only=spec.completion_only_loss),
            spec.max_seq_length,
            eval_stats,
        )

    lengths = [len(e.input_ids) for e in examples]
    stats.train_examples, stats.eval_examples = len(examples), len(eval_examples)
    stats.train_tokens = sum(lengths)
    stats.train_loss_tokens = sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)
    stats.max_length = max(lengths)
    stats.mean_length = round(stats.train_tokens / len(lengths), 2)
    train = _to_dataset(examples, packing=spec.packing, max_length=spec.max_seq_length)
    stats.train_rows = len(train)
    if spec.packing:
        stats.packing_efficiency = round(stats.train_tokens / (len(train) * spec.max_seq_length), 4)
    evaluation = (
        _to_dataset(eval_examples, packing=spec.packing, max_length=spec.max_seq_length) if eval_examples else None
    )
    return TokenizedData(train=train, eval=evaluation, stats=stats)


def describe(stats: DataStats, *, max_seq_length: int, packing: bool) -> str:
    """One readable log line about the data."""
    line = (
        f"data: {stats.records} {stats.format} records → {stats.train_examples} train / {stats.eval_examples} eval examples; "
        f"{stats.train_tokens:,} tokens ({stats.train_loss_tokens:,} with loss), mean {stats.mean_length:g}, "
        f"max {stats.max_length} of maxSeqLength {max_seq_length}; truncated {stats.truncated}, dropped {stats.dropped}"
    )
    if packing:
        line += f"; packed into {stats.train_rows} rows ({stats.packing_efficiency:.0%} full)"
    return line
