"""The local runtime's node daemon: process-backed nodes (its own CPU node and the Nodes real
Karpenter creates, which it adopts), local volumes and the kubelet log endpoint, in one background process started by ``kubetune local up``.

Run as ``python -m kubetune_local.daemon --home DIR``; SIGTERM stops every pod it runs
(SIGTERM, then SIGKILL after a short grace) before it exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Final

from kubetune_local.adopt import KarpenterNodeAdopter
from kubetune_local.controlplane import State, free_port
from kubetune_local.kube import api_client
from kubetune_local.kubelet_server import KubeletServer
from kubetune_local.node import NodeAgent, Runtime, default_capacity
from kubetune_local.storage import LocalPathProvisioner

#: The runtime's own CPU node, for pods that need no GPU (the operator, built-in serving, tests).
DEFAULT_NODE: Final = "kubetune-local"


def serve(home: Path) -> None:
    state = State.load(home)
    api = api_client(home / "kubeconfig")
    runtime = Runtime(home=home, api=api, apiserver_port=state.apiserver_port, kubelet_port=free_port())
    pki = home / "pki"
    kubelet = KubeletServer(
        runtime,
        cert=pki / "kubelet-serving.crt",
        key=pki / "kubelet-serving.key",
        ca=pki / "ca.crt",
        port=runtime.kubelet_port,
    )
    kubelet.start()
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = threading.Thread(target=runtime.watch_pods, name="pod-watch", daemon=True)
    watcher.start()
    runtime.add_node(NodeAgent(runtime, DEFAULT_NODE, capacity=default_capacity()))
    LocalPathProvisioner(runtime).start()
    KarpenterNodeAdopter(runtime).start()
    runtime.log(f"node daemon ready; kubelet endpoint 127.0.0.1:{runtime.kubelet_port}")
    done.wait()
    runtime.log("node daemon stopping")
    runtime.shutdown()
    kubelet.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", required=True, type=Path)
    args = parser.parse_args(argv)
    serve(args.home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
