"""The HTTP layer of ``kubetune serve``: routes, OpenAI-shaped answers, Server-Sent Events and metrics.

Built on aiohttp's low-level server (one asyncio event loop; aiohttp is already pinned, as kopf's
and the Kubernetes client's dependency): connections cost a coroutine, not a thread, and no client
can hold another's up:

- prompts are tokenized in a worker thread, off the event loop;
- generation is the :class:`~kubetune_trainer.serving.engine.Engine`'s scheduler thread's; a
  request hands it a sequence whose pieces come back through an asyncio queue of the request's
  own, so the scheduler never waits for a socket. A client that does not read only fills its own
  queue (at most its ``max_tokens`` pieces); a write that cannot go through within
  ``write_timeout`` seconds drops the connection and cancels the sequence, and so does a client
  that goes away;
- a request's headers must arrive within ``read_timeout`` seconds of the connection's opening (or
  of its previous answer: aiohttp's keep-alive timer closes an idle connection), its body within
  ``read_timeout`` seconds of its headers (a lying ``Content-Length`` gets 408 and the
  connection closed), and its whole answer within ``request_timeout`` seconds (then 504, or an
  error event when streaming, and the sequence cancelled);
- the listen backlog is :data:`BACKLOG`; a request arriving while more than ``max_connections``
  connections are open is answered 503 and its connection closed (as uvicorn's
  ``limit_concurrency``); more than the engine's ``max_queued`` waiting sequences get 429.

Every answer is JSON (errors in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``, unknown paths 404, wrong methods 405, unparsable requests 400) with ``Server:
kubetune-serve`` and no Python or library version. Every request's endpoint, model and status are
counted, with its latency, in a Prometheus registry of the server's own (``GET /metrics``), with
the adapters loaded and the requests waiting as gauges.

Runtime adapters (vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``) are
answered only when the server has a ``runtime_adapters`` folder (else 404, as vLLM without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); an adapter's path must resolve inside that folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kubetune_trainer.serving.engine import Emitted, Engine, Outcome, Sequence
from kubetune_trainer.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    RequestError,
    Sampling,
    check_adapter_name,
    confined,
    parse_body,
    parse_messages,
    parse_prompt,
    parse_sampling,
    parse_stream,
    refuse_unsupported,
)

log = logging.getLogger("kubetune.serve")

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: Connections the kernel queues before they are accepted.
BACKLOG: Final = 2048
#: The ``Server`` header of every answer.
SERVER_HEADER: Final = "kubetune-serve"
#: Errors after which the connection is closed (its body may not have been read).
_CLOSING: Final = frozenset(
    {
        HTTPStatus.REQUEST_TIMEOUT,
        HTTPStatus.SERVICE_UNAVAILABLE,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.LENGTH_REQUIRED,
    }
)


@dataclass(frozen=True)
class Limits:
    """How much the server takes, and how long it waits."""

    max_tokens: int = 1024
    read_timeout: float = 10.0
    write_timeout: float = 30.0
    request_timeout: float = 600.0
    max_connections: int = 1024


@dataclass
class ServeMetrics:
    """Requests, latency and tokens, in a registry of the server's own."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    generated: Counter = field(init=False)
    prompt: Counter = field(init=False)
    adapters: Gauge = field(init=False)
    queued: Gauge = field(init=False)
    largest_batch: Gauge = field(init=False)

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
        self.adapters = Gauge(
            "kubetune_serve_adapters_loaded", "Adapters loaded (at start-up and at run time).", registry=self.registry
        )
        self.queued = Gauge(
            "kubetune_serve_queued_requests", "Requests waiting for the scheduler.", registry=self.registry
        )
        self.largest_batch = Gauge(
            "kubetune_serve_largest_batch",
            "The most sequences one decode forward has held since the start.",
            registry=self.registry,
        )


# --- aiohttp's own answers, as JSON ----------------------------------------------------------------


def _json_response(status: int, body: dict[str, Any], *, close: bool = False) -> web.Response:
    response = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"Server": SERVER_HEADER},
    )
    if close:
        response.force_close()
    return response


class _Handler(RequestHandler):
    """aiohttp's connection protocol, answering what it cannot parse with OpenAI's error shape."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request", exc_info=exc)
        else:
            log.debug("bad request: %s", message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer is partly sent; cannot send an error")
        kind = "server_error" if status >= 500 else "invalid_request_error"
        text = "the server failed to answer; see its log" if status >= 500 else f"bad HTTP request: {message or exc}"
        error = RequestError(text, status=HTTPStatus(status), kind=kind)
        return _json_response(status, error.body(), close=True)


class _WebServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


# --- the server -----------------------------------------------------------------------------------


class Server:
    """The HTTP server; :attr:`engine` is set once the model is loaded, :attr:`ready` once start-up is done."""

    def __init__(self, *, base_name: str, limits: Limits | None = None, runtime_adapters: Path | None = None) -> None:
        self.engine: Engine | None = None
        self.ready = False
        #: Start-up adapters that could not be loaded, with why (named by ``/readyz``).
        self.skipped: dict[str, str] = {}
        self.base_name = base_name
        self.limits = limits or Limits()
        self.runtime_adapters = runtime_adapters
        self.metrics = ServeMetrics()
        self.metrics.adapters.set_function(lambda: len(self.engine.adapters) if self.engine else 0)
        self.metrics.queued.set_function(lambda: self.engine.queued if self.engine else 0)
        self.metrics.largest_batch.set_function(lambda: getattr(self.engine, "largest_batch", 0))
        self._web: _WebServer | None = None
        self._runner: web.ServerRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); the port listened on."""
        self._web = _WebServer(
            self._handle,
            handler_cancellation=True,
            keepalive_timeout=self.limits.read_timeout,
            max_line_size=16384,
            max_field_size=16384,
            lingering_time=0,  # an error answered before the body is read closes the connection at once
            access_log=None,
        )
        self._runner = web.ServerRunner(self._web, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=BACKLOG)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self) -> None:
        """Stop listening, end open connections, and stop the engine."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    # Dispatch ---------------------------------------------------------------------------------------

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        path = request.path.rstrip("/") or "/"
        label = [""]
        routes: dict[tuple[str, str], Callable[[], Awaitable[web.StreamResponse]]] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/completions"): lambda: self._completions(request, label),
            ("POST", "/v1/chat/completions"): lambda: self._chat(request, label),
            ("POST", "/v1/load_lora_adapter"): lambda: self._load_adapter(request),
            ("POST", "/v1/unload_lora_adapter"): lambda: self._unload_adapter(request),
        }
        endpoint = path if any(p == path for _, p in routes) else "other"
        response: web.StreamResponse
        try:
            if self._web is not None and len(self._web.connections) > self.limits.max_connections:
                raise RequestError(
                    f"the server holds more than {self.limits.max_connections} connections; retry later",
                    status=HTTPStatus.SERVICE_UNAVAILABLE,
                    kind="server_error",
                    code="too_many_connections",
                )
            route = routes.get((request.method, path))
            if route is None:
                if any(p == path for _, p in routes):
                    raise RequestError(
                        f"{request.method} is not allowed on {path}",
                        status=HTTPStatus.METHOD_NOT_ALLOWED,
                        code="method_not_allowed",
                    )
                raise RequestError(
                    f"no such endpoint: {request.method} {path}", status=HTTPStatus.NOT_FOUND, code="not_found"
                )
            response = await route()
        except RequestError as exc:
            response = _json_response(exc.status, exc.body(), close=exc.status in _CLOSING)
        except asyncio.CancelledError:
            self._count(endpoint, label[0], 499, started)  # the client went away
            raise
        except Exception:
            log.exception("%s %s failed", request.method, path)
            error = RequestError(
                "the server failed to answer; see its log", status=HTTPStatus.INTERNAL_SERVER_ERROR, kind="server_error"
            )
            response = _json_response(error.status, error.body())
        self._count(endpoint, label[0], response.status, started)
        return response

    def _count(self, endpoint: str, model: str, status: int, started: float) -> None:
        if endpoint not in {"/metrics", "/healthz", "/readyz"}:
            self.metrics.requests.labels(endpoint, model, str(int(status))).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    # Plain endpoints --------------------------------------------------------------------------------

    @staticmethod
    def _text(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text, content_type="text/plain", headers={"Server": SERVER_HEADER})

    async def _healthz(self) -> web.StreamResponse:
        return self._text(HTTPStatus.OK, "ok\n")

    async def _readyz(self) -> web.StreamResponse:
        if not self.ready:
            return self._text(HTTPStatus.SERVICE_UNAVAILABLE, "loading\n")
        skipped = "".join(f"adapter {name} not loaded: {why}\n" for name, why in self.skipped.items())
        return self._text(HTTPStatus.OK, "ready\n" + skipped)

    async def _metrics(self) -> web.StreamResponse:
        response = web.Response(
            status=HTTPStatus.OK, body=generate_latest(self.metrics.registry), headers={"Server": SERVER_HEADER}
        )
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _models(self) -> web.StreamResponse:
        engine = self._engine()
        data = [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "kubetune", "root": name}
            | ({"parent": engine.base_name} if name != engine.base_name else {"parent": None})
            for name in engine.names
        ]
        return _json_response(HTTPStatus.OK, {"object": "list", "data": data})

    # Runtime adapters -------------------------------------------------------------------------------

    def _adapters_root(self) -> Path:
        if self.runtime_adapters is None:
            raise RequestError(
                "runtime adapters are off: this server was started without --runtime-adapters",
                status=HTTPStatus.NOT_FOUND,
                code="not_found",
            )
        return self.runtime_adapters

    async def _load_adapter(self, request: BaseRequest) -> web.StreamResponse:
        root = self._adapters_root()
        body = await self._body(request)
        engine = self._engine()
        name = check_adapter_name(body.get("lora_name"), engine.names)
        path = confined(root, body.get("lora_path"))
        await asyncio.wrap_future(engine.load_adapter(name, path))
        log.info("loaded adapter %s from %s", name, path)
        return self._text(HTTPStatus.OK, f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_adapter(self, request: BaseRequest) -> web.StreamResponse:
        self._adapters_root()
        body = await self._body(request)
        engine = self._engine()
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise RequestError("'lora_name' must be a non-empty string", param="lora_name")
        await asyncio.wrap_future(engine.unload_adapter(name))
        log.info("unloaded adapter %s", name)
        return self._text(HTTPStatus.OK, f"Success: LoRA adapter '{name}' removed successfully.")

    # Generation -------------------------------------------------------------------------------------

    async def _completions(self, request: BaseRequest, label: list[str]) -> web.StreamResponse:
        body = await self._body(request)
        engine = self._engine()
        label[0] = name = self._model(body, engine)
        refuse_unsupported(body)
        prompt = parse_prompt(body)
        sampling = parse_sampling(body, default_max_tokens=DEFAULT_COMPLETION_TOKENS, limit=self.limits.max_tokens)
        stream, include_usage = parse_stream(body)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError("'echo' must be a boolean", param="echo")
        # Off the event loop: a long prompt's tokenization must not hold up other connections.
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.encode_prompt, prompt)
        if not ids:
            raise RequestError("'prompt' is empty", param="prompt")
        engine.check_length(ids, sampling)
        return await self._answer(
            request,
            engine,
            name,
            ids,
            sampling,
            chat=False,
            stream=stream,
            include_usage=include_usage,
            prefix=prompt if echo else "",
        )

    async def _chat(self, request: BaseRequest, label: list[str]) -> web.StreamResponse:
        body = await self._body(request)
        engine = self._engine()
        label[0] = name = self._model(body, engine)
        refuse_unsupported(body)
        messages = parse_messages(body)
        sampling = parse_sampling(body, default_max_tokens=self.limits.max_tokens, limit=self.limits.max_tokens)
        stream, include_usage = parse_stream(body)
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.encode_chat, messages)
        engine.check_length(ids, sampling)
        return await self._answer(
            request, engine, name, ids, sampling, chat=True, stream=stream, include_usage=include_usage
        )

    async def _answer(
        self,
        request: BaseRequest,
        engine: Engine,
        name: str,
        ids: list[int],
        sampling: Sampling,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        prefix: str = "",
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Emitted] = asyncio.Queue()

        def emit(piece: Emitted) -> None:  # called by the scheduler thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        outcome = Outcome()
        sequence = Sequence(name, ids, sampling, emit, outcome)
        engine.submit(sequence)
        answer = _Answer(
            pieces=pieces,
            outcome=outcome,
            chat=chat,
            deadline=loop.time() + self.limits.request_timeout,
            head={
                "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion.chunk"
                if chat and stream
                else "chat.completion"
                if chat
                else "text_completion",
                "created": int(time.time()),
                "model": name,
            },
        )
        try:
            if stream:
                return await self._stream(request, answer, include_usage=include_usage, prefix=prefix)
            text = prefix + "".join([piece async for piece in answer])
            choice = self._choice(chat, text, outcome.finish_reason)
            return _json_response(HTTPStatus.OK, answer.head | {"choices": [choice], "usage": outcome.usage()})
        except TimeoutError:
            raise self._late() from None
        except _SlowReaderError:
            log.info("dropped a client that read nothing for %gs", self.limits.write_timeout)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        finally:
            sequence.cancel()
            self.metrics.generated.labels(name).inc(outcome.completion_tokens)
            self.metrics.prompt.labels(name).inc(outcome.prompt_tokens)

    def _late(self, status: HTTPStatus = HTTPStatus.GATEWAY_TIMEOUT) -> RequestError:
        return RequestError(
            f"the answer took more than {self.limits.request_timeout:g} seconds",
            status=status,
            kind="timeout",
            code="request_timeout",
        )

    async def _stream(
        self, request: BaseRequest, answer: _Answer, *, include_usage: bool, prefix: str
    ) -> web.StreamResponse:
        """Server-Sent Events: each piece as it comes; an error after the status line is an event."""
        chat, head = answer.chat, answer.head
        response = web.StreamResponse(
            status=HTTPStatus.OK,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Server": SERVER_HEADER},
        )
        await response.prepare(request)
        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            await self._event(response, head | {"choices": [first]})
        elif prefix:
            await self._event(response, head | {"choices": [self._choice(chat, prefix, None, delta=True)]})
        try:
            async for piece in answer:
                await self._event(response, head | {"choices": [self._choice(chat, piece, None, delta=True)]})
        except _SlowReaderError:
            raise
        except Exception as exc:
            # The status line is sent: say what went wrong in the stream, as OpenAI does.
            if isinstance(exc, TimeoutError):
                error = self._late()
            elif isinstance(exc, RequestError):
                error = exc
            else:
                log.error("generation failed while streaming: %s", exc)
                error = RequestError("generation failed; see the server's log", kind="server_error")
            await self._event(response, error.body())
            return response
        finish = self._choice(chat, "", answer.outcome.finish_reason, delta=True)
        await self._event(response, head | {"choices": [finish]})
        if include_usage:
            await self._event(response, head | {"choices": [], "usage": answer.outcome.usage()})
        await self._write(response, b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _choice(chat: bool, text: str, finish: str | None, *, delta: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        content: dict[str, Any] = {"content": text} if (text or not delta) else {}
        if not delta:
            content["role"] = "assistant"
        return {"index": 0, "delta" if delta else "message": content, "finish_reason": finish}

    async def _event(self, response: web.StreamResponse, chunk: dict[str, Any]) -> None:
        await self._write(response, b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await response.write(data)
        except TimeoutError:
            raise _SlowReaderError from None

    # Helpers ----------------------------------------------------------------------------------------

    def _engine(self) -> Engine:
        engine = self.engine
        if engine is None or not self.ready:
            raise RequestError(
                "the model is still loading", status=HTTPStatus.SERVICE_UNAVAILABLE, kind="server_error", code="loading"
            )
        return engine

    @staticmethod
    def _model(body: dict[str, Any], engine: Engine) -> str:
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
        return name

    async def _body(self, request: BaseRequest) -> dict[str, Any]:
        length = request.content_length
        if length is None and request.headers.get("Transfer-Encoding", "").lower() != "chunked":
            raise RequestError("a request body with a Content-Length is required", status=HTTPStatus.LENGTH_REQUIRED)
        if length is not None and length > MAX_BODY_BYTES:
            raise RequestError(
                f"the request body must be at most {MAX_BODY_BYTES} bytes", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        raw = bytearray()
        try:
            async with asyncio.timeout(self.limits.read_timeout):
                while chunk := await request.content.read(65536):
                    raw += chunk
                    if len(raw) > MAX_BODY_BYTES:
                        raise RequestError(
                            f"the request body must be at most {MAX_BODY_BYTES} bytes",
                            status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        )
        except TimeoutError:
            raise RequestError(
                f"the request body did not arrive within {self.limits.read_timeout:g} seconds",
                status=HTTPStatus.REQUEST_TIMEOUT,
                code="request_timeout",
            ) from None
        return parse_body(bytes(raw))


class _SlowReaderError(Exception):
    """A client read nothing for ``write_timeout`` seconds."""


@dataclass
class _Answer:
    """A request's generation as the HTTP layer sees it: the pieces, until the end or the deadline."""

    pieces: asyncio.Queue[Emitted]
    outcome: Outcome
    chat: bool
    deadline: float
    head: dict[str, Any]

    def __aiter__(self) -> _Answer:
        return self

    async def __anext__(self) -> str:
        async with asyncio.timeout_at(self.deadline):
            piece = await self.pieces.get()
        if piece is None:
            raise StopAsyncIteration
        if isinstance(piece, BaseException):
            raise piece
        return piece
