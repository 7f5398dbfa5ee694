"""``kubetune publish``, ``pull`` and ``fetch-model`` as the operator runs them, against a real registry.

The registry is Debian's docker-registry with htpasswd authentication (the ``oci_registry``
fixture); nothing is mocked. One test publishes an adapter that ``kubetune train`` has just
trained on the toy model; the others publish folders of made-up files.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_local.controlplane import free_port
from kubetune_trainer.oci import transfer
from kubetune_trainer.oci.client import RegistryClient
from kubetune_trainer.oci.credentials import Credentials
from kubetune_trainer.oci.layout import MANIFEST_MEDIA_TYPE
from kubetune_trainer.oci.reference import Reference
from tests.conftest import OciRegistry
from tests.factories import serve_folder
from tests.trainer.conftest import finetunejob, kubetune_train, write_manifest

pytestmark = pytest.mark.trainer


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str
    termination: str

    @property
    def result(self) -> dict[str, Any]:
        assert self.code == 0, self.stderr
        loaded: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return loaded


def kubetune(*args: str, tmp: Path) -> Done:
    termination = tmp / f"termination-{os.urandom(4).hex()}"
    env = {**os.environ, "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    message = termination.read_text(encoding="utf-8") if termination.exists() else ""
    return Done(done.returncode, done.stdout, done.stderr, message)


def trainer_config(tmp: Path, output: Path, **out: Any) -> Path:
    """A TrainerConfig whose output folder is ``output``; ``out`` is spec.output; claims and secrets under ``tmp``."""
    config = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "TrainerConfig",
        "jobName": "toy",
        "namespace": "team",
        "spec": {
            "model": {"source": "hf://org/base"},
            "dataset": {"source": "hf://org/data"},
            "output": out,
        },
        "mounts": {
            "output": str(output),
            "claims": {"results": str(tmp / "claims" / "results")},
            "secrets": {"regcred": str(tmp / "secrets" / "regcred")},
        },
    }
    path = tmp / f"config-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def fake_output(folder: Path, *, weights: bytes = b"") -> Path:
    """A training output folder: adapter/ with a config, weights and a tokenizer file, and summary.json."""
    adapter = folder / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(weights or os.urandom(200_000))
    (adapter / "tokenizer.json").write_text('{"model": {}}')
    (folder / "summary.json").write_text('{"steps": 3}')
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def registry_get(registry: OciRegistry, path: str, *, method: str = "GET", accept: str = MANIFEST_MEDIA_TYPE) -> Any:
    auth = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
    request = urllib.request.Request(
        f"http://{registry.host}{path}", method=method, headers={"Authorization": f"Basic {auth}", "Accept": accept}
    )
    return urllib.request.urlopen(request, timeout=30)


def registry_digest(registry: OciRegistry, repository: str, tag: str) -> str:
    with registry_get(registry, f"/v2/{repository}/manifests/{tag}", method="HEAD") as response:
        digest: str = response.headers["Docker-Content-Digest"]
        return digest


def registry_manifest(registry: OciRegistry, repository: str, reference: str) -> dict[str, Any]:
    with registry_get(registry, f"/v2/{repository}/manifests/{reference}") as response:
        loaded: dict[str, Any] = json.loads(response.read())
        return loaded


def registry_blob(registry: OciRegistry, repository: str, digest: str) -> bytes:
    with registry_get(registry, f"/v2/{repository}/blobs/{digest}", accept="*/*") as response:
        body: bytes = response.read()
        return body


# -------------------------------------------------------------------------------------- oci://


@pytest.fixture(scope="module")
def trained(toy_model: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a short real LoRA training of the toy model."""
    folder = tmp_path_factory.mktemp("publish-train")
    manifest = finetunejob(toy_model, toy_data, training={"maxSteps": 3, "loggingEverySteps": 1})
    run = kubetune_train(write_manifest(folder, manifest), folder / "out")
    assert run.code == 0, run.log[-3000:]
    return folder / "out"


def test_a_trained_adapter_round_trips_through_the_registry(
    trained: Path, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    oci_registry.docker_config(tmp_path / "secrets" / "regcred")
    destination = f"oci://{oci_registry.host}/team/toy-adapter:v1"
    config = trainer_config(tmp_path, trained, destination=destination, secretRef="regcred")

    published = kubetune("publish", "--config", str(config), tmp=tmp_path)
    result = published.result
    adapter = hashes(trained / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter)
    assert result["uri"] == destination
    assert result["digest"] == registry_digest(oci_registry, "team/toy-adapter", "v1")
    assert (
        result["sizeBytes"]
        == sum(p.stat().st_size for p in (trained / "adapter").iterdir() if p.is_file())
        + (trained / "summary.json").stat().st_size
    )
    assert json.loads(published.termination) == result
    assert oci_registry.password not in published.stdout + published.stderr + published.termination

    # The layout: one tar+gzip layer whose files sit under data/, an image config with its diff ID.
    manifest = registry_manifest(oci_registry, "team/toy-adapter", result["digest"])
    (layer,) = manifest["layers"]
    titles = json.loads(layer["annotations"]["io.kubetune.files"])
    assert titles == sorted(f"data/{name}" for name in [*adapter, "summary.json"])
    assert layer["annotations"]["org.opencontainers.image.title"] == "data"
    assert manifest["annotations"]["io.kubetune.job"] == "team/toy"
    raw = gzip.decompress(registry_blob(oci_registry, "team/toy-adapter", layer["digest"]))
    config_blob = json.loads(registry_blob(oci_registry, "team/toy-adapter", manifest["config"]["digest"]))
    assert config_blob["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.extractfile("data/adapter_model.safetensors")
        assert member is not None
        assert hashlib.sha256(member.read()).hexdigest() == adapter["adapter_model.safetensors"]

    # Pulled back, by tag and by digest: the same bytes, directly in the folder.
    docker_config = oci_registry.docker_config(tmp_path / "docker", name="config.json")
    for reference, into in (
        (destination, tmp_path / "by-tag"),
        (f"{destination}@{result['digest']}", tmp_path / "by-digest"),
    ):
        pulled = kubetune("pull", reference, str(into), "--docker-config", str(docker_config), tmp=tmp_path)
        assert pulled.result["digest"] == result["digest"]
        assert hashes(into) == {**adapter, "summary.json": hashes(trained)["summary.json"]}
        assert not [p for p in into.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_same_files_give_the_same_digest_and_a_new_tag_replaces_nothing(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    output = fake_output(tmp_path / "out")
    oci_registry.docker_config(tmp_path / "secrets" / "regcred")
    digests = []
    for tag in ("a", "b"):
        config = trainer_config(
            tmp_path, output, destination=f"oci://{oci_registry.host}/team/same:{tag}", secretRef="regcred"
        )
        digests.append(kubetune("publish", "--config", str(config), tmp=tmp_path).result["digest"])
    assert digests[0] == digests[1] == registry_digest(oci_registry, "team/same", "a")
    (output / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
    config = trainer_config(tmp_path, output, destination=f"oci://{oci_registry.host}/team/same:a", secretRef="regcred")
    changed = kubetune("publish", "--config", str(config), tmp=tmp_path).result["digest"]
    assert changed != digests[0]
    assert registry_digest(oci_registry, "team/same", "a") == changed
    assert registry_digest(oci_registry, "team/same", "b") == digests[1]


def test_a_large_layer_is_uploaded_in_chunks(
    oci_registry: OciRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 64 * 1024)
    weights = os.urandom(1_000_000)
    files = {"adapter_model.safetensors": tmp_path / "w", "adapter_config.json": tmp_path / "c"}
    files["adapter_model.safetensors"].write_bytes(weights)
    files["adapter_config.json"].write_text("{}")
    credentials = Credentials(oci_registry.user, oci_registry.password)
    ref = Reference.parse(f"oci://{oci_registry.host}/team/chunked:v1")
    pushed = transfer.push(files, ref, credentials=credentials, credential_source="the test")
    assert pushed.manifest["layers"][0]["size"] > 10 * 64 * 1024
    assert pushed.digest == registry_digest(oci_registry, "team/chunked", "v1")
    pulled = transfer.pull(ref, tmp_path / "pulled", credentials=credentials, credential_source="the test")
    assert pulled.files == ("adapter_config.json", "adapter_model.safetensors")
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == weights


def test_pull_reads_a_plain_oras_artifact_with_data_titles(oci_registry: OciRegistry, tmp_path: Path) -> None:
    """An artifact pushed file by file (oras push data/a data/b): each layer's title is its path."""
    credentials = Credentials(oci_registry.user, oci_registry.password)
    ref = Reference.parse(f"oci://{oci_registry.host}/team/oras-style:v1")
    client = RegistryClient(ref.host, credentials, credential_source="the test")
    container = client.container(ref)
    contents = {"data/adapter_config.json": b'{"r": 4}', "data/adapter_model.safetensors": os.urandom(5000)}
    layers = []
    for title, body in [*contents.items(), ("config", b"{}")]:
        blob = tmp_path / hashlib.sha256(body).hexdigest()
        blob.write_bytes(body)
        descriptor = {"mediaType": "application/octet-stream", "digest": "sha256:" + blob.name, "size": len(body)}
        client.check(client.upload_blob(str(blob), container, descriptor), "upload")
        if title != "config":
            layers.append({**descriptor, "annotations": {"org.opencontainers.image.title": title}})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.unknown.config.v1+json", "digest": descriptor["digest"], "size": 2},
        "layers": layers,
    }
    url = f"http://{container.manifest_url()}"
    client.check(
        client.do_request(
            url, "PUT", data=json.dumps(manifest).encode(), headers={"Content-Type": MANIFEST_MEDIA_TYPE}
        ),
        "manifest",
    )
    docker_config = oci_registry.docker_config(tmp_path / "docker", name="config.json")
    pulled = kubetune("pull", str(ref), str(tmp_path / "into"), "--docker-config", str(docker_config), tmp=tmp_path)
    assert pulled.result["files"] == 2
    assert (tmp_path / "into" / "adapter_config.json").read_bytes() == contents["data/adapter_config.json"]
    assert (tmp_path / "into" / "adapter_model.safetensors").read_bytes() == contents["data/adapter_model.safetensors"]


def test_a_wrong_password_is_permanent_and_says_what_to_fix(oci_registry: OciRegistry, tmp_path: Path) -> None:
    wrong = "Wr0ng-" + oci_registry.password[::-1]
    oci_registry.docker_config(tmp_path / "secrets" / "regcred", password=wrong)
    config = trainer_config(
        tmp_path, fake_output(tmp_path / "out"), destination=f"oci://{oci_registry.host}/team/x:v1", secretRef="regcred"
    )
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 2, done.stderr
    for expected in (
        oci_registry.host,
        "Secret 'regcred'",
        "spec.output.secretRef",
        "HTTP 401",
        "fix the user name and password",
        f"kubectl create secret docker-registry regcred --docker-server={oci_registry.host}",
    ):
        assert expected in done.termination, done.termination
    assert done.termination.strip() in done.stderr
    for secret in (wrong, oci_registry.password, base64.b64encode(f"{oci_registry.user}:{wrong}".encode()).decode()):
        assert secret not in done.stdout + done.stderr + done.termination

    docker_config = oci_registry.docker_config(tmp_path / "docker", name="config.json", password=wrong)
    pulled = kubetune(
        "pull",
        f"oci://{oci_registry.host}/team/x:v1",
        str(tmp_path / "p"),
        "--docker-config",
        str(docker_config),
        tmp=tmp_path,
    )
    assert pulled.code == 2
    assert f"--docker-config {docker_config}" in pulled.termination
    assert wrong not in pulled.stderr + pulled.termination


def test_no_credentials_is_permanent_and_names_the_secret_ref(oci_registry: OciRegistry, tmp_path: Path) -> None:
    config = trainer_config(tmp_path, fake_output(tmp_path / "out"), destination=f"oci://{oci_registry.host}/team/x:v1")
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 2
    assert "asks for credentials" in done.termination
    assert "spec.output.secretRef" in done.termination


def test_a_secret_without_an_entry_for_the_registry_is_permanent(oci_registry: OciRegistry, tmp_path: Path) -> None:
    folder = tmp_path / "secrets" / "regcred"
    folder.mkdir(parents=True)
    (folder / ".dockerconfigjson").write_text(json.dumps({"auths": {"other.example:5000": {"auth": "dTpw"}}}))
    config = trainer_config(
        tmp_path, fake_output(tmp_path / "out"), destination=f"oci://{oci_registry.host}/team/x:v1", secretRef="regcred"
    )
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 2
    assert f"no credentials for registry {oci_registry.host}" in done.termination


def test_an_unreachable_registry_is_retryable(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = trainer_config(tmp_path, fake_output(tmp_path / "out"), destination=f"oci://{host}/team/x:v1")
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 1, done.stderr
    assert f"cannot reach registry {host} over HTTP" in done.termination
    pulled = kubetune("pull", f"oci://{host}/team/x:v1", str(tmp_path / "p"), tmp=tmp_path)
    assert pulled.code == 1


def test_pulling_a_missing_tag_is_permanent(oci_registry: OciRegistry, tmp_path: Path) -> None:
    docker_config = oci_registry.docker_config(tmp_path / "docker", name="config.json")
    done = kubetune(
        "pull",
        f"oci://{oci_registry.host}/team/none:v9",
        str(tmp_path / "p"),
        "--docker-config",
        str(docker_config),
        tmp=tmp_path,
    )
    assert done.code == 2
    assert "does not exist" in done.termination


# -------------------------------------------------------------------------------------- pvc://


def test_pvc_copies_atomically_and_the_digest_is_stable(tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    target = tmp_path / "claims" / "results" / "adapters" / "toy"
    config = trainer_config(tmp_path, output, destination="pvc://results/adapters/toy")
    first = kubetune("publish", "--config", str(config), tmp=tmp_path).result
    expected = {**hashes(output / "adapter"), "summary.json": hashes(output)["summary.json"]}
    assert hashes(target) == expected
    listing = "".join(f"{expected[name]}  {name}\n" for name in sorted(expected))
    assert first == {
        "uri": "pvc://results/adapters/toy",
        "digest": "sha256:" + hashlib.sha256(listing.encode()).hexdigest(),
        "sizeBytes": sum(p.stat().st_size for p in target.iterdir()),
    }
    (target / "stale.bin").write_text("from an older publish")
    second = kubetune("publish", "--config", str(config), tmp=tmp_path).result
    assert second == first
    assert hashes(target) == expected  # the old folder was replaced whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["toy"]  # no staging or old copy left


def test_pvc_destinations_must_stay_inside_a_mounted_claim(tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    for destination, message in (
        ("pvc://results", "must name a folder inside claim results"),
        ("pvc://results/../../escape", "'..' would leave claim results"),
        ("pvc://other/x", "claim 'other' is not mounted"),
    ):
        done = kubetune(
            "publish", "--config", str(trainer_config(tmp_path, output, destination=destination)), tmp=tmp_path
        )
        assert done.code == 2, destination
        assert message in done.termination
    assert not (tmp_path / "escape").exists()


def fake_merged(output: Path) -> dict[str, str]:
    """A merged model in ``output``/merged (what training leaves with output.merge); its files' hashes."""
    merged = output / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(os.urandom(50_000))
    return hashes(merged)


def test_the_merged_model_is_published_beside_the_adapter(oci_registry: OciRegistry, tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    merged = fake_merged(output)
    # pvc://: a sibling folder, copied whole.
    config = trainer_config(tmp_path, output, destination="pvc://results/adapters/toy", merge=True)
    result = kubetune("publish", "--config", str(config), tmp=tmp_path).result
    assert result["uri"] == "pvc://results/adapters/toy"
    assert result["mergedUri"] == "pvc://results/adapters/toy-merged"
    assert hashes(tmp_path / "claims" / "results" / "adapters" / "toy-merged") == merged
    assert "config.json" not in hashes(tmp_path / "claims" / "results" / "adapters" / "toy")
    # oci://: the same repository, the tag with -merged, marked as the merged model.
    oci_registry.docker_config(tmp_path / "secrets" / "regcred")
    destination = f"oci://{oci_registry.host}/team/toy:v1"
    config = trainer_config(tmp_path, output, destination=destination, secretRef="regcred", merge=True)
    result = kubetune("publish", "--config", str(config), tmp=tmp_path).result
    assert result["mergedUri"] == f"{destination}-merged"
    manifest = registry_manifest(oci_registry, "team/toy", "v1-merged")
    assert manifest["annotations"]["io.kubetune.merged"] == "true"
    docker_config = oci_registry.docker_config(tmp_path / "docker", name="config.json")
    into = tmp_path / "pulled-merged"
    kubetune("pull", result["mergedUri"], str(into), "--docker-config", str(docker_config), tmp=tmp_path)
    assert {name: digest for name, digest in hashes(into).items() if name != "summary.json"} == merged
    # No destination: it stays in the job's volume, beside the adapter.
    config = trainer_config(tmp_path, output, merge=True)
    done = kubetune("publish", "--config", str(config), "--default-uri", "pvc://workspace-toy/adapter", tmp=tmp_path)
    assert done.result["mergedUri"] == "pvc://workspace-toy/merged"


def test_merge_without_a_merged_model_is_permanent(tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    done = kubetune("publish", "--config", str(trainer_config(tmp_path, output, merge=True)), tmp=tmp_path)
    assert done.code == 2
    assert "no merged model" in done.termination


def test_no_destination_publishes_in_place_under_the_default_uri(tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    config = trainer_config(tmp_path, output)
    done = kubetune("publish", "--config", str(config), "--default-uri", "pvc://workspace-toy/adapter", tmp=tmp_path)
    adapter = hashes(output / "adapter")
    listing = "".join(f"{adapter[name]}  {name}\n" for name in sorted(adapter))
    assert done.result == {
        "uri": "pvc://workspace-toy/adapter",
        "digest": "sha256:" + hashlib.sha256(listing.encode()).hexdigest(),
        "sizeBytes": sum(p.stat().st_size for p in (output / "adapter").iterdir()),
    }
    assert json.loads(done.termination) == done.result


def test_a_finetunejob_manifest_with_output_is_published_too(tmp_path: Path) -> None:
    output = fake_output(tmp_path / "out")
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "toy"},
        "spec": {"model": {"source": "/models/base"}, "dataset": {"source": "/data/train.jsonl"}},
    }
    path = write_manifest(tmp_path, manifest)
    done = kubetune("publish", "--config", str(path), "--output", str(output), tmp=tmp_path)
    assert done.result["uri"] == (output / "adapter").resolve().as_uri()


# ---------------------------------------------------------------------------- permanent errors


def test_s3_is_refused_permanently_naming_the_schemes_that_work(tmp_path: Path) -> None:
    config = trainer_config(tmp_path, fake_output(tmp_path / "out"), destination="s3://bucket/adapters/toy")
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 2
    message = done.termination or done.stderr
    assert "unsupported scheme 's3://'" in message
    assert "pvc://claim/path" in message
    assert "oci://registry/repository:tag" in message
    assert "spec.output.destination" in message


def test_nothing_to_publish_is_permanent(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    config = trainer_config(tmp_path, output, destination="pvc://results/x")
    done = kubetune("publish", "--config", str(config), tmp=tmp_path)
    assert done.code == 2
    assert f"training left nothing at {output / 'adapter'}" in done.termination
    assert done.stdout == ""


# -------------------------------------------------------------------------------- fetch-model


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[str]:
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / "model.tar.gz", "w:gz") as tar:
        for name, body in (("base/config.json", b'{"model_type": "llama"}'), ("base/model.safetensors", b"w" * 1000)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with serve_folder(site) as url:
        yield url


def model_config(tmp: Path, source: str, **extra: Any) -> Path:
    config = {
        "kind": "TrainerConfig",
        "jobName": "toy",
        "spec": {"model": {"source": source}, "dataset": {"source": "hf://org/data"}},
        "mounts": {"output": str(tmp / "unused"), "claims": {"models": str(tmp / "claims" / "models")}},
        **extra,
    }
    path = tmp / f"model-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(config))
    return path


def test_fetch_model_copies_a_claims_model_into_the_folder(tmp_path: Path) -> None:
    model = tmp_path / "claims" / "models" / "llama"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(10_000))
    (model / "sub" / "extra.txt").write_text("x")
    into = tmp_path / "serving" / "model"
    done = kubetune(
        "fetch-model", "--config", str(model_config(tmp_path, "pvc://models/llama")), "--into", str(into), tmp=tmp_path
    )
    assert done.result == {"uri": "pvc://models/llama", "path": str(into), "files": 3, "sizeBytes": 10_003}
    assert hashes(into) == hashes(model)
    assert hashes(model)  # the source is untouched
    assert not [p for p in into.iterdir() if p.name.startswith(".")]


def test_fetch_model_unpacks_a_downloaded_archive(archive_server: str, tmp_path: Path) -> None:
    config = model_config(tmp_path, f"{archive_server}/model.tar.gz", allowPrivateAddresses=True)
    into = tmp_path / "into"
    done = kubetune("fetch-model", "--config", str(config), "--into", str(into), tmp=tmp_path)
    assert done.result["files"] == 2
    assert (into / "config.json").read_text() == '{"model_type": "llama"}'
    assert (into / "model.safetensors").read_bytes() == b"w" * 1000
    assert sorted(p.name for p in into.iterdir()) == ["config.json", "model.safetensors"]  # the cache went away


def test_fetch_model_problems_are_permanent(archive_server: str, tmp_path: Path) -> None:
    for source, message in (
        ("pvc://models/missing", "does not exist"),
        ("pvc://nowhere/x", "claim 'nowhere' is not mounted"),
        (f"{archive_server}/model.tar.gz", "loopback"),  # private addresses stay refused unless allowed
        ("s3://bucket/model", "a model over s3:// is a folder named by its prefix with a trailing slash"),
        ("oci://registry.example/models/base:v1", "cannot resolve 'registry.example'"),
    ):
        done = kubetune(
            "fetch-model", "--config", str(model_config(tmp_path, source)), "--into", str(tmp_path / "m"), tmp=tmp_path
        )
        assert done.code == 2, (source, done.stderr)
        assert message in done.termination, (source, done.termination)


def test_registry_get_helper_fails_without_credentials(oci_registry: OciRegistry) -> None:
    """The fixture's registry really asks for the password (so the tests above prove the credentials work)."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{oci_registry.host}/v2/", timeout=10)
    assert refused.value.code == 401
