"""The HTTP layer of ``kubetune serve``: routes, OpenAI-shaped answers, Server-Sent Events and metrics.

Built on the standard library's ``ThreadingHTTPServer`` (one thread per connection); the
:class:`~kubetune_trainer.serving.engine.Engine` serializes generation itself. Every request's
endpoint, model and status are counted, with its latency, in a Prometheus registry of the
server's own (``GET /metrics``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from kubetune_trainer.serving.engine import Engine, Outcome
from kubetune_trainer.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    RequestError,
    Sampling,
    parse_body,
    parse_messages,
    parse_prompt,
    parse_sampling,
    parse_stream,
)

log = logging.getLogger("kubetune.serve")

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024


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
        return parse_body(self.rfile.read(length))

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
