"""The pure parts of publishing: references, the loopback rule, Docker configs, digests and the image layout.

The registry conversations here are with small loopback HTTP servers that misbehave on purpose
(5xx, a bearer-token challenge); the real registry is exercised in tests/trainer/test_publish.py.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.folders import file_sha256, folder_digest, list_files
from kubetune_trainer.oci import client as oci_client
from kubetune_trainer.oci.client import ATTEMPTS, OciAuthError, OciError, RegistryClient
from kubetune_trainer.oci.credentials import (
    Credentials,
    credentials_for,
    load_credentials,
    parse_docker_config,
)
from kubetune_trainer.oci.layout import (
    CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    build_layer,
    image_config,
    image_manifest,
)
from kubetune_trainer.oci.reference import Reference, is_loopback_host, scheme_for
from kubetune_trainer.oci.transfer import fetch_manifest

pytestmark = pytest.mark.unit

SECRET = "pa55-w0rd-never-shown"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("uri", "host", "repository", "tag", "digest"),
    [
        ("oci://ghcr.io/org/adapters:v1", "ghcr.io", "org/adapters", "v1", None),
        ("oci://127.0.0.1:5000/a/b/c:latest", "127.0.0.1:5000", "a/b/c", "latest", None),
        ("oci://localhost:5000/adapter", "localhost:5000", "adapter", None, None),
        ("oci://r.io/my.team/x@sha256:" + "a" * 64, "r.io", "my.team/x", None, "sha256:" + "a" * 64),
        ("oci://r.io/x:t@sha256:" + "b" * 64, "r.io", "x", "t", "sha256:" + "b" * 64),
    ],
)
def test_references_are_parsed(uri: str, host: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(uri)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert str(ref) == uri


def test_a_reference_without_tag_means_latest() -> None:
    ref = Reference.parse("oci://localhost:5000/adapter")
    assert ref.reference == "latest"
    assert str(ref.with_tag()) == "oci://localhost:5000/adapter:latest"


def test_a_malformed_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="oci://registry/repository:tag"):
        Reference.parse("oci://registry")
    with pytest.raises(ValueError, match="unsupported scheme"):
        Reference.parse("https://registry/x")


def test_the_registry_client_builds_urls_from_the_whole_repository() -> None:
    client = RegistryClient("r.example:5000", None, credential_source="x")
    container = client.container(Reference.parse("oci://r.example:5000/my.team/adapters:v1"))
    assert container.manifest_url() == "r.example:5000/v2/my.team/adapters/manifests/v1"
    assert container.get_blob_url("sha256:0") == "r.example:5000/v2/my.team/adapters/blobs/sha256:0"


# ------------------------------------------------------------------------------- loopback rule


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("127.3.4.5:80", True),
        ("::1", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("192.168.1.10", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io:5000", False),
        ("ghcr.io", False),
        ("[::2]:5000", False),
    ],
)
def test_only_loopback_registries_speak_plain_http(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert scheme_for(host) == ("http" if loopback else "https")


# ------------------------------------------------------------------------------ docker config


def test_credentials_come_from_auth_or_username_and_password() -> None:
    auths = parse_docker_config(
        json.dumps(
            {
                "auths": {
                    "https://ghcr.io/v1/": {"auth": b64(f"bob:{SECRET}")},
                    "127.0.0.1:5000": {"username": "alice", "password": SECRET},
                    "index.docker.io": {"auth": b64("hubuser:hubpass")},
                }
            }
        )
    )
    assert credentials_for(auths, "ghcr.io") == Credentials("bob", SECRET)
    assert credentials_for(auths, "127.0.0.1:5000") == Credentials("alice", SECRET)
    assert credentials_for(auths, "docker.io") == Credentials("hubuser", "hubpass")
    assert credentials_for(auths, "127.0.0.1:5001") is None
    assert credentials_for(auths, "quay.io") is None


def test_a_password_with_colons_survives() -> None:
    auths = {"r.io": {"auth": b64("u:a:b:c")}}
    assert credentials_for(auths, "r.io") == Credentials("u", "a:b:c")


def test_credentials_never_show_the_password() -> None:
    assert SECRET not in repr(Credentials("u", SECRET))


def test_a_legacy_dockercfg_is_read() -> None:
    auths = parse_docker_config(json.dumps({"r.io": {"auth": b64("u:p"), "email": "x@y"}}))
    assert credentials_for(auths, "r.io") == Credentials("u", "p")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"auth": "%%%not-base64"}, "not base64"),
        ({"auth": b64(f"no-colon-{SECRET}")}, "does not decode"),
        ({"identitytoken": SECRET}, "neither 'auth' nor"),
        ("a string", "not an object"),
    ],
)
def test_a_malformed_entry_is_named_without_its_content(entry: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        credentials_for({"r.io": entry}, "r.io")
    assert SECRET not in str(raised.value)
    assert "r.io" in str(raised.value)


def test_a_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: is not JSON"):
        load_credentials(path, "r.io")
    with pytest.raises(ValueError, match="cannot read"):
        load_credentials(tmp_path / "missing.json", "r.io")


# ------------------------------------------------------------------------------------ digests


def test_the_folder_digest_is_what_sha256sum_prints(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 100)
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "Z.txt").write_text("upper case sorts first")
    (tmp_path / ".hidden").write_text("not published")
    files = list_files(tmp_path)
    assert list(files) == ["Z.txt", "adapter_config.json", "adapter_model.safetensors", "sub/b.txt"]
    digest = folder_digest({name: file_sha256(path) for name, path in files.items()})
    shell = subprocess.run(
        "find . -type f ! -name '.*' | sed 's|^./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert digest == "sha256:" + shell.stdout.split()[0]
    (tmp_path / "sub" / "b.txt").write_text("c")
    assert folder_digest({n: file_sha256(p) for n, p in list_files(tmp_path).items()}) != digest


# ------------------------------------------------------------------------------------- layout


def test_the_layer_is_a_reproducible_tar_of_data(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(b"\x00\x01" * 5000)
    files = {
        "data/adapter_config.json": tmp_path / "a.json",
        "data/adapter_model.safetensors": tmp_path / "w.safetensors",
    }
    first = build_layer(files, tmp_path / "one.tar.gz")
    second = build_layer(files, tmp_path / "two.tar.gz")
    assert (first.digest, first.diff_id, first.size) == (second.digest, second.diff_id, second.size)
    blob = (tmp_path / "one.tar.gz").read_bytes()
    assert first.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert first.size == len(blob)
    raw = gzip.decompress(blob)
    assert first.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["data", "data/adapter_config.json", "data/adapter_model.safetensors"]
        assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
        extracted = tar.extractfile("data/adapter_model.safetensors")
        assert extracted is not None
        assert extracted.read() == b"\x00\x01" * 5000

    config = image_config(first)
    assert json.loads(config) == {"rootfs": {"type": "layers", "diff_ids": [first.diff_id]}}
    manifest = json.loads(image_manifest(first, config, {"io.kubetune.job": "ns/job"}))
    assert manifest["mediaType"] == MANIFEST_MEDIA_TYPE
    assert manifest["config"] == {
        "mediaType": CONFIG_MEDIA_TYPE,
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": len(config),
    }
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer["annotations"] == {
        "org.opencontainers.image.title": "data",
        "io.deis.oras.content.unpack": "true",
        "io.deis.oras.content.digest": first.diff_id,
        "io.kubetune.files": '["data/adapter_config.json","data/adapter_model.safetensors"]',
    }
    assert manifest["annotations"] == {"io.kubetune.job": "ns/job"}


# ------------------------------------------------------------------------ misbehaving servers

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handle: Handler) -> str:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_a_5xx_is_retried_then_retryable(serve: Callable[[Handler], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci_client, "_BACKOFF_S", 0.0)
    calls: list[str] = []

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        calls.append(h.path)
        reply(h, 503, b"busy")

    host = serve(handle)
    client = RegistryClient(host, None, credential_source="x")
    with pytest.raises(OciError) as raised:
        fetch_manifest(client, Reference.parse(f"oci://{host}/a/b:t"))
    assert not raised.value.permanent
    assert "503" in str(raised.value)
    assert host in str(raised.value)
    assert len(calls) == ATTEMPTS


def test_a_bearer_challenge_is_answered_with_a_token(serve: Callable[[Handler], str]) -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "layers": []}).encode()
    seen: dict[str, Any] = {}

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/token"):
            seen["token_query"] = h.path
            if h.headers.get("Authorization") == "Basic " + b64(f"bob:{SECRET}"):
                reply(h, 200, json.dumps({"token": "t0k"}).encode())
            else:
                reply(h, 401)
        elif h.headers.get("Authorization") == "Bearer t0k":
            reply(h, 200, manifest, Content_Type=MANIFEST_MEDIA_TYPE)
        else:
            realm = f"http://{h.headers['Host']}/token"
            challenge = f'Bearer realm="{realm}",service="reg",scope="repository:a/b:pull"'
            reply(h, 401, WWW_Authenticate=challenge)

    host = serve(handle)
    ref = Reference.parse(f"oci://{host}/a/b:t")
    client = RegistryClient(host, Credentials("bob", SECRET), credential_source="the test")
    found, digest = fetch_manifest(client, ref)
    assert found["layers"] == []
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert "service=reg" in seen["token_query"]
    assert "scope=repository%3Aa%2Fb%3Apull" in seen["token_query"]

    wrong = RegistryClient(host, Credentials("bob", "Wr0ng-P4ss"), credential_source="Secret 'regcred'")
    with pytest.raises(OciAuthError) as refused:
        fetch_manifest(wrong, ref)
    assert refused.value.permanent
    assert host in str(refused.value)
    assert "Secret 'regcred'" in str(refused.value)
    assert "Wr0ng-P4ss" not in str(refused.value)


def test_credentials_are_not_sent_to_a_plain_http_token_service(serve: Callable[[Handler], str]) -> None:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        reply(h, 401, WWW_Authenticate='Bearer realm="http://auth.example.com/token",service="reg"')

    host = serve(handle)
    client = RegistryClient(host, Credentials("bob", SECRET), credential_source="x")
    with pytest.raises(OciError, match="only over HTTPS") as refused:
        fetch_manifest(client, Reference.parse(f"oci://{host}/a:t"))
    assert refused.value.permanent


# ---------------------------------------------------------------------------------- torch-free


def test_publishing_imports_no_ml_stack() -> None:
    code = (
        "import sys, kubetune_trainer.publishing.commands, kubetune_trainer.oci.transfer, kubetune_cli.main\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'datasets', 'huggingface_hub') "
        "if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_missing_registry_binary_says_make_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_local.registry import BINARY_ENV, LocalRegistry, RegistryError  # noqa: PLC0415

    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "no-such-registry"))
    with pytest.raises(RegistryError, match="run `make registry`"):
        LocalRegistry().start(tmp_path / "root", "u", "p")
