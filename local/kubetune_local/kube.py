"""What the local runtime's agents share for talking to the API: a client built from the
cluster's kubeconfig, the ``Obj`` shape of a raw API object, and the API's timestamp format."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config

#: An API object as the server sends it (``_preload_content=False``, watch ``raw_object``) or as
#: a body to send: plain JSON, camelCase keys.
Obj = dict[str, Any]


def api_client(kubeconfig: Path) -> client.ApiClient:
    """A client authenticated as the local cluster's administrator."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


def stamp() -> str:
    """Now, as the API writes a ``Time`` (whole seconds, UTC): ``2006-01-02T15:04:05Z``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
