"""What many tests write: FineTuneJob manifests, waiting for a condition, the toy question, the job by name.

One manifest factory (:func:`finetunejob`) over a few named bases, one wait helper
(:func:`wait_until`), one builder of the chat request the toy data answers (:func:`toy_chat`), the
custom-object calls by the resource's identity from :mod:`kubetune_api.resource`, and a loopback
HTTP server for the files of a folder (:func:`serve_folder`).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

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
