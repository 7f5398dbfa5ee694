"""What many tests write: FineTuneJob manifests, waiting for a condition, the toy question, the job by name.

One manifest factory (:func:`finetunejob`) over a few named bases, one wait helper
(:func:`wait_until`), one builder of the chat request the toy data answers (:func:`toy_chat`), the
custom-object calls by the resource's identity from :mod:`kubetune_api.resource`, a loopback
HTTP server for the files of a folder (:func:`serve_folder`) and a real S3 server on loopback
(:func:`serve_s3`, moto's server mode).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
Section = Mapping[str, Any]

#: A toy job on the local runtime: the tiny model and its data in the claim `models`, four steps.
#: The pre-flight is off: tests of what comes after it start there (tests/integration/test_preflight.py
#: and the 2-node job of test_operator_training.py run it, as `make demo` does).
CLUSTER_TOY: Final[Mapping[str, Section]] = {
    "model": {"source": "pvc://models/tiny"},
    "dataset": {"source": "pvc://models/data/train.jsonl"},
    "training": {"maxSteps": 4},
    "preflight": {"enabled": False},
}
#: Llama 3.1 8B's config.json (the part transformers and the memory planner read): fully fine-tuned
#: it needs far more than one A10G's 24 GiB.
LLAMA_8B_CONFIG: Final[Mapping[str, Any]] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}
#: The least a manifest needs, with sources the spec accepts but nothing reads (validation tests).
MINIMAL: Final[Mapping[str, Section]] = {
    "model": {"source": "hf://org/base"},
    "dataset": {"source": "https://example.org/d.jsonl"},
}


def finetunejob(name: str = "toy", *, base: Mapping[str, Section] = CLUSTER_TOY, **sections: Section) -> dict[str, Any]:
    """A FineTuneJob manifest named ``name``: each of ``sections`` merged over the same section of ``base``."""
    spec: dict[str, Any] = {key: dict(values) for key, values in base.items()}
    for key, values in sections.items():
        spec[key] = {**spec.get(key, {}), **values}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def wait_until(
    check: Callable[[], T | None], *, timeout: float = 60.0, what: str = "condition", interval: float = 0.25
) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return cast(T, last)
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def toy_chat(model: str, obj: str, **extra: Any) -> dict[str, Any]:
    """A chat completion request asking the toy question about ``obj``, greedy and short."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"what is the color and size of {obj} ?"}],
        "max_tokens": 3,
        "temperature": 0,
        **extra,
    }


def absent(read: Callable[[], object]) -> bool:
    """Whether ``read`` (an API read of one object) answers 404: the object is gone."""
    try:
        read()
    except ApiException as exc:
        return bool(exc.status == 404)
    return False


def create_job(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Create the FineTuneJob ``body`` in ``namespace``."""
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return created


def read_job(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob ``name`` as the apiserver has it."""
    found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return found


def find_job(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    """The FineTuneJob ``name``, or None once it is gone."""
    try:
        return read_job(api, namespace, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve the files of ``folder`` over HTTP on loopback; yield the base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class S3Store:
    """A moto S3 server on loopback and the keys it accepts."""

    endpoint: str
    access_key_id: str
    secret_access_key: str

    def client(self, *, secret_access_key: str | None = None) -> S3Client:
        import boto3  # noqa: PLC0415 - only the s3:// tests need it

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
        )

    def put(self, bucket: str, objects: Mapping[str, bytes | str]) -> None:
        """Create ``bucket`` (if needed) holding ``objects`` (key: body)."""
        s3 = self.client()
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)

    def secret_data(self, **override: str | None) -> dict[str, str]:
        """The keys of a Secret for this store (``None`` in ``override`` leaves a key out)."""
        data: dict[str, str | None] = {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            **override,
        }
        return {key: value for key, value in data.items() if value is not None}

    def write_secret(self, folder: Path, **override: str | None) -> Path:
        """``folder`` holding the Secret's keys as files, as the kubelet mounts a Secret."""
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in self.secret_data(**override).items():
            (folder / key).write_text(value + "\n", encoding="utf-8")
        return folder


@contextmanager
def serve_s3(*, host: str = "127.0.0.1", authenticate: bool = False) -> Iterator[S3Store]:
    """A real S3 server (moto's server mode) on ``host``, emptied first; yield its store.

    With ``authenticate`` the server checks every request's signature against an IAM user it
    creates (moto accepts any keys otherwise), so a wrong secret is refused as AWS refuses it.
    """
    from moto import settings  # noqa: PLC0415 - only the s3:// tests need it
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    address, port = server.get_host_and_port()
    endpoint = f"http://{address}:{port}"
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=30).close()
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        store = S3Store(endpoint, "AKIAKUBETUNETEST0000", "kubetune-test-secret")
        if authenticate:
            import boto3  # noqa: PLC0415

            iam = boto3.client(
                "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
            )
            iam.create_user(UserName="kubetune")
            iam.put_user_policy(
                UserName="kubetune",
                PolicyName="all",
                PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
                ),
            )
            key = iam.create_access_key(UserName="kubetune")["AccessKey"]
            store = S3Store(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
            settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        yield store
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        server.stop()
