"""The four data formats: telling which one records are in, checking them, and rendering them as text.

:func:`detect_format` takes the spec's ``format`` or, for ``auto``, the first format whose columns
the records have (:data:`FORMAT_COLUMNS`); :func:`check_records` lists the records that do not fit
it; :func:`render` turns a record into text segments, each marked with whether the loss is taken
on it, through the tokenizer's chat template for chats (and for instructions when there is one)
or an Alpaca-style prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol

from kubetune_trainer.errors import PermanentError, ProblemList
from kubetune_trainer.training.data.load import SHOWN, SOURCE_FIELD, Record, more_problems

Format = Literal["messages", "instruction", "prompt-completion", "text"]

_ROLES: Final = ("system", "user", "assistant", "tool")
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
    """The part of a transformers tokenizer that the data preparation uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> Any: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


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


def check_records(records: Sequence[Record], fmt: Format) -> None:  # noqa: PLR0912 - one check per rule
    """Raise a :class:`PermanentError` listing the first records that do not fit ``fmt``, and how many more."""
    problems = ProblemList()
    bad = 0

    def complain(index: int, message: str) -> None:
        nonlocal bad
        bad += 1
        if bad <= SHOWN:
            problems.add(SOURCE_FIELD, f"example {index + 1}: {message}")

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
    more_problems(problems, bad, "bad examples")
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
