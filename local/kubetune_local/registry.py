"""A real OCI registry on loopback, for tests and demos: Debian's ``docker-registry`` (CNCF Distribution).

``LocalRegistry().start(root, user, password)`` writes a config and a bcrypt htpasswd file under
``root``, starts ``/usr/bin/docker-registry serve`` on a free 127.0.0.1 port with its storage in
``root/storage``, and returns once ``/v2/`` answers. The registry speaks plain HTTP (kubetune uses
HTTP only for loopback registries) and asks every client for HTTP basic credentials.
``make registry`` installs the binary (apt-get).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from kubetune_local.controlplane import free_port, stop_process

#: Where Debian's ``docker-registry`` package installs the binary.
DEFAULT_BINARY: Final = Path("/usr/bin/docker-registry")
#: Env var naming another registry binary (CNCF Distribution 2.x or 3.x).
BINARY_ENV: Final = "KUBETUNE_REGISTRY_BINARY"


class RegistryError(RuntimeError):
    """The registry could not be started."""


def registry_binary() -> Path:
    """``$KUBETUNE_REGISTRY_BINARY`` or ``/usr/bin/docker-registry``; raise :class:`RegistryError` when missing."""
    binary = Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)
    if not os.access(binary, os.X_OK):
        raise RegistryError(
            f"{binary} is missing: the OCI registry for the publish tests is Debian's docker-registry package; "
            "run `make registry` (apt-get install docker-registry) or point $KUBETUNE_REGISTRY_BINARY at one"
        )
    return binary


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash, the only kind the registry accepts."""
    import bcrypt  # noqa: PLC0415 - only the local registry needs it (the dev extra)

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:{hashed}\n"


def _config(root: Path, port: int) -> str:
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / "storage"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: kubetune-local-registry
auth:
  htpasswd:
    realm: kubetune-local
    path: {root / "htpasswd"}
"""


class LocalRegistry:
    """One ``docker-registry`` process on 127.0.0.1, with htpasswd authentication."""

    def __init__(self, binary: Path | None = None) -> None:
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.root: Path | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as an ``oci://`` reference names the registry."""
        return f"127.0.0.1:{self.port}"

    def start(self, root: Path, user: str, password: str, *, timeout: float = 30.0) -> str:
        """Start the registry with its files under ``root``; return ``host:port`` once ``/v2/`` answers."""
        if self.process is not None:
            raise RegistryError("this registry is already running")
        binary = self.binary or registry_binary()
        root.mkdir(parents=True, exist_ok=True)
        (root / "htpasswd").write_text(htpasswd_line(user, password), encoding="utf-8")
        self.port = free_port()
        self.root = root
        config = root / "config.yml"
        config.write_text(_config(root, self.port), encoding="utf-8")
        with open(root / "registry.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (root / "registry.log").read_text(encoding="utf-8", errors="replace")[-2000:]
                self.process = None
                raise RegistryError(f"{binary} exited at once; its log ({root / 'registry.log'}) ends:\n{tail}")
            if self._answers():
                return self.host
            time.sleep(0.1)
        self.stop()
        raise RegistryError(
            f"{binary} did not answer on {self.host}/v2/ within {timeout:.0f}s; see {root}/registry.log"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                return True
        except urllib.error.HTTPError:  # 401: up, and asking for credentials
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL); its storage stays under ``root``."""
        if self.process is None:
            return
        stop_process(self.process.pid, grace=5.0)
        self.process.wait()
        self.process = None
