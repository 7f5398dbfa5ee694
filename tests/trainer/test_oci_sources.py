"""oci:// model and dataset sources, against a real registry on loopback (Debian's docker-registry).

A toy model pushed as kubetune's own image layout (the one a merged model is published in) and
its data pushed as an ORAS-style artifact are what ``kubetune train`` trains on; a Kaito-style
container image keeps its model in a folder of its file system; wrong credentials and a missing
tag are permanent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import ALLOW_LOCAL_PATHS, TrainerConfig
from kubetune_trainer import fetch
from kubetune_trainer.config_file import render
from kubetune_trainer.errors import ProblemList
from kubetune_trainer.oci import transfer
from kubetune_trainer.oci.client import RegistryClient
from kubetune_trainer.oci.credentials import Credentials
from kubetune_trainer.oci.layout import MANIFEST_MEDIA_TYPE
from kubetune_trainer.oci.reference import Reference
from tests.conftest import OciRegistry
from tests.trainer.conftest import TOY_TRAINING, kubetune_train

pytestmark = pytest.mark.trainer


def push_folder(registry: OciRegistry, folder: Path, repository: str) -> str:
    """``folder``'s files pushed as kubetune's image layout (a data/ folder in one layer); the oci:// URI."""
    ref = Reference.parse(f"oci://{registry.host}/{repository}")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    credentials = Credentials(registry.user, registry.password)
    transfer.push(files, ref, credentials=credentials, credential_source="the test")
    return str(ref)


def push_raw(
    registry: OciRegistry, repository: str, layers: list[tuple[str, bytes, dict[str, str]]], scratch: Path
) -> str:
    """A manifest of the given (media type, body, annotations) layers, pushed blob by blob as oras does."""
    ref = Reference.parse(f"oci://{registry.host}/{repository}")
    client = RegistryClient(ref.host, Credentials(registry.user, registry.password), credential_source="the test")
    container = client.container(ref)
    descriptors = []
    for media_type, body, notes in [*layers, ("application/vnd.oci.image.config.v1+json", b"{}", {})]:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        blob = scratch / f"blob-{digest[7:19]}"
        blob.write_bytes(body)
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(body)}
        client.check(client.upload_blob(str(blob), container, descriptor), "upload")
        blob.unlink()
        descriptors.append({**descriptor, **({"annotations": notes} if notes else {})})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptors[-1],
        "layers": descriptors[:-1],
    }
    response = client.do_request(
        f"http://{container.manifest_url()}",
        "PUT",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": MANIFEST_MEDIA_TYPE},
    )
    client.check(response, "manifest")
    return str(ref)


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(buffer.getvalue())


def config(
    tmp_path: Path, registry: OciRegistry, model: str, dataset: str, *, password: str | None = None
) -> TrainerConfig:
    """A TrainerConfig reading both sources with the Secret ``regcred`` (a Docker config for the registry)."""
    registry.docker_config(tmp_path / "secrets" / "regcred", password=password)
    body = {
        "jobName": "toy",
        "spec": {
            "model": {"source": model, "secretRef": "regcred"},
            "dataset": {"source": dataset, "secretRef": "regcred", "maxSeqLength": 32},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "training": {**TOY_TRAINING, "maxSteps": 20},
        },
        "mounts": {"output": str(tmp_path / "out"), "secrets": {"regcred": str(tmp_path / "secrets" / "regcred")}},
        "privateNetworks": ["127.0.0.0/8"],
    }
    return TrainerConfig.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def located(cfg: TrainerConfig, kind: str = "model") -> fetch.Located:
    problems = ProblemList()
    spec = cfg.spec.model if kind == "model" else cfg.spec.dataset
    found = fetch.locate(spec.source, kind=kind, secret_ref=spec.secret_ref, config=cfg, problems=problems)  # type: ignore[arg-type]
    assert found is not None, problems.problems
    return found


def test_a_toy_job_trains_on_a_model_image_and_a_data_artifact(
    oci_registry: OciRegistry, toy_model: Path, toy_data: Path, tmp_path: Path
) -> None:
    model = push_folder(oci_registry, toy_model, "team/toy-model:v1-merged")
    data = push_raw(
        oci_registry,
        "team/toy-data:v1",
        [
            (
                "application/vnd.oci.image.layer.v1.tar",
                toy_data.read_bytes(),
                {"org.opencontainers.image.title": "train.jsonl"},
            )
        ],
        tmp_path,
    )
    cfg = config(tmp_path, oci_registry, model, data)
    path = tmp_path / "config.json"
    path.write_text(render(cfg), encoding="utf-8")
    run = kubetune_train(path, tmp_path / "out")
    assert run.code == 0, run.log[-3000:]
    assert run.summary["steps"] == 20
    records = sum(1 for line in toy_data.read_text().splitlines() if line.strip())
    assert run.summary["data"]["records"] == records
    assert run.summary["losses"][-1]["loss"] < run.summary["losses"][0]["loss"]
    assert f"pulling {model}" in run.log
    assert len(list((tmp_path / "out" / ".cache" / "oci").iterdir())) == 2, "both pulls are kept on the job's volume"


def test_a_kaito_style_image_keeps_its_model_in_a_folder(oci_registry: OciRegistry, tmp_path: Path) -> None:
    layer = tar_gz(
        {
            "workspace/tfs/weights/config.json": b'{"model_type": "llama"}',
            "workspace/tfs/weights/model.safetensors": b"x" * 100,
            "workspace/tfs/inference_api.py": b"print('hi')",
        }
    )
    uri = push_raw(
        oci_registry, "kaito/llama:0.1", [("application/vnd.oci.image.layer.v1.tar+gzip", layer, {})], tmp_path
    )
    cfg = config(tmp_path, oci_registry, uri, "hf://org/data")
    folder = fetch.fetch(located(cfg), cache=tmp_path / "cache")
    assert folder.name == "weights"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_wrong_credentials_and_a_missing_tag_are_permanent(oci_registry: OciRegistry, tmp_path: Path) -> None:
    uri = f"oci://{oci_registry.host}/team/nothing:v9"
    cfg = config(tmp_path, oci_registry, uri, "hf://org/data")
    with pytest.raises(fetch.FetchError) as missing:
        fetch.fetch(located(cfg), cache=tmp_path / "cache")
    assert missing.value.permanent
    assert "team/nothing:v9" in str(missing.value)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    model = push_folder(oci_registry, tmp_path / "files", "team/some-files:v1")
    wrong = config(tmp_path, oci_registry, model, "hf://org/data", password="wrong")
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch(located(wrong), cache=tmp_path / "cache2")
    assert refused.value.permanent
    assert oci_registry.host in str(refused.value)


def test_a_secret_without_an_entry_for_the_registry_is_permanent(oci_registry: OciRegistry, tmp_path: Path) -> None:
    cfg = config(tmp_path, oci_registry, f"oci://{oci_registry.host}/team/x:v1", "hf://org/data")
    (tmp_path / "secrets" / "regcred" / ".dockerconfigjson").write_text(
        '{"auths": {"other.example": {"auth": "dTpw"}}}'
    )
    with pytest.raises(fetch.FetchError) as refused:
        fetch.fetch(located(cfg), cache=tmp_path / "cache")
    assert refused.value.permanent
    assert f"no credentials for registry {oci_registry.host}" in str(refused.value)
