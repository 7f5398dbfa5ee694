"""Where the trainer finds its model and data: mounts, URL safety, Hub tokens; nothing leaves this machine."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from pydantic import ValidationError

from kubetune_api import ALLOW_LOCAL_PATHS, TrainerConfig
from kubetune_trainer import fetch
from kubetune_trainer.errors import ProblemList

pytestmark = pytest.mark.unit


def config(tmp_path: Path, *, model: str = "/m", dataset: str = "/d", **extra: Any) -> TrainerConfig:
    body = {
        "jobName": "t",
        "spec": {"model": {"source": model, "secretRef": extra.pop("secret", None)}, "dataset": {"source": dataset}},
        "mounts": {"output": str(tmp_path / "out"), **extra.pop("mounts", {})},
        **extra,
    }
    return TrainerConfig.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def locate(cfg: TrainerConfig, uri: str, kind: str = "dataset", secret: str | None = None) -> tuple[Any, list[str]]:
    problems = ProblemList()
    found = fetch.locate(uri, kind=kind, secret_ref=secret, config=cfg, problems=problems)  # type: ignore[arg-type]
    return found, [str(p) for p in problems.problems]


def test_pvc_and_configmap_sources_map_to_their_mounts(tmp_path: Path) -> None:
    (tmp_path / "claim" / "data").mkdir(parents=True)
    (tmp_path / "claim" / "data" / "train.jsonl").write_text("{}")
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "train.jsonl").write_text("{}")
    cfg = config(
        tmp_path, mounts={"claims": {"models": str(tmp_path / "claim")}, "configMaps": {"small": str(tmp_path / "cm")}}
    )
    assert locate(cfg, "pvc://models/data/train.jsonl") == (
        fetch.LocalSource(tmp_path / "claim/data/train.jsonl", root=(tmp_path / "claim").resolve()),
        [],
    )
    assert locate(cfg, "configmap://small/train.jsonl") == (
        fetch.LocalSource(tmp_path / "cm/train.jsonl", root=(tmp_path / "cm").resolve()),
        [],
    )
    found, problems = locate(cfg, "pvc://other/x.jsonl")
    assert found is None
    assert "claim 'other' is not mounted" in problems[0]
    assert "spec.dataset.source" in problems[0]
    found, problems = locate(cfg, "pvc://models/data/missing.jsonl")
    assert found is None
    assert "does not exist" in problems[0]


def test_an_oci_registry_is_checked_like_a_url_sources_host(tmp_path: Path) -> None:
    found, problems = locate(config(tmp_path), "oci://127.0.0.1:5000/team/data:v1")
    assert found is None
    assert problems[0].startswith("spec.dataset.source: the registry 127.0.0.1:5000: ")
    assert "loopback" in problems[0]
    assert "--allow-private-network" in problems[0], "names the setting that allows it"
    allowed = config(tmp_path, allowPrivateAddresses=True)
    assert locate(allowed, "oci://127.0.0.1:5000/team/data:v1") == (
        fetch.OciSource("oci://127.0.0.1:5000/team/data:v1"),
        [],
    )


def test_an_oci_sources_secret_is_a_docker_config(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "no-config").mkdir(parents=True)
    (secrets / "no-config" / "token").write_text("t")
    (secrets / "regcred").mkdir()
    (secrets / "regcred" / ".dockerconfigjson").write_text("{}")
    cfg = config(
        tmp_path,
        allowPrivateAddresses=True,
        mounts={"secrets": {"no-config": str(secrets / "no-config"), "regcred": str(secrets / "regcred")}},
    )
    uri = "oci://127.0.0.1:5000/team/model:v1"
    _, problems = locate(cfg, uri, kind="model", secret="missing")
    assert problems[0].startswith("spec.model.secretRef: Secret 'missing' is not mounted")
    _, problems = locate(cfg, uri, kind="model", secret="no-config")
    assert "has no key .dockerconfigjson" in problems[0]
    assert "kubectl create secret docker-registry no-config --docker-server=127.0.0.1:5000" in problems[0]
    found, problems = locate(cfg, uri, kind="model", secret="regcred")
    assert problems == []
    assert found == fetch.OciSource(uri, secrets / "regcred" / ".dockerconfigjson", "regcred")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),
        ("fd00:ec2::254", "private"),
        ("100.100.100.200", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_internal_addresses_are_refused(address: str, why: str) -> None:
    reason = fetch.refused_address(address)
    assert reason is not None
    assert why in reason


def test_public_addresses_are_allowed() -> None:
    assert fetch.refused_address("93.184.216.34") is None
    assert fetch.refused_address("2606:2800:220:1:248:1893:25c8:1946") is None


def test_a_url_whose_host_resolves_to_any_internal_address_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["93.184.216.34", "10.0.0.7"])
    found, problems = locate(config(tmp_path), "https://data.example.org/train.jsonl")
    assert found is None
    assert "resolves to 10.0.0.7, a private address" in problems[0]
    found, problems = locate(config(tmp_path, allowPrivateAddresses=True), "https://data.example.org/train.jsonl")
    assert problems == []
    assert found == fetch.UrlSource("https://data.example.org/train.jsonl", allow_private=True)


def test_localhost_is_refused_unless_allowed(tmp_path: Path) -> None:
    _, problems = locate(config(tmp_path), "http://localhost:8000/train.jsonl")
    assert "loopback" in problems[0]
    # The fix is the admins' (a user cannot reach the TrainerConfig), and the message says where.
    assert "--allow-private-network CIDR" in problems[0]
    assert "sources.allowPrivateNetworks" in problems[0]


def test_a_private_network_the_operator_allows_is_reached_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["10.20.3.4"])
    allowed = config(tmp_path, privateNetworks=["10.20.0.0/16"])
    found, problems = locate(allowed, "http://data.team.svc/train.jsonl")
    assert problems == []
    assert found == fetch.UrlSource("http://data.team.svc/train.jsonl", allow_private=False, networks=("10.20.0.0/16",))
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["10.20.3.4", "169.254.169.254"])
    found, problems = locate(allowed, "http://data.team.svc/train.jsonl")
    assert found is None
    assert "169.254.169.254, a link-local" in problems[0], "every resolved address must be allowed"
    with pytest.raises(ValidationError, match="not a network"):
        config(tmp_path, privateNetworks=["10.20.0.0/33"])


def test_a_model_over_https_must_be_an_archive(tmp_path: Path) -> None:
    _, problems = locate(config(tmp_path), "https://example.org/model", kind="model")
    assert ".tar" in problems[0]


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "train.jsonl").write_text('{"text": "hello"}\n')

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "site"), **kwargs)

        def do_GET(self) -> None:
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/train.jsonl")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_follows_redirects_and_is_cached(http_server: str, tmp_path: Path) -> None:
    located = fetch.UrlSource(f"{http_server}/moved", allow_private=True)
    path = fetch.fetch(located, cache=tmp_path / "cache")
    assert path.read_text() == '{"text": "hello"}\n'
    assert fetch.fetch(located, cache=tmp_path / "cache") == path
    with pytest.raises(fetch.FetchError) as refused:
        fetch.download(f"{http_server}/train.jsonl", tmp_path / "x", allow_private=False)
    assert refused.value.permanent
    assert "loopback" in str(refused.value)
    with pytest.raises(fetch.FetchError) as missing:
        fetch.download(f"{http_server}/nothing.jsonl", tmp_path / "y", allow_private=True)
    assert missing.value.permanent
    assert "404" in str(missing.value)


def test_hub_token_comes_from_the_mounted_secret_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text("hf_from_secret\n")
    cfg = config(
        tmp_path,
        model="hf://org/model@v2",
        secret="hf-token",
        mounts={"secrets": {"hf-token": str(tmp_path / "secret")}},
    )
    found, problems = locate(cfg, "hf://org/model@v2", kind="model", secret="hf-token")
    assert problems == []
    assert found == fetch.HubSource(repo_id="org/model", revision="v2", repo_type="model", token="hf_from_secret")

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    found, _ = locate(cfg, "hf://org/data", kind="dataset")
    assert found == fetch.HubSource(repo_id="org/data", revision=None, repo_type="dataset", token="hf_from_env")

    _, problems = locate(cfg, "hf://org/model", kind="model", secret="not-mounted")
    assert "Secret 'not-mounted' is not mounted" in problems[0]
    assert problems[0].startswith("spec.model.secretRef")


def test_hub_sources_are_fetched_with_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    located = fetch.HubSource(repo_id="org/model", revision="main", repo_type="model", token="t")
    assert fetch.fetch(located, cache=tmp_path / "cache") == tmp_path / "snapshot"
    assert fetch.fetch(located, cache=tmp_path / "cache", weights=False) == tmp_path / "snapshot"
    common = {"repo_type": "model", "revision": "main", "cache_dir": tmp_path / "cache" / "hf", "token": "t"}
    assert calls == [
        ("org/model", {**common, "ignore_patterns": None}),
        # The pre-flight's fetch: the config and tokenizer without the weight files.
        ("org/model", {**common, "ignore_patterns": list(fetch.WEIGHT_PATTERNS)}),
    ]


def s3_secret(folder: Path, **keys: str) -> Path:
    """A mounted Secret: one file per key, with the trailing newline `kubectl create secret --from-file` keeps."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in keys.items():
        (folder / key).write_text(value + "\n", encoding="utf-8")
    return folder


def test_s3_sources_read_their_keys_from_the_mounted_secret(tmp_path: Path) -> None:
    secret = s3_secret(
        tmp_path / "secret",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
        AWS_SECRET_ACCESS_KEY="s3cr3t",
        AWS_SESSION_TOKEN="session",
        AWS_DEFAULT_REGION="eu-west-3",
    )
    cfg = config(tmp_path, mounts={"secrets": {"s3-keys": str(secret)}})
    found, problems = locate(cfg, "s3://team-models/llama/8b/", kind="model", secret="s3-keys")
    assert problems == []
    assert found == fetch.S3Source(
        uri="s3://team-models/llama/8b/",
        bucket="team-models",
        key="llama/8b/",
        credentials=fetch.S3Credentials("AKIAEXAMPLE", "s3cr3t", "session"),
        secret="s3-keys",
        region="eu-west-3",
    )
    assert found.folder
    assert "s3cr3t" not in repr(found), "secrets stay out of logs"
    assert "session" not in repr(found)
    found, _ = locate(cfg, "s3://team-data/train.jsonl", secret="s3-keys")
    assert isinstance(found, fetch.S3Source)
    assert (found.key, found.folder) == ("train.jsonl", False)


def test_an_s3_source_without_a_secret_uses_the_default_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    found, problems = locate(config(tmp_path), "s3://team-data/sets/chat/")
    assert problems == []
    assert found == fetch.S3Source(uri="s3://team-data/sets/chat/", bucket="team-data", key="sets/chat/")


def test_a_secret_without_the_keys_is_a_problem_naming_the_secret_and_the_key(tmp_path: Path) -> None:
    secret = s3_secret(tmp_path / "secret", AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    (tmp_path / "empty").mkdir()
    cfg = config(tmp_path, mounts={"secrets": {"half": str(secret), "empty": str(tmp_path / "empty")}})
    found, problems = locate(cfg, "s3://team-data/train.jsonl", kind="dataset", secret="half")
    assert found is None
    assert problems == [
        f"spec.dataset.secretRef: Secret 'half' has no key 'AWS_SECRET_ACCESS_KEY' ({secret}/AWS_SECRET_ACCESS_KEY "
        "is missing); an s3:// source's Secret holds AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally "
        "AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL); leave secretRef unset to use the pod's own AWS identity"
    ]
    _, problems = locate(cfg, "s3://team-models/m/", kind="model", secret="empty")
    assert len(problems) == 2, "every missing key is named"
    assert all(p.startswith("spec.model.secretRef: Secret 'empty' has no key 'AWS_") for p in problems)
    _, problems = locate(cfg, "s3://team-models/m/", kind="model", secret="not-mounted")
    assert problems[0].startswith("spec.model.secretRef: Secret 'not-mounted' is not mounted")


def test_an_s3_endpoint_on_a_private_address_is_refused_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = s3_secret(
        tmp_path / "secret", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL="http://127.0.0.1:9000"
    )
    mounts = {"secrets": {"minio": str(secret)}}
    found, problems = locate(config(tmp_path, mounts=mounts), "s3://data/train.jsonl", secret="minio")
    assert found is None
    assert problems[0].startswith(
        "spec.dataset.secretRef: the S3 endpoint http://127.0.0.1:9000 (AWS_ENDPOINT_URL of Secret 'minio'): "
        "127.0.0.1 resolves to 127.0.0.1, a loopback address"
    )
    assert "--allow-private-network CIDR" in problems[0], "says how to allow it"
    found, problems = locate(
        config(tmp_path, mounts=mounts, privateNetworks=["127.0.0.0/8"]), "s3://data/train.jsonl", secret="minio"
    )
    assert problems == []
    assert isinstance(found, fetch.S3Source)
    assert (found.endpoint, found.networks) == ("http://127.0.0.1:9000", ("127.0.0.0/8",))

    # Without a Secret, boto3 would read the endpoint from the environment: it is checked the same way.
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["169.254.169.254"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://metadata.internal")
    _, problems = locate(config(tmp_path), "s3://data/train.jsonl")
    assert "spec.dataset.source: the S3 endpoint http://metadata.internal ($AWS_ENDPOINT_URL)" in problems[0]
    assert "link-local" in problems[0]

    bad = s3_secret(tmp_path / "bad", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL="minio:9000")
    _, problems = locate(config(tmp_path, mounts={"secrets": {"bad": str(bad)}}), "s3://data/x.jsonl", secret="bad")
    assert "not an http:// or https:// URL" in problems[0]


def test_an_s3_model_is_a_prefix_or_an_archive(tmp_path: Path) -> None:
    _, problems = locate(config(tmp_path), "s3://team-models/llama-8b", kind="model")
    assert problems == [
        "spec.model.source: a model over s3:// is a folder named by its prefix with a trailing slash "
        "(s3://team-models/llama-8b/) or a .tar or .tar.gz archive of the model folder"
    ]
    found, problems = locate(config(tmp_path), "s3://team-models/llama-8b.tar.gz", kind="model")
    assert problems == []
    assert isinstance(found, fetch.S3Source)
