"""``s3://`` model and dataset sources against a real S3 server on loopback (moto's server mode).

The server checks every request's signature against an IAM user it creates, so a wrong secret is
refused as AWS refuses it; nothing is mocked between the trainer's boto3 client and the server.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import ALLOW_LOCAL_PATHS, TrainerConfig
from kubetune_local.controlplane import free_port
from kubetune_trainer import fetch
from kubetune_trainer.errors import ProblemList
from tests.factories import S3Store, serve_s3
from tests.trainer.test_publish import hashes, kubetune

pytestmark = pytest.mark.trainer

SECRET = "s3-keys"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Store]:
    with serve_s3(authenticate=True) as store:
        yield store


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> str:
    """A bucket name of this test's own."""
    return f"t-{os.urandom(6).hex()}"


def trainer_config(
    tmp: Path, s3: S3Store, *, private: bool = True, secret: Mapping[str, str | None] | None = None
) -> TrainerConfig:
    """A TrainerConfig with the store's keys (``secret`` overrides some) mounted as Secret ``s3-keys``;
    loopback allowed when ``private``."""
    folder = s3.write_secret(tmp / f"secret-{os.urandom(4).hex()}", **(secret or {}))
    body: dict[str, Any] = {
        "jobName": "t",
        "spec": {"model": {"source": "/m"}, "dataset": {"source": "/d"}},
        "mounts": {"output": str(tmp / "out"), "secrets": {SECRET: str(folder)}},
        "privateNetworks": ["127.0.0.0/8"] if private else [],
    }
    return TrainerConfig.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def located(config: TrainerConfig, uri: str, kind: str = "dataset") -> fetch.S3Source:
    problems = ProblemList()
    found = fetch.locate(uri, kind=kind, secret_ref=SECRET, config=config, problems=problems)  # type: ignore[arg-type]
    assert problems.problems == []
    assert isinstance(found, fetch.S3Source)
    return found


def fetched(tmp: Path, s3: S3Store, uri: str, kind: str = "dataset", **secret: str | None) -> Path:
    return fetch.fetch(located(trainer_config(tmp, s3, secret=secret), uri, kind), cache=tmp / "cache")


def refusal(tmp: Path, s3: S3Store, uri: str, kind: str = "dataset", **secret: str | None) -> fetch.FetchError:
    with pytest.raises(fetch.FetchError) as caught:
        fetched(tmp, s3, uri, kind, **secret)
    return caught.value


def leftovers(cache: Path) -> list[str]:
    """Staging files and folders left in the cache (a half download must never stay)."""
    return sorted(p.name for p in cache.rglob(".part-*")) if cache.exists() else []


def tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def test_a_model_folder_is_fetched_by_its_prefix_and_reused(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    s3.put(
        bucket,
        {
            "llama/": "",  # a "folder" marker, as the AWS console creates
            "llama/config.json": '{"model_type": "llama"}',
            "llama/model.safetensors": weights,
            "llama/tokenizer/tokenizer.json": '{"model": {}}',
            "llama-other/config.json": "not under the prefix llama/",
        },
    )
    model = fetched(tmp_path, s3, f"s3://{bucket}/llama/", kind="model")
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "tokenizer/tokenizer.json",
    ]
    assert (model / "model.safetensors").read_bytes() == weights
    assert leftovers(tmp_path / "cache") == []
    # A complete copy is reused: the objects can be gone.
    s3.client().delete_object(Bucket=bucket, Key="llama/config.json")
    assert fetched(tmp_path, s3, f"s3://{bucket}/llama/", kind="model") == model
    assert (model / "config.json").exists()


def test_a_dataset_file_by_its_key_and_a_dataset_folder_by_its_prefix(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    s3.put(bucket, {"chat/train.jsonl": '{"text": "hello"}\n', "chat/eval.jsonl": '{"text": "bye"}\n'})
    data = fetched(tmp_path, s3, f"s3://{bucket}/chat/train.jsonl")
    assert data.is_file()
    assert data.name == "train.jsonl"
    assert data.read_text() == '{"text": "hello"}\n'
    folder = fetched(tmp_path, s3, f"s3://{bucket}/chat/")
    assert sorted(p.name for p in folder.iterdir()) == ["eval.jsonl", "train.jsonl"]
    # The whole bucket is a folder too.
    assert fetched(tmp_path, s3, f"s3://{bucket}/").joinpath("chat", "eval.jsonl").exists()
    # A session token is sent with the keys (the server checks it).
    refused = refusal(tmp_path / "again", s3, f"s3://{bucket}/chat/", AWS_SESSION_TOKEN="not-a-session")
    assert refused.permanent
    assert "InvalidToken" in str(refused)


def test_a_model_archive_is_unpacked(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    s3.put(
        bucket,
        {"models/toy.tar.gz": tar_gz({"base/config.json": b'{"model_type": "llama"}', "base/model.safetensors": b"w"})},
    )
    model = fetched(tmp_path, s3, f"s3://{bucket}/models/toy.tar.gz", kind="model")
    assert model.is_dir()
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_a_missing_key_bucket_or_prefix_is_permanent_and_named(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    s3.put(bucket, {"data/train.jsonl": "{}\n"})
    missing = refusal(tmp_path, s3, f"s3://{bucket}/data/Train.jsonl")
    assert missing.permanent
    assert f"no object with key 'data/Train.jsonl' in bucket '{bucket}'" in str(missing)
    assert "keys are case-sensitive" in str(missing)
    no_bucket = refusal(tmp_path, s3, "s3://no-such-bucket-here/data/train.jsonl")
    assert no_bucket.permanent
    assert "bucket 'no-such-bucket-here' does not exist" in str(no_bucket)
    empty = refusal(tmp_path, s3, f"s3://{bucket}/models/llama/", kind="model")
    assert empty.permanent
    assert f"s3://{bucket}/models/llama/: no objects under the prefix 'models/llama/'" in str(empty)
    assert leftovers(tmp_path / "cache") == []


def test_wrong_credentials_are_permanent_and_name_the_secret(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    s3.put(bucket, {"data/train.jsonl": "{}\n"})
    wrong_secret = refusal(tmp_path, s3, f"s3://{bucket}/data/train.jsonl", AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert wrong_secret.permanent
    assert "access denied, SignatureDoesNotMatch (HTTP 403)" in str(wrong_secret)
    assert f"Secret {SECRET!r}" in str(wrong_secret)
    unknown = refusal(tmp_path, s3, f"s3://{bucket}/data/", AWS_ACCESS_KEY_ID="AKIANOSUCHKEY0000000")
    assert unknown.permanent
    assert "InvalidAccessKeyId" in str(unknown)
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(unknown), "says what to fix"


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        ("model/", "model/../../../escaped.json"),
        ("model/", "model/sub/../../x.json"),
        ("model/", "model//etc/cron.d/x"),
        ("", "/etc/cron.d/x"),
        ("model/", "model/./config.json"),
    ],
    ids=["dotdot", "dotdot-inside", "empty-segment", "absolute", "dot"],
)
def test_a_key_that_would_land_outside_the_folder_is_refused(
    s3: S3Store, bucket: str, tmp_path: Path, prefix: str, key: str
) -> None:
    s3.put(bucket, {f"{prefix}config.json": "{}", key: "planted"})
    refused = refusal(tmp_path, s3, f"s3://{bucket}/{prefix}", kind="model")
    assert refused.permanent
    assert f"the key {key!r} has an empty, '.' or '..' segment" in str(refused)
    assert not list(tmp_path.rglob("escaped.json"))
    assert not list(tmp_path.rglob("x.json"))
    assert not (tmp_path / "cache" / "s3").exists() or not list((tmp_path / "cache").rglob("config.json"))
    assert leftovers(tmp_path / "cache") == []


def test_an_object_and_a_folder_of_the_same_name_are_refused(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    s3.put(bucket, {"m/tokenizer": "a file", "m/tokenizer/vocab.json": "{}"})
    refused = refusal(tmp_path, s3, f"s3://{bucket}/m/", kind="model")
    assert refused.permanent
    assert "'m/tokenizer' is both an object and a folder" in str(refused)


def test_sizes_and_counts_are_bounded(
    s3: S3Store, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put(
        bucket,
        {"big.jsonl": b"x" * 5000, "m/a.bin": b"a" * 2000, "m/b.bin": b"b" * 2000, "m/c.bin": b"c" * 2000},
    )
    monkeypatch.setenv("KUBETUNE_MAX_UNPACKED_BYTES", "4096")
    big = refusal(tmp_path, s3, f"s3://{bucket}/big.jsonl")
    assert big.permanent
    assert f"s3://{bucket}/big.jsonl is larger than 4 KiB" in str(big)
    assert "$KUBETUNE_MAX_UNPACKED_BYTES" in str(big)
    total = refusal(tmp_path, s3, f"s3://{bucket}/m/", kind="model")
    assert total.permanent
    assert "the objects under the prefix add up to more than 4 KiB" in str(total)
    monkeypatch.setenv("KUBETUNE_MAX_UNPACKED_BYTES", "1000000")
    monkeypatch.setattr(fetch, "MAX_ENTRIES", 2)
    many = refusal(tmp_path, s3, f"s3://{bucket}/m/", kind="model")
    assert many.permanent
    assert "more than 2 objects under the prefix" in str(many)
    assert leftovers(tmp_path / "cache") == []


def test_a_half_download_is_never_reused(
    s3: S3Store, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put(bucket, {"m/a.bin": b"a" * 2000, "m/b.bin": b"b" * 2000})
    real = fetch._s3_get
    calls: list[str] = []

    def lost_on_the_second_object(*args: Any, **kwargs: Any) -> int:
        calls.append(args[2])
        if len(calls) == 2:
            raise fetch.FetchError("connection reset", permanent=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(fetch, "_s3_get", lost_on_the_second_object)
    lost = refusal(tmp_path, s3, f"s3://{bucket}/m/", kind="model")
    assert not lost.permanent
    assert leftovers(tmp_path / "cache") == []
    assert not list((tmp_path / "cache").rglob("a.bin")), "nothing of the first try stays"
    monkeypatch.setattr(fetch, "_s3_get", real)
    model = fetched(tmp_path, s3, f"s3://{bucket}/m/", kind="model")
    assert (model / "b.bin").read_bytes() == b"b" * 2000


def test_an_endpoint_on_loopback_is_refused_unless_its_network_is_allowed(
    s3: S3Store, bucket: str, tmp_path: Path
) -> None:
    s3.put(bucket, {"data/train.jsonl": "{}\n"})
    config = trainer_config(tmp_path, s3, private=False)
    problems = ProblemList()
    assert (
        fetch.locate(
            f"s3://{bucket}/data/train.jsonl", kind="dataset", secret_ref=SECRET, config=config, problems=problems
        )
        is None
    )
    (problem,) = problems.problems
    assert problem.field == "spec.dataset.secretRef"
    assert "a loopback address" in problem.message
    assert "--allow-private-network CIDR" in problem.message, "says how to allow it"
    # The fetch checks again (the name could resolve elsewhere by then).
    allowed = located(trainer_config(tmp_path, s3), f"s3://{bucket}/data/train.jsonl")
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch(fetch.S3Source(**{**_fields(allowed), "networks": ()}), cache=tmp_path / "cache")
    assert refused.value.permanent
    assert "loopback" in str(refused.value)
    assert not (tmp_path / "cache").exists() or leftovers(tmp_path / "cache") == []


def test_a_plain_http_endpoint_is_reached_at_the_address_that_was_checked(
    s3: S3Store, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an http source is pinned: the name is resolved and checked once, the client connects to that
    address, and the Host header (signed: the server checks the signature) keeps the name."""
    s3.put(bucket, {"data/train.jsonl": "{}\n"})
    port = s3.endpoint.rsplit(":", 1)[1]
    resolved: list[str] = []

    def resolve(host: str, _port: int) -> list[str]:
        resolved.append(host)
        if host != "minio.team.svc.cluster.local":  # the client must not resolve the name itself (nothing would answer)
            raise OSError(f"unexpected lookup of {host}")
        return ["127.0.0.1"]

    monkeypatch.setattr(fetch, "_resolve", resolve)
    config = trainer_config(tmp_path, s3, secret={"AWS_ENDPOINT_URL": f"http://minio.team.svc.cluster.local:{port}"})
    data = fetch.fetch(located(config, f"s3://{bucket}/data/train.jsonl"), cache=tmp_path / "cache")
    assert data.read_text() == "{}\n"
    assert set(resolved) == {"minio.team.svc.cluster.local"}

    # Resolved to a refused address by the time of the download: refused, nothing fetched.
    source = located(config, f"s3://{bucket}/data/")
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["169.254.169.254"])
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch(source, cache=tmp_path / "cache")
    assert refused.value.permanent
    assert "169.254.169.254, a link-local" in str(refused.value)


def _fields(source: fetch.S3Source) -> dict[str, Any]:
    return {name: getattr(source, name) for name in fetch.S3Source.__dataclass_fields__}


def test_an_unreachable_endpoint_is_retryable(s3: S3Store, tmp_path: Path) -> None:
    gone = refusal(tmp_path, s3, "s3://data/train.jsonl", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    assert not gone.permanent
    assert "s3://data/train.jsonl" in str(gone)


def test_without_a_secret_ref_boto3s_default_chain_is_used(
    s3: S3Store, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No secretRef: the pod's own identity (here the environment; IRSA and workload identity in a cluster)."""
    s3.put(bucket, {"data/train.jsonl": '{"text": "from the default chain"}\n'})
    for name, value in s3.secret_data().items():
        monkeypatch.setenv(name, value)
    config = trainer_config(tmp_path, s3)
    problems = ProblemList()
    found = fetch.locate(
        f"s3://{bucket}/data/train.jsonl", kind="dataset", secret_ref=None, config=config, problems=problems
    )
    assert problems.problems == []
    assert isinstance(found, fetch.S3Source)
    assert (found.credentials, found.endpoint) == (None, s3.endpoint)
    assert fetch.fetch(found, cache=tmp_path / "cache").read_text() == '{"text": "from the default chain"}\n'
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch(found, cache=tmp_path / "other-cache")
    assert refused.value.permanent
    assert "check the pod's AWS identity (IRSA, workload identity)" in str(refused.value)


def test_a_malformed_region_is_permanent(s3: S3Store, tmp_path: Path) -> None:
    refused = refusal(tmp_path, s3, "s3://data/train.jsonl", AWS_REGION="eu west 3")
    assert refused.permanent
    assert "check AWS_REGION and AWS_ENDPOINT_URL in Secret 's3-keys'" in str(refused)


def test_fetch_model_copies_an_s3_model_into_the_folder(s3: S3Store, bucket: str, tmp_path: Path) -> None:
    """``kubetune fetch-model``, as the serving pod's init container runs it, with an s3:// model."""
    s3.put(bucket, {"llama/config.json": "{}", "llama/model.safetensors": os.urandom(10_000)})
    secret = s3.write_secret(tmp_path / "secret")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "kind": "TrainerConfig",
                "jobName": "toy",
                "spec": {
                    "model": {"source": f"s3://{bucket}/llama/", "secretRef": SECRET},
                    "dataset": {"source": "hf://org/data"},
                },
                "mounts": {"output": str(tmp_path / "unused"), "secrets": {SECRET: str(secret)}},
                "privateNetworks": ["127.0.0.0/8"],
            }
        )
    )
    into = tmp_path / "serving" / "model"
    done = kubetune("fetch-model", "--config", str(config), "--into", str(into), tmp=tmp_path)
    assert done.result["files"] == 2
    assert sorted(hashes(into)) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in into.iterdir()) == ["config.json", "model.safetensors"]  # the cache went away
