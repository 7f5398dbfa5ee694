"""``kubetune serve`` as a real process: the toy base plus two LoRA adapters trained here, over HTTP.

One adapter learns the toy facts as prompt-completion records (asked through ``/v1/completions``),
the other as chat messages (asked through ``/v1/chat/completions`` and the chat template); the base
knows none of them. Both are trained at once, then served by one server for the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.serving.engine import Engine, Outcome, Sequence
from kubetune_trainer.serving.protocol import Sampling, parse_sampling
from kubetune_trainer.serving.serve import parse_adapters, read_adapters_file
from kubetune_trainer.serving.server import Limits, Server
from kubetune_trainer.toy import greedy_answers, toy_facts, toy_prompt, toy_records, write_jsonl
from tests.factories import toy_chat, wait_until
from tests.trainer.conftest import finetunejob, free_port, start_train, train_env, write_manifest

pytestmark = pytest.mark.trainer

#: Share of the toy facts an adapter must answer exactly.
MIN_MATCH = 0.9
FACTS = toy_facts()
#: The main server's --read-timeout: seconds for a request's headers, then its body.
READ_TIMEOUT = 2


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Reply:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return Reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Reply(error.code, dict(error.headers), error.read())

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None) -> Reply:
        return self.request("POST", path, body, raw=raw)


@pytest.fixture(scope="module")
def adapters(toy_model: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``facts`` (prompt-completion) and ``chat.v1`` (messages) LoRA adapters, trained side by side."""
    folder = tmp_path_factory.mktemp("serve")
    chats = write_jsonl(toy_records("messages"), folder / "chats" / "train.jsonl")
    runs = {}
    # The chat prompts are shorter, and slower to learn from (as in test_methods).
    for name, data, steps in (("facts", toy_data, 150), ("chat", chats, 250)):
        config = write_manifest(folder / name, finetunejob(toy_model, data, training={"maxSteps": steps}))
        runs[name] = start_train(
            config, folder / name / "out", "--metrics-port", str(free_port()), log=folder / f"{name}.log"
        )
    for name, process in runs.items():
        assert process.wait(timeout=300) == 0, (folder / f"{name}.log").read_text()
    # The chat adapter is served under a name with a '.', which peft's own adapter names may not hold.
    return {{"chat": "chat.v1"}.get(name, name): folder / name / "out" / "adapter" for name in runs}


@contextlib.contextmanager
def serving(toy_model: Path, log: Path, *args: str, adapters: dict[str, Path] | None = None) -> Iterator[Client]:
    """``kubetune serve`` on the toy model with ``adapters`` and ``args``, ready; stopped by SIGTERM (exit 0)."""
    port = free_port()
    command = [sys.executable, "-m", "kubetune_cli.main", "serve", "--model", str(toy_model)]
    for name, path in (adapters or {}).items():
        command += ["--adapter", f"{name}={path}"]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=train_env(), stdout=out, stderr=subprocess.STDOUT)
    client = Client(port)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"kubetune serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            return client.get("/readyz").status == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=60, what="kubetune serve to be ready")
        yield client
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=15) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(toy_model: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    limits = ["--max-new-tokens-limit", "64", "--read-timeout", str(READ_TIMEOUT), "--max-queued", "256"]
    with serving(toy_model, log, *limits, adapters=adapters) as client:
        yield client


def complete(server: Client, model: str, obj: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": toy_prompt(obj), "max_tokens": 3, "temperature": 0, **extra}
    reply = server.post("/v1/completions", body)
    assert reply.status == 200, reply.raw
    result: dict[str, Any] = reply.json
    return result


def chat(server: Client, model: str, obj: str, **extra: Any) -> dict[str, Any]:
    reply = server.post("/v1/chat/completions", toy_chat(model, obj, **extra))
    assert reply.status == 200, reply.raw
    result: dict[str, Any] = reply.json
    return result


def events(reply: Reply) -> list[Any]:
    """The JSON chunks of a Server-Sent Events answer, which must end with ``data: [DONE]``."""
    assert reply.status == 200, reply.raw
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in reply.raw.decode().split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_usage(result: dict[str, Any]) -> None:
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_health_and_readiness(server: Client) -> None:
    assert server.get("/healthz").status == 200
    assert server.get("/readyz").status == 200


def test_models_lists_the_base_and_every_adapter(server: Client) -> None:
    reply = server.get("/v1/models")
    assert reply.status == 200
    listing = reply.json
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["base", "facts", "chat.v1"]
    assert all(m["object"] == "model" for m in listing["data"])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers' own, via peft
def test_completions_answer_with_the_adapter_and_not_the_base(
    server: Client, toy_model: Path, adapters: dict[str, Path]
) -> None:
    adapter = [complete(server, "facts", obj) for obj in FACTS]
    base = [complete(server, "base", obj) for obj in FACTS]
    adapter_rate = sum(r["choices"][0]["text"].strip() == FACTS[o] for r, o in zip(adapter, FACTS, strict=True))
    base_rate = sum(r["choices"][0]["text"].strip() == FACTS[o] for r, o in zip(base, FACTS, strict=True))
    assert adapter_rate / len(FACTS) >= MIN_MATCH
    assert base_rate == 0
    for result in adapter + base:
        assert result["object"] == "text_completion"
        assert_usage(result)
    assert {r["model"] for r in adapter} == {"facts"}
    # The server's answers are exactly those of the adapter loaded in this process.
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model), adapters["facts"])
    expected = greedy_answers(model, AutoTokenizer.from_pretrained(toy_model), [toy_prompt(o) for o in FACTS])
    assert [r["choices"][0]["text"].strip() for r in adapter] == expected


def test_chat_answers_with_the_chat_adapter_and_not_the_base(server: Client) -> None:
    adapter = [chat(server, "chat.v1", obj) for obj in FACTS]
    base = [chat(server, "base", obj) for obj in FACTS]
    right = sum(r["choices"][0]["message"]["content"].strip() == FACTS[o] for r, o in zip(adapter, FACTS, strict=True))
    wrong = sum(r["choices"][0]["message"]["content"].strip() == FACTS[o] for r, o in zip(base, FACTS, strict=True))
    assert right / len(FACTS) >= MIN_MATCH
    assert wrong == 0
    first = adapter[0]
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] == "stop"  # the adapter learned to end its answer
    for result in adapter:
        assert_usage(result)


def test_streamed_chat_is_the_same_text(server: Client) -> None:
    for obj in list(FACTS)[:5]:
        for model in ("chat.v1", "base"):
            whole = chat(server, model, obj, max_tokens=6)
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"what is the color and size of {obj} ?"}],
                "max_tokens": 6,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunks = events(server.post("/v1/chat/completions", body))
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            assert text == whole["choices"][0]["message"]["content"]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finish[-1] == whole["choices"][0]["finish_reason"]
            assert chunks[-1]["usage"] == whole["usage"]


def test_streamed_completion_with_a_stop_sequence_is_the_same_text(server: Client) -> None:
    obj = next(iter(FACTS))
    color, size = FACTS[obj].split()
    whole = complete(server, "facts", obj, stop=[size])
    assert whole["choices"][0]["text"].strip() == color
    assert whole["choices"][0]["finish_reason"] == "stop"
    body = {"model": "facts", "prompt": toy_prompt(obj), "max_tokens": 3, "temperature": 0, "stop": [size]}
    chunks = events(server.post("/v1/completions", body | {"stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_sampling_with_a_seed_repeats(server: Client) -> None:
    obj = next(iter(FACTS))
    first = complete(server, "base", obj, temperature=1.0, seed=7, max_tokens=8)
    second = complete(server, "base", obj, temperature=1.0, seed=7, max_tokens=8)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 8


def metric(server: Client, name: str, **labels: str) -> float:
    """A sample's value from ``/metrics`` (0 when absent)."""
    reply = server.get("/metrics")
    assert reply.status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.raw.decode())
        for s in family.samples
    }
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_requests_are_batched_and_answer_as_one_at_a_time(server: Client) -> None:
    """Requests of several adapters, streamed or not, generated together: each answer as when asked alone."""
    objects = list(FACTS)[:12]
    # Prompts of different lengths, so that the batched caches are padded.
    prompts = [toy_prompt(obj) + " ." * (index % 5) for index, obj in enumerate(objects)]
    asks = [(model, prompt, stream) for prompt in prompts for model, stream in (("facts", False), ("base", True))]

    def ask(model: str, prompt: str, stream: bool) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        if not stream:
            reply = server.post("/v1/completions", body)
            assert reply.status == 200, reply.raw
            return str(reply.json["choices"][0]["text"])
        return "".join(c["choices"][0]["text"] for c in events(server.post("/v1/completions", body | {"stream": True})))

    alone = [ask(*a) for a in asks]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, a=a: together.__setitem__(i, ask(*a))) for i, a in enumerate(asks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [together.get(i) for i in range(len(asks))] == alone
    assert metric(server, "kubetune_serve_largest_batch") > 1  # they were generated together


def test_a_client_that_stops_reading_does_not_delay_another(server: Client) -> None:
    body = {"model": "base", "prompt": "a b c", "max_tokens": 64, "temperature": 0, "stream": True}
    stalled = []
    for _ in range(4):
        connection = socket.socket()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        connection.connect(("127.0.0.1", int(server.base.rsplit(":", 1)[1])))
        data = json.dumps(body).encode()
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        stalled.append(connection)  # never read
    try:
        started = time.monotonic()
        whole = complete(server, "facts", next(iter(FACTS)), max_tokens=64)
        assert time.monotonic() - started < 2.0
        assert whole["usage"]["completion_tokens"] > 0
    finally:
        for connection in stalled:
            connection.close()


def raw_exchange(server: Client, data: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection, read until the server closes it: what came back, and when."""
    with socket.create_connection(("127.0.0.1", int(server.base.rsplit(":", 1)[1])), timeout=wait) as connection:
        started = time.monotonic()
        connection.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
        return received, time.monotonic() - started


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closed(server: Client) -> None:
    received, took = raw_exchange(
        server, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model": '
    )
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 2


def test_headers_that_never_end_get_the_connection_closed(server: Client) -> None:
    received, took = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert received == b""
    assert took < READ_TIMEOUT + 2


def test_idle_connections_do_not_keep_a_request_out(server: Client) -> None:
    port = int(server.base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        started = time.monotonic()
        assert complete(server, "facts", next(iter(FACTS)))["usage"]["completion_tokens"] > 0
        assert time.monotonic() - started < 2.0
    finally:
        for connection in idle:
            connection.close()


def test_100_concurrent_requests_are_all_answered(server: Client) -> None:
    statuses: list[int | str] = []

    def ask(index: int) -> None:
        body = {"model": "base", "prompt": f"q {index}", "max_tokens": 2, "temperature": 0}
        try:
            statuses.append(server.post("/v1/completions", body).status)
        except OSError as exc:  # a reset, a refused connection
            statuses.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 100


@pytest.mark.parametrize("method", ["HEAD", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_json_and_no_python_version(server: Client, method: str) -> None:
    reply = server.request(method, "/v1/models")
    assert reply.status == 405
    assert reply.headers["Server"] == "kubetune-serve"
    assert "python" not in json.dumps(reply.headers).lower()
    if method != "HEAD":
        assert_openai_error(reply, 405)


@pytest.mark.parametrize(
    "line", [b"GARBAGE\r\n\r\n", b"GET /v1/models HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\r\n\r\n"]
)
def test_garbage_gets_a_json_400_without_python_version(server: Client, line: bytes) -> None:
    received, _ = raw_exchange(server, line)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", received
    assert b"Server: kubetune-serve" in head
    assert b"python" not in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}


def assert_openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.raw
    assert reply.headers["Content-Type"] == "application/json"
    error: dict[str, Any] = reply.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in reply.raw.decode()
    return error


def test_unknown_model_is_404(server: Client) -> None:
    reply = server.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    error = assert_openai_error(reply, 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert_openai_error(server.post("/v1/completions", {"model": "nope", "prompt": "hi"}), 404)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", b"\xff\xfe", None),
        ("/v1/chat/completions", {"model": "chat.v1"}, "messages"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": "hi"}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "chat.v1", "messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
        ),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "max_tokens": 65}, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "stop": 5}, "stop"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES}, "model"),
        ("/v1/chat/completions", {"model": 1, "messages": MESSAGES}, "model"),
        ("/v1/completions", {"model": "facts"}, "prompt"),
        ("/v1/completions", {"model": "facts", "prompt": ["a", "b"]}, "prompt"),
        # what the server does not do is refused, not ignored
        ("/v1/completions", {"model": "facts", "prompt": "hi", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"model": "facts", "prompt": "hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": "facts", "prompt": "hi", "suffix": "!"}, "suffix"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"model": "chat.v1", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        (
            "/v1/chat/completions",
            {"model": "chat.v1", "messages": MESSAGES, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"model": "chat.v1", "messages": MESSAGES, "presence_penalty": 0.5},
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"model": "chat.v1", "messages": [*MESSAGES, {"role": "wizard", "content": "x"}]},
            "messages[1].role",
        ),
        # hostile bodies that were answered 500 (tests/hostile/serve-*.yaml has them against a stand-in engine)
        pytest.param(
            "/v1/completions",
            {"model": "facts", "prompt": "hi", "max_tokens": 2, "seed": 2**70},
            "seed",
            id="seed-beyond-int64",
        ),
        pytest.param(
            "/v1/completions",
            b'{"model": "facts", "prompt": "hi", "max_tokens": 1' + b"0" * 4999 + b"}",
            None,
            id="5000-digit-number",
        ),
        pytest.param(
            "/v1/chat/completions",
            b'{"model": "chat.v1", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            None,
            id="nested-100000-deep",
        ),
        pytest.param(
            "/v1/completions",
            b'{"model": "facts", "prompt": "hi \\ud800", "max_tokens": 2}',
            "prompt",
            id="lone-surrogate-prompt",
        ),
        pytest.param(
            "/v1/chat/completions",
            b'{"model": "chat.v1", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
            "messages[0].content",
            id="lone-surrogate-chat",
        ),
    ],
)
def test_bad_requests_are_400(server: Client, path: str, body: Any, param: str | None) -> None:
    reply = server.post(path, raw=body) if isinstance(body, bytes) else server.post(path, body)
    assert assert_openai_error(reply, 400)["param"] == param


def test_unknown_endpoint_and_method(server: Client) -> None:
    assert_openai_error(server.get("/v1/nothing"), 404)
    assert_openai_error(server.get("/v1/chat/completions"), 405)


def test_metrics_count_requests_and_tokens(server: Client) -> None:
    complete(server, "facts", next(iter(FACTS)))
    server.post("/v1/completions", {"model": "nope", "prompt": "hi"})
    reply = server.get("/metrics")
    assert reply.status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.raw.decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("kubetune_serve_requests_total", endpoint="/v1/completions", model="facts", status="200") >= 1
    assert value("kubetune_serve_requests_total", endpoint="/v1/completions", model="", status="404") >= 1
    assert value("kubetune_serve_generated_tokens_total", model="facts") >= 2
    assert value("kubetune_serve_request_duration_seconds_count", endpoint="/v1/completions") >= 2


def test_adapters_flag_is_checked(tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert parse_adapters([f"x={adapter}"], "base") == {"x": adapter}
    for bad in (["x"], [f"base={adapter}"], [f"x={adapter}", f"x={adapter}"], [f"y={tmp_path}"], [f"={adapter}"]):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapters(bad, "base")


def test_chat_takes_the_limit_as_its_default_max_tokens() -> None:
    assert parse_sampling({}, default_max_tokens=64, limit=64) == Sampling(max_tokens=64)
    assert (
        parse_sampling({"max_completion_tokens": 3, "max_tokens": 9}, default_max_tokens=16, limit=64).max_tokens == 3
    )


# --- runtime adapters (vLLM's endpoints), the adapters file, and the queue bound ------------------------


@pytest.fixture(scope="module")
def runtime_dir(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --runtime-adapters folder: a copy of ``facts``, one whose base does not match, and a link out."""
    root = tmp_path_factory.mktemp("runtime")
    folder = root / "adapters"
    shutil.copytree(adapters["facts"], folder / "facts-copy")
    shutil.copytree(adapters["facts"], folder / "other-base")
    config = json.loads((folder / "other-base" / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (folder / "other-base" / "adapter_config.json").write_text(json.dumps(config))
    (folder / "empty").mkdir()
    shutil.copytree(adapters["facts"], root / "outside")
    (folder / "link-out").symlink_to(root / "outside")
    (root / "adapters.json").write_text(
        json.dumps({"filed": "facts-copy", "broken": "empty", "escaping": "../outside"})
    )
    return folder


@pytest.fixture(scope="module")
def runtime_server(toy_model: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A server with runtime adapters from ``runtime_dir`` and its adapters file; one sequence at a time, one waiting."""
    log = tmp_path_factory.mktemp("runtime-log") / "serve.log"
    args = ["--runtime-adapters", str(runtime_dir), "--adapters-file", str(runtime_dir.parent / "adapters.json")]
    args += ["--max-batch", "1", "--max-queued", "1", "--max-new-tokens-limit", "64"]
    with serving(toy_model, log, *args) as client:
        yield client


def model_ids(server: Client) -> dict[str, Any]:
    reply = server.get("/v1/models")
    assert reply.status == 200
    return {m["id"]: m.get("parent") for m in reply.json["data"]}


def test_the_adapters_file_is_loaded_before_ready_and_what_fails_is_named(runtime_server: Client) -> None:
    assert model_ids(runtime_server) == {"base": None, "filed": "base"}
    ready = runtime_server.get("/readyz")
    assert ready.status == 200
    assert b"broken" in ready.raw
    assert b"escaping" in ready.raw
    assert metric(runtime_server, "kubetune_serve_adapters_loaded") == 1


def test_runtime_adapters_load_answer_and_unload(runtime_server: Client, server: Client) -> None:
    reply = runtime_server.post("/v1/load_lora_adapter", {"lora_name": "rt.1", "lora_path": "facts-copy"})
    assert reply.status == 200, reply.raw
    assert reply.raw.decode() == "Success: LoRA adapter 'rt.1' added successfully."
    assert model_ids(runtime_server) == {"base": None, "filed": "base", "rt.1": "base"}
    assert metric(runtime_server, "kubetune_serve_adapters_loaded") == 2
    # The adapter loaded at run time answers as the same adapter loaded at start-up by the other server.
    for obj in list(FACTS)[:4]:
        assert complete(runtime_server, "rt.1", obj)["choices"] == complete(server, "facts", obj)["choices"]
    again = runtime_server.post("/v1/load_lora_adapter", {"lora_name": "rt.1", "lora_path": "facts-copy"})
    assert "has already been loaded" in assert_openai_error(again, 400)["message"]
    reply = runtime_server.post("/v1/unload_lora_adapter", {"lora_name": "rt.1"})
    assert reply.status == 200, reply.raw
    assert model_ids(runtime_server) == {"base": None, "filed": "base"}
    assert_openai_error(runtime_server.post("/v1/completions", {"model": "rt.1", "prompt": "hi"}), 404)
    assert_openai_error(runtime_server.post("/v1/unload_lora_adapter", {"lora_name": "rt.1"}), 404)
    assert_openai_error(runtime_server.post("/v1/unload_lora_adapter", {"lora_name": "base"}), 400)
    assert metric(runtime_server, "kubetune_serve_adapters_loaded") == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"lora_name": "x", "lora_path": "../outside"}, "lora_path"),
        ({"lora_name": "x", "lora_path": "link-out"}, "lora_path"),
        ({"lora_name": "x", "lora_path": "/etc"}, "lora_path"),
        ({"lora_name": "x", "lora_path": "empty"}, "lora_path"),
        ({"lora_name": "x", "lora_path": "other-base"}, "lora_path"),
        ({"lora_name": "base", "lora_path": "facts-copy"}, "lora_name"),
        ({"lora_name": "filed", "lora_path": "facts-copy"}, "lora_name"),
        ({"lora_name": " ", "lora_path": "facts-copy"}, "lora_name"),
        ({"lora_path": "facts-copy"}, "lora_name"),
    ],
)
def test_runtime_adapters_outside_the_folder_or_unloadable_are_refused(
    runtime_server: Client, body: dict[str, str], param: str
) -> None:
    error = assert_openai_error(runtime_server.post("/v1/load_lora_adapter", body), 400)
    assert error["param"] == param
    assert set(model_ids(runtime_server)) == {"base", "filed"}


def test_runtime_adapters_are_off_without_the_flag(server: Client) -> None:
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"}), 404)
    assert_openai_error(server.post("/v1/unload_lora_adapter", {"lora_name": "facts"}), 404)


def test_requests_beyond_the_queue_bound_get_429(runtime_server: Client) -> None:
    statuses: list[int] = []
    errors: list[dict[str, Any]] = []

    def ask() -> None:
        reply = runtime_server.post("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 64})
        statuses.append(reply.status)
        if reply.status != 200:
            errors.append(reply.json["error"])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert 200 in statuses
    assert 429 in statuses
    assert set(statuses) == {200, 429}
    assert {e["type"] for e in errors} == {"rate_limit_exceeded"}


# --- the HTTP layer alone, with an engine that never ends ------------------------------------------------


class EndlessEngine:
    """An engine whose sequences emit 64 KiB pieces until they are cancelled (which it records)."""

    base_name = "base"
    names = ("base",)
    adapters = ()
    created = 0
    queued = 0

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def encode_prompt(self, prompt: str) -> list[int]:
        return [9] if prompt == "short" else [1, 2]

    def check_length(self, ids: list[int], sampling: Sampling) -> None:
        pass

    def submit(self, sequence: Sequence) -> None:
        if sequence.ids == [9]:  # a short answer, at once
            sequence.emit("ok")
            sequence.emit(None)
            return

        def run() -> None:
            while not sequence.cancelled:
                sequence.emit("x" * 65536)
                time.sleep(0.01)
            self.cancelled.set()

        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        pass


@contextlib.contextmanager
def endless_server(limits: Limits) -> Iterator[tuple[Client, EndlessEngine]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(base_name="base", limits=limits)
    engine = EndlessEngine()
    server.engine = cast(Any, engine)
    server.ready = True
    port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(timeout=30)
    try:
        yield Client(port), engine
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_a_client_that_reads_nothing_is_dropped_and_its_generation_cancelled() -> None:
    with endless_server(Limits(write_timeout=3, request_timeout=60)) as (client, engine):
        body = json.dumps({"model": "base", "prompt": "hi", "stream": True}).encode()
        port = int(client.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            started = time.monotonic()
            time.sleep(1)  # the socket's buffers fill up: the server's writes to it wait
            assert not engine.cancelled.is_set()
            # Meanwhile another client is answered at once.
            asked = time.monotonic()
            reply = client.post("/v1/completions", {"model": "base", "prompt": "short"})
            assert reply.status == 200
            assert reply.json["choices"][0]["text"] == "ok"
            assert time.monotonic() - asked < 0.5
            # The one that reads nothing is dropped, and its generation cancelled.
            assert engine.cancelled.wait(timeout=30)
            assert 3 <= time.monotonic() - started < 10
            connection.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while connection.recv(1 << 20):
                    pass  # what was buffered, then the end: the server closed the connection


def test_an_answer_past_the_request_timeout_gets_504_and_its_generation_cancelled() -> None:
    with endless_server(Limits(request_timeout=1)) as (client, engine):
        started = time.monotonic()
        reply = client.post("/v1/completions", {"model": "base", "prompt": "hi"})
        assert reply.status == 504
        assert reply.json["error"]["code"] == "request_timeout"
        assert 1 <= time.monotonic() - started < 5
        assert engine.cancelled.wait(timeout=5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers' own, via peft
def test_loading_and_unloading_adapters_does_not_change_answers_in_flight(
    toy_model: Path, adapters: dict[str, Path]
) -> None:
    engine = Engine(toy_model, {"facts": adapters["facts"]}, base_name="base", device="cpu", max_batch=8)
    engine.start()
    try:
        asks = [(model, obj) for obj in list(FACTS)[:4] for model in ("facts", "base")]
        sampling = Sampling(max_tokens=48, temperature=0)

        def answer(model: str, obj: str) -> str:
            return "".join(engine.generate(model, engine.encode_prompt(toy_prompt(obj)), sampling, Outcome()))

        alone = [answer(*a) for a in asks]
        together: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i, a=a: together.__setitem__(i, answer(*a))) for i, a in enumerate(asks)
        ]
        for thread in threads:
            thread.start()
        for round_ in range(3):  # while they generate, adapters come and go
            engine.load_adapter(f"extra{round_}", adapters["chat.v1"]).result(timeout=30)
            engine.unload_adapter(f"extra{round_}").result(timeout=30)
        engine.load_adapter("kept", adapters["chat.v1"]).result(timeout=30)
        for thread in threads:
            thread.join(timeout=60)
        assert [together.get(i) for i in range(len(asks))] == alone
        assert engine.names == ["base", "facts", "kept"]
        engine.unload_adapter("facts").result(timeout=30)
        engine.unload_adapter("kept").result(timeout=30)
        assert engine.names == ["base"]
        base = [(obj, text) for (model, obj), text in zip(asks, alone, strict=True) if model == "base"]
        assert [answer("base", obj) for obj, _ in base] == [text for _, text in base]
    finally:
        engine.stop()


def test_the_adapters_file_may_be_missing_but_not_malformed(tmp_path: Path) -> None:
    assert read_adapters_file(tmp_path / "missing.json") == {}
    (tmp_path / "empty.json").write_text("")
    assert read_adapters_file(tmp_path / "empty.json") == {}
    (tmp_path / "good.json").write_text('{"a": "x"}')
    assert read_adapters_file(tmp_path / "good.json") == {"a": "x"}
    for bad in ("{not json", '["a"]'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="--adapters-file"):
            read_adapters_file(tmp_path / "bad.json")


def test_a_start_up_adapter_that_cannot_load_exits_2(toy_model: Path, runtime_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "kubetune_cli.main",
        "serve",
        "--model",
        str(toy_model),
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(
        [*command, "--adapter", f"x={runtime_dir / 'other-base'}"],
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot load" in result.stderr


def test_requests_past_the_connection_cap_get_503_and_the_rest_are_served_again() -> None:
    with endless_server(Limits(max_connections=5)) as (client, _):
        port = int(client.base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        try:
            time.sleep(0.2)  # accepted
            reply = client.post("/v1/completions", {"model": "base", "prompt": "short"})
            assert assert_openai_error(reply, 503)["code"] == "too_many_connections"
        finally:
            for connection in idle:
                connection.close()
        time.sleep(0.2)
        assert client.post("/v1/completions", {"model": "base", "prompt": "short"}).status == 200
