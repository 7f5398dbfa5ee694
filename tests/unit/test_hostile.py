"""The hostile-input corpus (tests/hostile/), every harness but ``train``: each input refused as its case expects.

Nothing here needs torch or leaves 127.0.0.1: datasets are read by the loader itself, sources are
located among claims made in a temporary folder, ``kubetune fetch-model`` and ``kubetune pull``
run in this process against loopback servers that misbehave on purpose, and the serving tests
talk to ``kubetune serve``'s HTTP layer with a stand-in engine. The ``train`` cases are in
tests/trainer/test_hostile.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import http.server
import json
import os
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from kubetune_api import ALLOW_LOCAL_PATHS, TrainerConfig
from kubetune_trainer import archive, fetch
from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT, PermanentError, ProblemList
from kubetune_trainer.publishing.commands import fetch_model_main, pull_main
from kubetune_trainer.serving.engine import Sequence
from kubetune_trainer.serving.protocol import Sampling
from kubetune_trainer.serving.server import Limits, Server
from kubetune_trainer.training.data import load
from kubetune_trainer.training.model import weights_problem
from tests.factories import serve_folder, serve_s3
from tests.hostile import (
    HARNESSES,
    HostileCase,
    HostileRegistry,
    build_dataset,
    build_files,
    build_image,
    fill,
    load_hostile,
    mounts_of,
    tar_layer,
)

pytestmark = pytest.mark.unit

TERMINATION = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def ids(case: HostileCase) -> str:
    return case.name


def test_the_corpus_covers_every_harness() -> None:
    cases = load_hostile()
    assert len(cases) >= 30
    assert {case.harness for case in cases} == set(HARNESSES)
    assert all(case.exit in (None, EXIT_PERMANENT) for case in cases), "every hostile input is a permanent failure"
    assert all(case.expect.get("status") in (None, 400) for case in cases), "every hostile request is a client error"


# ---------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("case", load_hostile("data"), ids=ids)
def test_hostile_data_is_refused_naming_the_file(
    case: HostileCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (case.spec.get("limits") or {}).items():
        monkeypatch.setattr(load, name, value)
    path = build_dataset(tmp_path, case.spec["dataset"])
    with pytest.raises(PermanentError) as raised:
        load.read_split(path, "train")
    assert case.exit == EXIT_PERMANENT
    assert raised.value.problems[0].field == "spec.dataset.source"
    case.assert_reason(str(raised.value))


def test_a_long_line_is_refused_without_being_held_whole(tmp_path: Path) -> None:
    """A 70 MiB line costs at most twice the 64 MiB bound while being read, never a parsed copy of it."""
    path = build_dataset(tmp_path, {"name": "train.jsonl", "long_line": 70 << 20})
    tracemalloc.start()
    try:
        with pytest.raises(PermanentError, match="line 1 is longer than 64 MiB"):
            load.read_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * load.MAX_LINE_BYTES + (8 << 20), f"peak {peak >> 20} MiB"


def test_lines_up_to_the_bound_and_byte_order_marks_are_read(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\n{"text": "b \xe2\x80\xa8 c"}')  # U+2028 inside a string
    assert load.read_file(path) == [{"text": "a"}, {"text": "b \u2028 c"}]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('text,label\n"a ""quoted""\nline",1\nb,2\n', encoding="utf-8")
    assert load.read_file(csv_path) == [{"text": 'a "quoted"\nline', "label": "1"}, {"text": "b", "label": "2"}]


def test_the_record_bound_counts_across_the_files_of_a_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "MAX_RECORDS", 5)
    for name in ("train-0.jsonl", "train-1.jsonl"):
        build_dataset(tmp_path / "data", {"name": name, "rows": 3})
    with pytest.raises(
        PermanentError, match=r"train-1.jsonl brings the split above 5 records, the most a job reads \(2 were left"
    ):
        load.read_split(tmp_path / "data", "train")


def test_parquet_rows_are_counted_from_the_footer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(pa.table({"text": [f"example {i}" for i in range(20)]}), tmp_path / "train.parquet")
    assert len(load.read_file(tmp_path / "train.parquet")) == 20
    monkeypatch.setattr(load, "MAX_RECORDS", 10)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the rows were read"))
    with pytest.raises(PermanentError, match="above 10 records"):
        load.read_file(tmp_path / "train.parquet")


# ------------------------------------------------------------------------------------- sources


def trainer_config(tmp_path: Path, **extra: Any) -> TrainerConfig:
    body = {
        "jobName": "t",
        "spec": {"model": {"source": "hf://org/base"}, "dataset": {"source": "hf://org/data"}},
        "mounts": mounts_of(tmp_path),
        **extra,
    }
    return TrainerConfig.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def locate(tmp_path: Path, uri: str, kind: str = "dataset") -> tuple[Any, list[str]]:
    problems = ProblemList()
    found = fetch.locate(uri, kind=kind, secret_ref=None, config=trainer_config(tmp_path), problems=problems)  # type: ignore[arg-type]
    return found, [str(p) for p in problems.problems]


@pytest.mark.parametrize("case", load_hostile("source"), ids=ids)
def test_hostile_sources_are_refused_naming_the_field(case: HostileCase, tmp_path: Path) -> None:
    build_files(tmp_path, case.spec)
    found, problems = locate(tmp_path, case.spec["uri"], case.spec["kind"])
    assert case.exit == EXIT_PERMANENT
    assert found is None, f"{case.name}: located as {found}"
    assert problems[0].startswith(case.expect["field"] + ": "), problems
    case.assert_reason(problems[0])


def test_links_that_stay_inside_the_claim_are_followed(tmp_path: Path) -> None:
    """A Hub cache on a claim links its snapshots to blobs elsewhere in the claim; a ConfigMap mount links its keys."""
    build_files(
        tmp_path,
        {
            "files": {
                "claims/models/hub/blobs/abc": '{"text": "cached"}',
                "configmaps/small/..2024_01_01/train.jsonl": '{"text": "small"}',
            },
            "links": {
                "claims/models/hub/snapshots/main/train.jsonl": "../../blobs/abc",
                "configmaps/small/..data": "..2024_01_01",
                "configmaps/small/train.jsonl": "..data/train.jsonl",
            },
        },
    )
    found, problems = locate(tmp_path, "pvc://models/hub/snapshots/main")
    assert problems == []
    assert found.path == tmp_path / "claims/models/hub/snapshots/main"
    assert found.root == (tmp_path / "claims/models").resolve()
    assert load.read_split(found.path, "train") == [{"text": "cached"}]
    found, problems = locate(tmp_path, "configmap://small/train.jsonl")
    assert problems == []
    assert load.read_file(found.path) == [{"text": "small"}]


# --------------------------------------------------------------------------------- fetch-model


@pytest.fixture
def archive_site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server for the files of a folder (model archives)."""
    site = tmp_path / "site"
    site.mkdir()
    with serve_folder(site) as url:
        yield site, url


def run_command(
    main: Any, args: argparse.Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run a publishing command in this process: its exit code and termination message."""
    message = tmp_path / "meta" / f"termination-{os.urandom(4).hex()}"
    message.parent.mkdir(exist_ok=True)
    monkeypatch.setenv(TERMINATION, str(message))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "meta"))
    monkeypatch.delenv(fetch.CACHE_DIR_ENV, raising=False)
    code = int(main(args))
    return code, message.read_text(encoding="utf-8") if message.exists() else ""


@pytest.mark.parametrize("case", load_hostile("fetch-model"), ids=ids)
def test_hostile_models_are_not_fetched(
    case: HostileCase, tmp_path: Path, archive_site: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, url = archive_site
    build_files(tmp_path, case.spec)
    archive = None
    if "archive" in case.spec:
        spec = case.spec["archive"]
        archive = tar_layer(spec.get("entries") or [], zeros=int(spec.get("zeros", 0)))
        (site / "model.tar.gz").write_bytes(archive)
    uri = fill(tmp_path, str(case.spec["uri"])).replace("{archive}", f"{url}/model.tar.gz")
    config: dict[str, Any] = {
        "kind": "TrainerConfig",
        "jobName": "t",
        "spec": {"model": {"source": uri}, "dataset": {"source": "hf://org/data"}},
        "mounts": mounts_of(tmp_path),
        "allowPrivateAddresses": True,
    }
    with contextlib.ExitStack() as stack:
        if "s3" in case.spec:  # objects in a bucket of a real S3 server on loopback, its keys in Secret s3-keys
            s3 = stack.enter_context(serve_s3())
            objects = dict(case.spec["s3"].get("objects") or {})
            if archive is not None:
                objects[case.spec["s3"]["archive_key"]] = archive
            s3.put(case.spec["s3"]["bucket"], objects)
            config["spec"]["model"]["secretRef"] = "s3-keys"
            config["mounts"]["secrets"] = {"s3-keys": str(s3.write_secret(tmp_path / "secrets" / "s3-keys"))}
        (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        into = tmp_path / "serving" / "model"
        args = argparse.Namespace(config=str(tmp_path / "config.json"), into=str(into))
        code, message = run_command(fetch_model_main, args, tmp_path, monkeypatch)
    assert code == case.exit, message
    case.assert_reason(message)
    assert not into.exists() or not [p for p in into.rglob("*") if not p.name.startswith(".")], "files arrived"


def test_fetch_model_follows_links_inside_its_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_files(
        tmp_path,
        {
            "files": {"claims/models/blobs/w": "weights", "claims/models/llama/config.json": "{}"},
            "links": {"claims/models/llama/model.safetensors": "../blobs/w"},
        },
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "kind": "TrainerConfig",
                "jobName": "t",
                "spec": {"model": {"source": "pvc://models/llama"}, "dataset": {"source": "hf://org/data"}},
                "mounts": mounts_of(tmp_path),
            }
        ),
        encoding="utf-8",
    )
    args = argparse.Namespace(config=str(tmp_path / "config.json"), into=str(tmp_path / "into"))
    code, message = run_command(fetch_model_main, args, tmp_path, monkeypatch)
    assert code == EXIT_OK, message
    assert (tmp_path / "into" / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / "into" / "model.safetensors").is_symlink()


# ---------------------------------------------------------------------------------------- pull


def pull(registry: HostileRegistry, into: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    args = argparse.Namespace(reference=registry.reference, folder=str(into), docker_config=None)
    return run_command(pull_main, args, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", load_hostile("pull"), ids=ids)
def test_hostile_registry_answers_are_refused(
    case: HostileCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    into = tmp_path / "pulled" / "adapter"
    with HostileRegistry(build_image(case.spec["registry"])).running() as registry:
        code, message = pull(registry, into, tmp_path, monkeypatch)
    assert code == case.exit, message
    case.assert_reason(message)
    assert {p.name for p in tmp_path.iterdir()} <= {"pulled", "meta"}, "nothing may land beside the target"
    assert not [p for p in into.rglob("*") if not p.name.startswith(".")], "nothing may land in the target"


def test_the_hostile_registry_serves_a_good_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same registry and harness pull a well-formed image, links inside data/ included."""
    entries = [
        {"name": "data/adapter_config.json", "body": '{"r": 4}'},
        {"name": "data/sub/tokenizer.json", "body": "{}"},
        {"name": "data/tokenizer.json", "symlink": "sub/tokenizer.json"},
    ]
    image = build_image({"layers": [{"entries": entries}]})
    with HostileRegistry(image).running() as registry:
        code, message = pull(registry, tmp_path / "into", tmp_path, monkeypatch)
    assert code == EXIT_OK, message
    assert (tmp_path / "into" / "adapter_config.json").read_text() == '{"r": 4}'
    assert (tmp_path / "into" / "tokenizer.json").read_text() == "{}"


def test_the_unpacked_size_has_a_configurable_maximum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(tar_layer([{"name": "data/w", "body": "w" * 20_000}]))
    assert archive.unpacked_limit(1000) == 100 * 1000 + (64 << 20)
    monkeypatch.setenv(archive.MAX_UNPACKED_ENV, "15000")
    assert archive.unpacked_limit(1000) == 15000
    (tmp_path / "out").mkdir()
    with pytest.raises(archive.ArchiveError, match=r"unpacks to more than 14\.6 KiB"):
        archive.unpack(layer, tmp_path / "out")
    assert not (tmp_path / "out" / "data" / "w").exists(), "refused by its header, before it is written"
    monkeypatch.setenv(archive.MAX_UNPACKED_ENV, "lots")
    with pytest.raises(archive.ArchiveError, match="not a number of bytes"):
        archive.unpacked_limit(1)


# --------------------------------------------------------------------------------------- serve


class StandInEngine:
    """The engine's interface with what the real one does to a request's values, and no model.

    Text reaches the tokenizer as UTF-8 (which a lone surrogate cannot be), and a seed reaches
    ``torch.Generator.manual_seed`` (which takes 64 bits); both are done here the same way.
    """

    base_name = "base"
    names = ("base",)
    created = 0

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(prompt.encode("utf-8"))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list("".join(m["content"] for m in messages).encode("utf-8"))

    def check_length(self, ids: list[int], sampling: Sampling) -> None:
        pass

    adapters = ()
    queued = 0

    def submit(self, sequence: Sequence) -> None:
        if sequence.sampling.seed is not None:
            struct.pack("<q", sequence.sampling.seed)
        outcome = sequence.outcome
        outcome.prompt_tokens, outcome.completion_tokens, outcome.finish_reason = len(sequence.ids), 1, "stop"
        sequence.emit("ok")
        sequence.emit(None)

    def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def served() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(base_name="base", limits=Limits(max_tokens=64))
    server.engine = cast(Any, StandInEngine())
    server.ready = True
    yield asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(timeout=30)
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


def post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
        return response.status, answer
    finally:
        connection.close()


def request_body(spec: dict[str, Any]) -> bytes:
    if "body" in spec:
        return str(spec["body"]).encode()
    generate = spec["generate"]
    field = generate["field"]
    if "digits" in generate:
        value = b"1" + b"0" * (int(generate["digits"]) - 1)
    else:
        depth = int(generate["depth"])
        value = b"[" * depth + b"]" * depth
    return b'{"model": "base", "prompt": "hi", "%s": %s}' % (field.encode(), value)


def test_the_stand_in_engine_answers_a_good_request(served: int) -> None:
    status, answer = post(served, "/v1/completions", b'{"model": "base", "prompt": "hi", "seed": 7, "max_tokens": 2}')
    assert status == 200, answer
    assert answer["choices"][0]["text"] == "ok"


@pytest.mark.parametrize("case", load_hostile("serve"), ids=ids)
def test_hostile_requests_are_answered_400(case: HostileCase, served: int) -> None:
    status, answer = post(served, case.spec["path"], request_body(case.spec))
    assert status == case.expect["status"], answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if "param" in case.expect:
        assert error["param"] == case.expect["param"]
    case.assert_reason(error["message"])


# -------------------------------------------------------------------------------------- model


def test_pickled_weights_are_refused_and_safetensors_are_required(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    problem = weights_problem(tmp_path)
    assert problem is not None
    assert "only as pickle files (pytorch_model.bin)" in problem
    (tmp_path / "pytorch_model.bin").unlink()
    assert "holds no *.safetensors weights" in (weights_problem(tmp_path) or "")
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    (tmp_path / "training_args.bin").write_bytes(b"pickle beside safetensors is never read")
    assert weights_problem(tmp_path) is None
