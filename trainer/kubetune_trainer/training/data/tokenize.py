"""Records to token ids and labels (rendered by :mod:`.formats`), truncated to ``maxSeqLength``, and packed.

:class:`DataStats` is what the data turned into: truncation counts here, the pipeline the rest.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from kubetune_trainer.errors import PermanentError, ProblemList
from kubetune_trainer.training.data.formats import Format, Segments, Tokenizer, render
from kubetune_trainer.training.data.load import SOURCE_FIELD, Record

#: The label of a token the loss is not taken on (what torch's cross-entropy ignores).
IGNORE_INDEX: Final = -100


@dataclass
class DataStats:
    """What the data turned into; logged and written to the summary."""

    format: str = ""
    """The format used (detected when ``format: auto``)."""
    records: int = 0
    """Records read for training (before the validation split)."""
    train_examples: int = 0
    """Examples trained on (after truncation, drops and the split)."""
    eval_examples: int = 0
    """Examples held out for evaluation."""
    truncated: int = 0
    """Examples cut to maxSeqLength."""
    dropped: int = 0
    """Examples left with no token to learn from after truncation, and dropped."""
    train_tokens: int = 0
    """Tokens in the training examples (one epoch)."""
    train_loss_tokens: int = 0
    """Tokens the loss is taken on (one epoch)."""
    max_length: int = 0
    """Longest example, in tokens, after truncation."""
    mean_length: float = 0.0
    """Mean example length, in tokens."""
    train_rows: int = 0
    """Training sequences after packing (the examples when packing is off)."""
    packing_efficiency: float = 1.0
    """Share of the packed rows' maxSeqLength slots holding real tokens (1 without packing)."""

    def as_dict(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Example:
    """One tokenized example."""

    input_ids: list[int]
    labels: list[int]


def tokenize(records: Sequence[Record], fmt: Format, tokenizer: Tokenizer, *, completion_only: bool) -> list[Example]:
    """Every record as token ids and labels (not yet truncated)."""
    chat = fmt == "messages" or (fmt == "instruction" and bool(tokenizer.chat_template))
    if fmt == "messages" and not tokenizer.chat_template:
        raise PermanentError.one(
            "spec.dataset.chatTemplate",
            "messages data needs a chat template and the tokenizer has none; set dataset.chatTemplate to a Jinja template",
            summary="the dataset cannot be tokenized",
        )
    rendered: list[tuple[Segments, bool]] = []
    problems = ProblemList()
    for index, record in enumerate(records):
        try:
            rendered.append(render(record, fmt, tokenizer, completion_only=completion_only, chat=chat))
        except ValueError:
            problems.add(
                "spec.dataset.chatTemplate",
                "the chat template renders a conversation differently when it is extended, so the assistant turns "
                "cannot be located; use another template or set dataset.completionOnlyLoss: false",
            )
            break
        except Exception as exc:
            problems.add(SOURCE_FIELD, f"example {index + 1}: the chat template cannot render it ({exc})")
            break
    problems.raise_if_any("the dataset cannot be tokenized")

    texts = [text for segments, _ in rendered for text, _ in segments]
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples: list[Example] = []
    position = 0
    for segments, add_special in rendered:
        input_ids: list[int] = list(bos) if add_special else []
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        learned_last = False
        for _, learned in segments:
            piece = ids[position]
            position += 1
            input_ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
            learned_last = learned
        if add_special and eos:
            input_ids += eos
            labels += eos if learned_last else [IGNORE_INDEX]
        examples.append(Example(input_ids, labels))
    return examples


def truncate(examples: Iterable[Example], max_length: int, stats: DataStats) -> list[Example]:
    """Examples cut to ``max_length``; those left with nothing to learn are dropped. Counts go to ``stats``."""
    kept: list[Example] = []
    total = 0
    for original in examples:
        total += 1
        example = original
        if len(original.input_ids) > max_length:
            stats.truncated += 1
            example = Example(original.input_ids[:max_length], original.labels[:max_length])
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            stats.dropped += 1
            continue
        kept.append(example)
    if total and stats.truncated == total:
        raise PermanentError.one(
            "spec.dataset.maxSeqLength",
            f"every one of the {total} examples is longer than maxSeqLength ({max_length} tokens); "
            "raise dataset.maxSeqLength or shorten the examples",
            summary="the dataset does not fit the sequence length",
        )
    if not kept:
        raise PermanentError.one(
            "spec.dataset.maxSeqLength",
            f"no example keeps a completion token within maxSeqLength ({max_length}); raise dataset.maxSeqLength or shorten the prompts",
            summary="the dataset does not fit the sequence length",
        )
    return kept


def pack(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int] | int]]:
    """Examples placed whole into rows of at most ``max_length`` tokens (best fit, longest first).

    Each row carries ``position_ids`` that restart at every example, and the first token of each
    example has no label, so no example learns to predict the one packed before it.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        length = len(examples[index].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (room - length, row))
        else:
            rows.append([index])
            bisect.insort(free, (max_length - length, len(rows) - 1))
    packed: list[dict[str, list[int] | int]] = []
    for members in rows:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in sorted(members):
            example = examples[index]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX, *example.labels[1:]]
            positions += range(len(example.input_ids))
        packed.append(
            {"input_ids": input_ids, "labels": labels, "position_ids": positions, "num_examples": len(members)}
        )
    return packed
