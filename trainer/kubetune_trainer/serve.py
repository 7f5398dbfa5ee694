"""``kubetune serve``: an OpenAI-compatible HTTP server for a base model and its PEFT adapters.

On GPUs the operator deploys vLLM to serve a fine-tuned adapter; this built-in server is for what
vLLM cannot do (DoRA adapters), for CPUs, and for checking an adapter right after training, with
nothing but what the trainer image already holds: transformers and peft for the model, the
standard library's ``ThreadingHTTPServer`` for HTTP and prometheus-client for ``/metrics``.

One base model is loaded once; each ``--adapter NAME=PATH`` is loaded onto it with peft's
``load_adapter`` and chosen per request by the request's ``model`` field (the base alone answers to
``--base-name``). Switching adapters changes the shared model, and one model cannot run two
generations at once anyway, so generation is serialized by a lock: requests are parsed, validated
and answered concurrently, but tokens are generated for one request at a time.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``stream: true`` as Server-Sent Events), ``GET /healthz`` (the process answers), ``GET /readyz``
(the model is loaded) and ``GET /metrics``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; a bad request never gets a stack trace.

Streamed and non-streamed answers come from the same token loop, so they are the same text.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT

log = logging.getLogger("kubetune.serve")

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
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


# --- request parsing --------------------------------------------------------------------------------


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


# --- the model --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What a generation ended with, filled in as it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop sequence (and must wait)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class Engine:
    """A base model with its adapters, generating for one request at a time."""

    def __init__(self, model_path: Path, adapters: dict[str, Path], *, base_name: str, device: str | None) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.base_name = base_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        if adapters:
            from peft import PeftModel  # noqa: PLC0415

            names = list(adapters)
            model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
        self.model: Any = model.to(self.device).eval()
        self.adapters = list(adapters)
        #: The model name the weights are set up for (peft starts with the first adapter active).
        self.active = self.adapters[0] if self.adapters else base_name
        self.created = int(time.time())
        self.lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # transformers 5 renamed the key-value cache argument ``past_key_values`` to ``cache``.
        forward = self.model.get_base_model().forward if adapters else self.model.forward
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def names(self) -> list[str]:
        """Every model name a request may ask for: the base, then the adapters."""
        return [self.base_name, *self.adapters]

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw prompt's token ids: BOS (where the tokenizer has one), then the text without other special tokens."""
        ids: list[int] = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the tokenizer's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise RequestError(f"the chat template refused these messages: {exc}", param="messages") from exc
        ids: list[int] = list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        return ids

    def check_length(self, ids: list[int], sampling: Sampling) -> None:
        """Refuse a prompt that, with its answer, would not fit the model's context."""
        if self.context and len(ids) + sampling.max_tokens > self.context:
            raise RequestError(
                f"the prompt ({len(ids)} tokens) and max_tokens ({sampling.max_tokens}) exceed the model's "
                f"context of {self.context} tokens",
                code="context_length_exceeded",
            )

    def generate(self, name: str, ids: list[int], sampling: Sampling, outcome: Outcome) -> Generator[str, None, None]:
        """Yield the answer's text piece by piece, holding the lock until it ends or is closed.

        Stop sequences are cut out, and text that might begin one is held back until it is known
        not to: what is yielded is exactly the final answer.
        """
        import torch  # noqa: PLC0415

        outcome.prompt_tokens = len(ids)
        with self.lock, torch.inference_mode():
            self._choose(name)
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
            tokens: list[int] = []
            sent = 0
            text = ""
            past: Any = None
            step_input = torch.tensor([ids], device=self.device)
            for _ in range(sampling.max_tokens):
                output = self.model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{self.cache_arg: past})
                past = output.get(self.cache_arg)
                token = self._pick(output.logits[0, -1], sampling, generator)
                if token in self.eos_ids:
                    outcome.finish_reason = "stop"
                    break
                tokens.append(token)
                outcome.completion_tokens = len(tokens)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min(
                    (i for i in (text.find(s, max(0, sent - len(s))) for s in sampling.stop) if i >= 0), default=-1
                )
                if cut >= 0:
                    text = text[:cut]
                    outcome.finish_reason = "stop"
                    break
                # Hold back a possible stop sequence's beginning, and an incomplete UTF-8 character.
                ready = len(text) - _held_back(text, sampling.stop)
                if text.endswith("\ufffd"):
                    ready = min(ready, len(text) - 1)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
                step_input = torch.tensor([[token]], device=self.device)
            else:
                outcome.finish_reason = "length"
            if len(text) > sent:
                yield text[sent:]

    def _choose(self, name: str) -> None:
        if not self.adapters or name == self.active:
            return
        self.active = name
        if name == self.base_name:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)

    def _pick(self, logits: Any, sampling: Sampling, generator: Any) -> int:
        import torch  # noqa: PLC0415

        if sampling.temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator).item())


# --- metrics ----------------------------------------------------------------------------------------


@dataclass
class ServeMetrics:
    """Requests, latency and tokens, in a registry of the server's own."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    generated: Counter = field(init=False)
    prompt: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "kubetune_serve_requests",
            "HTTP requests answered, by endpoint, model and status code.",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Seconds from a request's arrival to the end of its answer, by endpoint.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.generated = Counter(
            "kubetune_serve_generated_tokens", "Tokens generated, by model.", ["model"], registry=self.registry
        )
        self.prompt = Counter(
            "kubetune_serve_prompt_tokens", "Prompt tokens read, by model.", ["model"], registry=self.registry
        )


# --- HTTP -------------------------------------------------------------------------------------------

GENERATION_ENDPOINTS: Final = {"/v1/completions", "/v1/chat/completions"}


class Server(ThreadingHTTPServer):
    """The HTTP server, holding the engine once it is loaded."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, names: list[str], limit: int) -> None:
        super().__init__(address, Handler)
        self.engine: Engine | None = None
        self.names = names
        self.limit = limit
        self.metrics = ServeMetrics()


class Handler(BaseHTTPRequestHandler):
    """One HTTP request."""

    server: Server
    server_version = "kubetune-serve"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # Dispatch ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._model_label = ""
        routes = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
        }
        endpoint = path if any(p == path for _, p in routes) else "other"
        status: int
        try:
            route = routes.get((method, path))
            if route is None:
                if any(p == path for _, p in routes):
                    raise RequestError(
                        f"{method} is not allowed on {path}",
                        status=HTTPStatus.METHOD_NOT_ALLOWED,
                        code="method_not_allowed",
                    )
                raise RequestError(f"no such endpoint: {method} {path}", status=HTTPStatus.NOT_FOUND, code="not_found")
            status = route()
        except RequestError as exc:
            status = exc.status
            self._send_json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away
        except Exception:
            log.exception("%s %s failed", method, path)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            error = RequestError(
                "the server failed to answer; see its log", status=HTTPStatus.INTERNAL_SERVER_ERROR, kind="server_error"
            )
            with contextlib.suppress(OSError):
                self._send_json(error.status, error.body())
        if endpoint not in {"/metrics", "/healthz", "/readyz"}:
            metrics = self.server.metrics
            metrics.requests.labels(endpoint, self._model_label, str(int(status))).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    # Plain endpoints --------------------------------------------------------------------------------

    def _healthz(self) -> int:
        self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        return HTTPStatus.OK

    def _readyz(self) -> int:
        if self.server.engine is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"loading\n", "text/plain; charset=utf-8")
            return HTTPStatus.SERVICE_UNAVAILABLE
        self._send(HTTPStatus.OK, b"ready\n", "text/plain; charset=utf-8")
        return HTTPStatus.OK

    def _metrics(self) -> int:
        self._send(HTTPStatus.OK, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        return HTTPStatus.OK

    def _models(self) -> int:
        engine = self._engine()
        data = [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "kubetune"}
            | ({"parent": engine.base_name} if name != engine.base_name else {})
            for name in engine.names
        ]
        self._send_json(HTTPStatus.OK, {"object": "list", "data": data})
        return HTTPStatus.OK

    # Generation -------------------------------------------------------------------------------------

    def _completions(self) -> int:
        body = self._body()
        engine = self._engine()
        name = self._model(body, engine)
        prompt = parse_prompt(body)
        sampling = parse_sampling(body, default_max_tokens=DEFAULT_COMPLETION_TOKENS, limit=self.server.limit)
        stream, include_usage = parse_stream(body)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError("'echo' must be a boolean", param="echo")
        ids = engine.encode_prompt(prompt)
        if not ids:
            raise RequestError("'prompt' is empty", param="prompt")
        engine.check_length(ids, sampling)
        return self._answer(
            engine,
            name,
            ids,
            sampling,
            chat=False,
            stream=stream,
            include_usage=include_usage,
            prefix=prompt if echo else "",
        )

    def _chat(self) -> int:
        body = self._body()
        engine = self._engine()
        name = self._model(body, engine)
        messages = parse_messages(body)
        sampling = parse_sampling(body, default_max_tokens=self.server.limit, limit=self.server.limit)
        stream, include_usage = parse_stream(body)
        ids = engine.encode_chat(messages)
        engine.check_length(ids, sampling)
        return self._answer(engine, name, ids, sampling, chat=True, stream=stream, include_usage=include_usage)

    def _answer(
        self,
        engine: Engine,
        name: str,
        ids: list[int],
        sampling: Sampling,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        prefix: str = "",
    ) -> int:
        outcome = Outcome()
        pieces = engine.generate(name, ids, sampling, outcome)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat and stream else "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
        }
        try:
            if stream:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                if chat:
                    self._event(
                        head
                        | {
                            "choices": [
                                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            ]
                        }
                    )
                elif prefix:
                    self._event(
                        head | {"choices": [{"index": 0, "text": prefix, "logprobs": None, "finish_reason": None}]}
                    )
                try:
                    for piece in pieces:
                        self._event(head | {"choices": [self._choice(chat, piece, None, delta=True)]})
                except (BrokenPipeError, ConnectionResetError):
                    raise
                except Exception:
                    # The status line is sent: say what went wrong in the stream, as OpenAI does.
                    log.exception("generation failed while streaming")
                    error = RequestError("generation failed; see the server's log", kind="server_error")
                    self._event(error.body())
                    return HTTPStatus.INTERNAL_SERVER_ERROR
                self._event(head | {"choices": [self._choice(chat, "", outcome.finish_reason, delta=True)]})
                if include_usage:
                    self._event(head | {"choices": [], "usage": outcome.usage()})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                text = prefix + "".join(pieces)
                self._send_json(
                    HTTPStatus.OK,
                    head | {"choices": [self._choice(chat, text, outcome.finish_reason)], "usage": outcome.usage()},
                )
        finally:
            pieces.close()  # releases the lock however the answer ended
            self.server.metrics.generated.labels(name).inc(outcome.completion_tokens)
            self.server.metrics.prompt.labels(name).inc(outcome.prompt_tokens)
        return HTTPStatus.OK

    @staticmethod
    def _choice(chat: bool, text: str, finish: str | None, *, delta: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        content: dict[str, Any] = {"content": text} if (text or not delta) else {}
        if not delta:
            content["role"] = "assistant"
        return {"index": 0, "delta" if delta else "message": content, "finish_reason": finish}

    # Helpers ----------------------------------------------------------------------------------------

    def _engine(self) -> Engine:
        engine = self.server.engine
        if engine is None:
            raise RequestError(
                "the model is still loading", status=HTTPStatus.SERVICE_UNAVAILABLE, kind="server_error", code="loading"
            )
        return engine

    def _model(self, body: dict[str, Any], engine: Engine) -> str:
        name = body.get("model")
        if name is None:
            raise RequestError("'model' is required", param="model")
        if not isinstance(name, str):
            raise RequestError("'model' must be a string", param="model")
        if name not in engine.names:
            raise RequestError(
                f"the model '{name}' does not exist; this server serves {', '.join(engine.names)}",
                status=HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        self._model_label = name
        return name

    def _body(self) -> dict[str, Any]:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError("a request body with a Content-Length is required", status=HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError("Content-Length is not a number") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise RequestError(
                f"the request body must be at most {MAX_BODY_BYTES} bytes", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode("utf-8"), "application/json")

    def _event(self, chunk: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")
        self.wfile.flush()


# --- command ----------------------------------------------------------------------------------------


def parse_adapters(values: list[str] | None, base_name: str) -> dict[str, Path]:
    """``NAME=PATH`` pairs as a dict, each name unique and not the base's."""
    adapters: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter {value!r}: expected NAME=PATH")
        if name == base_name or name in adapters:
            raise ValueError(f"--adapter {value!r}: the name {name!r} is taken")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {value!r}: {path} holds no adapter_config.json")
        adapters[name] = Path(path)
    return adapters


def main(args: argparse.Namespace) -> int:
    """Run ``kubetune serve`` until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        adapters = parse_adapters(args.adapter, args.base_name)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_PERMANENT
    model = Path(args.model)
    if not (model / "config.json").is_file():
        log.error("--model %s: not a model folder (no config.json)", model)
        return EXIT_PERMANENT
    if args.max_new_tokens_limit < 1:
        log.error("--max-new-tokens-limit must be at least 1")
        return EXIT_PERMANENT

    server = Server((args.host, args.port), names=[args.base_name, *adapters], limit=args.max_new_tokens_limit)
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    log.info("listening on http://%s:%d (healthz answers; readyz once the model is loaded)", host, port)
    try:
        started = time.monotonic()
        try:
            server.engine = Engine(model, adapters, base_name=args.base_name, device=args.device)
        except Exception as exc:
            log.error("cannot load %s with adapters %s: %s", model, adapters or "none", exc)
            return EXIT_PERMANENT
        log.info(
            "ready in %.1fs on %s: models %s", time.monotonic() - started, server.engine.device, server.engine.names
        )
        stopping.wait()
    finally:
        server.shutdown()
        server.server_close()
    return EXIT_OK
