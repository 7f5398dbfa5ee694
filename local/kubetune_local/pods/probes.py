"""Readiness probes (httpGet, tcpSocket, exec) against a container's process at the pod's address."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request

from kubetune_local.kube import Obj
from kubetune_local.pods.context import ContainerRun


def probe(run: ContainerRun, ip: str) -> bool:
    """Run the container's readiness probe when due; True when readiness changed."""
    spec = run.spec.get("readinessProbe")
    if not spec or time.monotonic() < run.next_probe:
        return False
    run.next_probe = time.monotonic() + min(float(spec.get("periodSeconds", 10)), 2.0)
    timeout = float(spec.get("timeoutSeconds", 1))
    ok = False
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        if "httpGet" in spec:
            get = spec["httpGet"]
            port = _port(run.spec, get["port"])
            url = f"http://{ip}:{port}{get.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                ok = 200 <= response.status < 400
        elif "tcpSocket" in spec:
            with socket.create_connection((ip, _port(run.spec, spec["tcpSocket"]["port"])), timeout=timeout):
                ok = True
        elif "exec" in spec:
            ok = subprocess.run(spec["exec"]["command"], timeout=timeout, check=False).returncode == 0
    changed = ok != run.ready
    run.ready = ok
    return changed


def _port(container: Obj, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"no container port named {port!r}")
