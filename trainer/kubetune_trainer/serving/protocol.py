"""The OpenAI API as this server speaks it: the request fields it reads, checked, and the error shape.

Every check raises a :class:`RequestError` that names the offending field (``param``) and
carries the HTTP status to answer with; nothing here touches the model or the network.
:func:`parse_body` turns the raw body into a JSON object, refusing what JSON allows but the
server cannot use: nesting deeper than :data:`MAX_DEPTH`, integers of thousands of digits, and
strings with a lone surrogate (``"\\ud800"``, which no tokenizer can encode). Integer fields
must fit in 64 bits. Fields of OpenAI's API that the server does not implement (``logprobs``,
``tools``, ``best_of``...: :data:`UNSUPPORTED`) are refused rather than ignored, and so are chat
roles outside OpenAI's (:data:`ROLES`). :func:`confined` and :func:`check_adapter_name` check the
runtime adapter requests (``/v1/load_lora_adapter``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

#: ``max_tokens`` of a completion that names none (OpenAI's default).
DEFAULT_COMPLETION_TOKENS: Final = 16
#: At most this many stop sequences (as OpenAI).
MAX_STOP_SEQUENCES: Final = 4
#: Deepest nesting of arrays and objects accepted in a request body (a chat request needs 5).
MAX_DEPTH: Final = 64
#: The roles of OpenAI's chat messages; any other is refused.
ROLES: Final = ("system", "user", "assistant", "tool", "developer")
#: OpenAI request fields this server does not implement: refused (400 naming the field) unless
#: absent or set to the value that means "not used" (listed).
UNSUPPORTED: Final[dict[str, tuple[Any, ...]]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
#: Integer fields hold a signed 64-bit integer (what torch takes as a seed).
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields to answer."""

    def __init__(
        self,
        message: str,
        *,
        status: HTTPStatus = HTTPStatus.BAD_REQUEST,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", param=name)
    if not INT64_MIN <= value <= INT64_MAX:
        raise RequestError(f"'{name}' must be a 64-bit integer (between -2^63 and 2^63-1)", param=name)
    return value


def _where(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(body: Any) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and lone surrogates, walking ``body`` without recursion."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise RequestError(
                    f"'{path}' holds a lone UTF-16 surrogate (such as \\ud800), which is not text", param=path
                )
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise RequestError(f"the request body is nested more than {MAX_DEPTH} levels deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not _is_text(key):
                raise RequestError(
                    f"a key of {repr(path) if path else 'the request body'} holds a lone UTF-16 surrogate, which is not text",
                    param=path or None,
                )
            stack.append((item, _where(path, key), depth + 1))


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, checked as the module's docstring says."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise RequestError(f"the request body is not valid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_value(body)
    return body


def _same(value: Any, other: Any) -> bool:
    """``value == other``, where a boolean equals only a boolean (``False`` is not ``0``)."""
    if isinstance(value, bool) or isinstance(other, bool):
        return isinstance(value, bool) and isinstance(other, bool) and value == other
    return bool(value == other)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse a field of :data:`UNSUPPORTED` set to a value that asks for what this server does not do."""
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if not any(_same(value, ok) for ok in unused):
            raise RequestError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def check_adapter_name(name: object, taken: list[str]) -> str:
    """An adapter's name, stripped: a non-empty string that is not the base's nor another adapter's."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError("'lora_name' must be a non-empty string", param="lora_name")
    name = name.strip()
    if name in taken:
        raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    return name


def confined(root: Path, path: object) -> Path:
    """``path`` (relative to ``root``, or absolute) with symlinks resolved, refused unless it lies in ``root``."""
    if not isinstance(path, str) or not path:
        raise RequestError("'lora_path' must be a non-empty string", param="lora_path")
    real = Path(os.path.realpath(root / path))
    top = Path(os.path.realpath(root))
    if real != top and top not in real.parents:
        raise RequestError(f"'lora_path' {path} is outside the runtime adapters folder {root}", param="lora_path")
    if not (real / "adapter_config.json").is_file():
        raise RequestError(f"'lora_path' {path} holds no adapter_config.json", param="lora_path")
    return real


def parse_sampling(body: dict[str, Any], *, default_max_tokens: int, limit: int) -> Sampling:
    """The sampling fields of a completion or chat request, checked."""
    max_tokens = _integer(body, "max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = min(default_max_tokens, limit)
    if max_tokens < 0:
        raise RequestError(f"'{param}' must not be negative, got {max_tokens}", param=param)
    if max_tokens > limit:
        raise RequestError(f"'{param}' is {max_tokens}, above this server's limit of {limit}", param=param)
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise RequestError("this server answers one choice per request ('n' must be 1)", param="n")
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stops,
        seed=_integer(body, "seed"),
    )


def parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be a boolean", param="stream_options")
    return stream, include_usage


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages as ``{"role", "content"}`` with text content (text parts joined)."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    parsed: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        f"'{where}.content' parts must be text parts ({{'type': 'text', 'text': ...}})",
                        param=f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string or a list of text parts", param=f"{where}.content")
        parsed.append({"role": role, "content": content})
    return parsed


def parse_prompt(body: dict[str, Any]) -> str:
    """The completion prompt: a string, or a list holding one string."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (one prompt per request)", param="prompt")
    return prompt
