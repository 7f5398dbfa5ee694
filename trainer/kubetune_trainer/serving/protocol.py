"""The OpenAI API as this server speaks it: the request fields it reads, checked, and the error shape.

Every check raises a :class:`RequestError` that names the offending field (``param``) and
carries the HTTP status to answer with; nothing here touches the model or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

#: ``max_tokens`` of a completion that names none (OpenAI's default).
DEFAULT_COMPLETION_TOKENS: Final = 16
#: At most this many stop sequences (as OpenAI).
MAX_STOP_SEQUENCES: Final = 4


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
    return value


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
        if not isinstance(role, str) or not role:
            raise RequestError(f"'{where}.role' must be a non-empty string", param=f"{where}.role")
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
