"""The part of the kubelet API that ``kubectl logs`` needs: ``/containerLogs``, over mutual TLS.

The apiserver proxies ``kubectl logs`` to ``https://<node InternalIP>:<kubeletEndpoint port>``;
every process-backed node advertises this one server. Only clients with a certificate from the
local CA (the apiserver's kubelet-client certificate) are served.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune_local.node import Runtime


class KubeletServer:
    """Serves container logs of the runtime's pods on 127.0.0.1."""

    def __init__(self, runtime: Runtime, *, cert: Path, key: Path, ca: Path, port: int) -> None:
        handler = _handler(runtime)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="kubelet-server", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


def _handler(runtime: Runtime) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited bodies suit a followed log

        def log_message(self, format: str, *args: object) -> None:
            runtime.log("kubelet: " + format % args)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if parts == ["healthz"]:
                self._reply(HTTPStatus.OK, b"ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._reply(HTTPStatus.NOT_FOUND, b"only /containerLogs/{namespace}/{pod}/{container} is served")
                return
            _, namespace, pod, container = parts
            query = urllib.parse.parse_qs(url.query)
            runner = runtime.runner_for(namespace, pod)
            if runner is None:
                self._reply(HTTPStatus.NOT_FOUND, f"pod {namespace}/{pod} is not running on this node".encode())
                return
            path = runner.logs / f"{container}.log"
            if not path.exists():
                self._reply(HTTPStatus.NOT_FOUND, f"container {container} has no log yet".encode())
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            data = path.read_bytes()
            tail = query.get("tailLines", [None])[0]
            if tail is not None:
                data = b"".join(data.splitlines(keepends=True)[-int(tail) :]) if int(tail) > 0 else b""
            self.wfile.write(data)
            if query.get("follow", ["false"])[0] == "true":
                self._follow(runner, path, len(path.read_bytes()))

        def _follow(self, runner: object, path: Path, offset: int) -> None:
            finished = getattr(runner, "finished")  # noqa: B009 - PodRunner, typed loosely to avoid a cycle
            while True:
                with open(path, "rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                if chunk:
                    offset += len(chunk)
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except OSError:
                        return
                elif finished.is_set():
                    return
                time.sleep(0.3)

        def _reply(self, status: HTTPStatus, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

    return Handler
