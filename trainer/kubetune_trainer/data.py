"""From a dataset source to token sequences with labels: read, detect the format, template, tokenize, pack, split.

Data problems are the most common reason a job fails, and they fail the same way on every retry,
so this module reads every record itself (rather than through ``datasets``' loaders, whose errors
name neither the file nor the line), reports the first few problems of each kind at once as a
:class:`~kubetune_trainer.errors.PermanentError`, and runs before any model is loaded.

Formats, detected from the columns when ``format: auto``:

- ``messages``: a chat, rendered with the tokenizer's chat template (or ``dataset.chatTemplate``);
  the loss is on the assistant turns.
- ``instruction``: ``instruction``, optional ``input``, ``output``; rendered as a user/assistant
  chat when there is a template, otherwise as an Alpaca-style prompt; the loss is on ``output``.
- ``prompt-completion``: raw text; the loss is on ``completion``.
- ``text``: raw text; the loss is on everything.

Every example becomes ``input_ids`` and ``labels`` (``-100`` where no loss is taken). With packing,
examples are placed whole into rows of at most ``maxSeqLength`` tokens (best fit, longest first);
``position_ids`` restart at each example, which is how transformers' attention keeps the packed
examples from seeing each other.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from kubetune_api import DatasetSpec
from kubetune_trainer.errors import PermanentError, ProblemList

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

Format = Literal["messages", "instruction", "prompt-completion", "text"]
Record = dict[str, Any]

IGNORE_INDEX: Final = -100
DATA_SUFFIXES: Final = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
#: How many problems of one kind are listed before "… and N more".
_SHOWN: Final = 5
_ROLES: Final = ("system", "user", "assistant", "tool")
_SOURCE: Final = "spec.dataset.source"
_ALPACA_WITH_INPUT: Final = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA: Final = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: The columns that identify each format, in the order ``auto`` tries them.
FORMAT_COLUMNS: Final[dict[Format, tuple[str, ...]]] = {
    "messages": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}


class Tokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> Any: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


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


@dataclass
class TokenizedData:
    """Training and evaluation rows ready for the Trainer, and how they came about."""

    train: Dataset
    eval: Dataset | None
    stats: DataStats = field(default_factory=DataStats)


# ------------------------------------------------------------------------------------- reading


def _line_of(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError.one(
            _SOURCE,
            f"{path.name} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
            f"line {_line_of(raw, exc.start)}); convert the file to UTF-8",
            summary="the dataset cannot be read",
        ) from None
    if not text.strip():
        raise PermanentError.one(
            _SOURCE, f"{path.name} is empty: it holds no examples", summary="the dataset cannot be read"
        )
    return text.removeprefix("\ufeff")


def _more(problems: ProblemList, count: int, what: str) -> None:
    if count > _SHOWN:
        problems.add(_SOURCE, f"… and {count - _SHOWN} more {what}")


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad += 1
            if bad <= _SHOWN:
                problems.add(
                    _SOURCE,
                    f"{path.name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line",
                )
            continue
        if not isinstance(value, dict):
            bad += 1
            if bad <= _SHOWN:
                problems.add(
                    _SOURCE,
                    f"{path.name} line {number} is a JSON {type(value).__name__}, not an object; each line must be one example object",
                )
            continue
        records.append(value)
    _more(problems, bad, "bad lines")
    problems.raise_if_any("the dataset cannot be read")
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.lineno > 1 and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON lines saved as .json
        raise PermanentError.one(
            _SOURCE,
            f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            summary="the dataset cannot be read",
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else [value]  # {"data": [...]} or a single example
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PermanentError.one(
            _SOURCE, f"{path.name} must hold a JSON list of example objects", summary="the dataset cannot be read"
        )
    return value


def _read_csv(path: Path, text: str) -> list[Record]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or any(not name for name in reader.fieldnames):
        raise PermanentError.one(
            _SOURCE, f"{path.name} has no header row naming its columns", summary="the dataset cannot be read"
        )
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            bad += 1
            if bad <= _SHOWN:
                problems.add(
                    _SOURCE,
                    f"{path.name} line {reader.line_num} has {'more' if None in row else 'fewer'} fields than the header ({len(reader.fieldnames)})",
                )
            continue
        records.append(dict(row))
    _more(problems, bad, "bad rows")
    problems.raise_if_any("the dataset cannot be read")
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet sources need it

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise PermanentError.one(
            _SOURCE, f"{path.name} is not a readable Parquet file ({exc})", summary="the dataset cannot be read"
        ) from None
    records: list[Record] = table.to_pylist()
    return records


def read_file(path: Path) -> list[Record]:
    """The records of one JSONL, JSON, CSV or Parquet file (chosen by suffix, else by content)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.read_bytes()[:4] == b"PAR1":
        records = _read_parquet(path)
    else:
        text = _decode(path)
        if suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(path, text)
        elif suffix == ".json":
            records = _read_json(path, text)
        elif suffix == ".csv":
            records = _read_csv(path, text)
        elif text.lstrip().startswith(("{", "[")):
            records = _read_json(path, text)
        else:
            raise PermanentError.one(
                _SOURCE,
                f"cannot tell the file type of {path.name}; use a .jsonl, .json, .csv or .parquet file",
                summary="the dataset cannot be read",
            )
    if not records:
        raise PermanentError.one(_SOURCE, f"{path.name} holds no examples", summary="the dataset cannot be read")
    return records


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")
    )
    named = [
        p
        for p in files
        if p.stem == split or p.stem.startswith((f"{split}-", f"{split}_", f"{split}.")) or p.parent.name == split
    ]
    if named:
        return named
    return files if split == "train" and len(files) == 1 else []


def _splits_in(folder: Path) -> list[str]:
    names = {
        p.stem.split("-")[0].split("_")[0].split(".")[0] for p in folder.rglob("*") if p.suffix.lower() in DATA_SUFFIXES
    }
    return sorted(names)


def read_split(path: Path, split: str) -> list[Record]:
    """The records of ``split`` in ``path``: a data file (split ``train``), a folder of split files, or a saved Hugging Face dataset."""
    if path.is_file():
        if split != "train":
            raise PermanentError.one(
                "spec.dataset.validation.split",
                f"{path.name} is a single file and has no split {split!r}; use dataset.validation.fraction, or a folder with {split}.jsonl",
                summary="the dataset cannot be read",
            )
        return read_file(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_saved(path, split)
    files = _split_files(path, split)
    if not files:
        raise PermanentError.one(
            "spec.dataset.validation.split" if split != "train" else _SOURCE,
            f"{path} has no data for split {split!r} (found splits: {_splits_in(path) or 'none'}); "
            f"name the files {split}.jsonl (or .json/.csv/.parquet)",
            summary="the dataset cannot be read",
        )
    records: list[Record] = []
    for file in files:
        records.extend(read_file(file))
    return records


def _read_saved(path: Path, split: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk  # noqa: PLC0415

    try:
        saved = load_from_disk(str(path))
    except Exception as exc:
        raise PermanentError.one(
            _SOURCE, f"{path} is not a readable saved dataset ({exc})", summary="the dataset cannot be read"
        ) from None
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise PermanentError.one(
                "spec.dataset.validation.split" if split != "train" else "spec.dataset.split",
                f"the dataset has no split {split!r}; it has {sorted(saved)}",
                summary="the dataset cannot be read",
            )
        rows: list[Record] = saved[split].to_list()
    elif split == "train":
        rows = saved.to_list()
    else:
        raise PermanentError.one(
            "spec.dataset.validation.split",
            f"{path} is a single saved split; it has no split {split!r}",
            summary="the dataset cannot be read",
        )
    if not rows:
        raise PermanentError.one(
            _SOURCE, f"split {split!r} of {path} holds no examples", summary="the dataset cannot be read"
        )
    return rows


# -------------------------------------------------------------------------------------- format


def columns_of(records: Sequence[Record]) -> list[str]:
    """Every column that occurs in ``records``, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


def detect_format(records: Sequence[Record], requested: str) -> Format:
    """The format of ``records``: ``requested``, or the one their columns identify when it is ``auto``."""
    columns = columns_of(records)
    if requested != "auto":
        fmt: Format = requested  # type: ignore[assignment]
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
        if missing:
            raise PermanentError.one(
                "spec.dataset.format",
                f"format {fmt} needs column(s) {missing}, but the data has columns {columns}; "
                "rename the columns or set dataset.format to auto",
                summary="the dataset does not match its format",
            )
        return fmt
    for candidate, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return candidate
    raise PermanentError.one(
        "spec.dataset.format",
        f"cannot tell the format from the columns {columns}: expected 'messages' (chat), "
        "'instruction' + 'output' (+ 'input'), 'prompt' + 'completion', or 'text'; rename the columns or set dataset.format",
        summary="the dataset format is unknown",
    )


def _check_records(records: Sequence[Record], fmt: Format) -> None:  # noqa: PLR0912 - one check per rule
    problems = ProblemList()
    bad = 0

    def complain(index: int, message: str) -> None:
        nonlocal bad
        bad += 1
        if bad <= _SHOWN:
            problems.add(_SOURCE, f"example {index + 1}: {message}")

    for index, record in enumerate(records):
        if fmt == "messages":
            messages = record.get("messages")
            if not isinstance(messages, list) or not messages:
                complain(index, "'messages' must be a non-empty list of {role, content} objects")
                continue
            roles = []
            for turn, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    complain(index, f"messages[{turn}] must be an object with a string 'content'")
                    break
                role = message.get("role")
                roles.append(role)
                if role not in _ROLES:
                    complain(index, f"messages[{turn}].role is {role!r}; use one of {list(_ROLES)}")
                    break
            else:
                if "assistant" not in roles:
                    complain(index, "the conversation has no assistant turn to learn from")
            continue
        for column in FORMAT_COLUMNS[fmt]:
            value = record.get(column)
            if not isinstance(value, str):
                complain(index, f"{column!r} is {'missing' if value is None else type(value).__name__}, not text")
                break
            if column in ("completion", "output", "text") and not value.strip():
                complain(index, f"{column!r} is empty: nothing to learn from")
                break
        else:
            if fmt == "instruction" and record.get("input") is not None and not isinstance(record.get("input"), str):
                complain(index, "'input' must be text when present")
    _more(problems, bad, "bad examples")
    problems.raise_if_any("the dataset has bad examples")


# --------------------------------------------------------------------------------- rendering

#: A rendered example: text segments, each with whether the loss is taken on it; and whether to add BOS/EOS.
Segments = list[tuple[str, bool]]


def _render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], *, completion_only: bool) -> Segments:
    def render(conversation: list[dict[str, str]], *, generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    full = render(messages, generation_prompt=False)
    if not completion_only:
        return [(full, True)]
    segments: Segments = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], generation_prompt=True) if index else ""
        through = render(messages[: index + 1], generation_prompt=False)
        if not (before.startswith(full[:done]) and through.startswith(before) and full.startswith(through)):
            raise ValueError("prefix")
        segments.append((before[done:], False))
        segments.append((through[len(before) :], True))
        done = len(through)
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def render(
    record: Record, fmt: Format, tokenizer: Tokenizer, *, completion_only: bool, chat: bool
) -> tuple[Segments, bool]:
    """``record`` as text segments (with whether each is learned) and whether BOS/EOS are added around them."""
    if fmt == "text":
        return [(record["text"], True)], True
    if fmt == "prompt-completion":
        return [(record["prompt"], not completion_only), (record["completion"], True)], True
    if fmt == "instruction":
        instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
        if chat:
            content = f"{instruction}\n\n{extra}" if extra else instruction
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
            return _render_chat(tokenizer, messages, completion_only=completion_only), False
        prompt = (_ALPACA_WITH_INPUT if extra else _ALPACA).format(instruction=instruction, input=extra)
        return [(prompt, not completion_only), (output, True)], True
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return _render_chat(tokenizer, messages, completion_only=completion_only), False


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
            problems.add(_SOURCE, f"example {index + 1}: the chat template cannot render it ({exc})")
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


# ---------------------------------------------------------------------------------- shaping


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
    _check_records(records, fmt)
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
        _check_records(eval_records, eval_fmt)
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


# ---------------------------------------------------------------------------------- collation


class Collator:
    """Pads a list of rows into a batch; packed rows get position ids and no attention mask.

    Besides the model's inputs the batch carries ``num_tokens`` and ``num_examples`` (real tokens
    and examples in it), which the trainer pops for its throughput numbers.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch  # noqa: PLC0415 - collation runs in the training processes only

        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]

        def padded(key: str, fill: int | Callable[[int], list[int]]) -> torch.Tensor:
            out = []
            for r in rows:
                missing = longest - len(r[key])
                out.append(list(r[key]) + (fill(missing) if callable(fill) else [fill] * missing))
            return torch.tensor(out, dtype=torch.long)

        batch: dict[str, Any] = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if packed:
            # The padding forms one more "example" of its own, so no real token attends to it.
            batch["position_ids"] = padded("position_ids", lambda n: list(range(n)))
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows], dtype=torch.long
            )
        batch["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        batch["num_examples"] = torch.tensor(sum(int(r.get("num_examples", 1)) for r in rows))
        return batch
