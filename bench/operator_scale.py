"""Operator latency and throughput: N FineTuneJobs against ready BYO nodes.

Measures, on the local runtime's real apiserver with the operator as a real process:
- latency from creating a FineTuneJob to its training Job appearing (p50, p99), seen by a watch;
- the same for a bare batch/v1 Job created directly (the peer: what the apiserver and watch cost
  alone), printed as a ratio;
- FineTuneJobs handled per second, and the operator's resident memory.

The jobs are suspended (runPolicy.suspend), so their Jobs are created without starting pods:
this measures the operator, not the training. Targets (DESIGN §7): p99 ≤ 1 s over 200 jobs;
≥ 40 jobs/s; RSS ≤ 250 MB.

    .venv/bin/python -m bench.operator_scale [--jobs 200]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from kubetune_api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION
from kubetune_local import cluster
from kubetune_local.kube import api_client
from tests.factories import wait_until
from tests.integration.conftest import CRD, OperatorProcess

NAMESPACE = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def watch_jobs(api: client.ApiClient, seen: dict[str, float], stop: threading.Event) -> None:
    batch = client.BatchV1Api(api)
    while not stop.is_set():
        for event in watch.Watch().stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=5):
            name = event["object"].metadata.name
            seen.setdefault(name, time.monotonic())
            if stop.is_set():
                return


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_peer(batch: client.BatchV1Api, seen: dict[str, float]) -> list[float]:
    """Latency of bare Jobs created directly: what the apiserver and the watch cost alone."""
    created: dict[str, float] = {}
    for index in range(20):
        name = f"peer-{index}"
        body: dict[str, Any] = {
            "metadata": {"name": name},
            "spec": {
                "suspend": True,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}
                },
            },
        }
        created[name] = time.monotonic()
        batch.create_namespaced_job(NAMESPACE, body)
    wait_until(lambda: all(n in seen for n in created), what="the peer Jobs")
    return [seen[n] - t for n, t in created.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    running = cluster.up(home)
    operator: OperatorProcess | None = None
    try:
        running.kubectl("apply", "--server-side", "-f", str(CRD))
        api = api_client(running.kubeconfig)
        core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_until(lambda: core.list_namespaced_service_account(NAMESPACE).items, what="the namespace")
        operator = OperatorProcess(running.kubeconfig, home / "operator.log")
        operator.start()
        assert operator.process is not None
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_jobs, args=(api, seen, stop), daemon=True)
        watcher.start()
        time.sleep(1)

        peer = measure_peer(batch, seen)

        created: dict[str, float] = {}
        started = time.monotonic()

        def create(index: int) -> None:
            name = f"ftj-{index}"
            created[f"{name}-train-0"] = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                PLURAL,
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "metadata": {"name": name},
                    "spec": {
                        "model": {"source": "pvc://models/tiny"},
                        "dataset": {"source": "pvc://models/data.jsonl"},
                        "resources": {"provisioner": "byo", "gpusPerNode": 0},
                        "runPolicy": {"suspend": True},
                    },
                },
            )

        # Several clients at once, as GitOps or a batch of users would: the bench's own requests
        # must not be what limits the rate.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(create, range(args.jobs)))
        creating = time.monotonic() - started
        wait_until(lambda: all(n in seen for n in created), timeout=600, what=f"{args.jobs} training Jobs")
        elapsed = max(seen[n] for n in created) - started
        latency = [seen[n] - t for n, t in created.items()]
        time.sleep(5)
        rss = rss_mb(operator.process.pid)
        stop.set()
        samples = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in operator.metrics().splitlines()
            if line and not line.startswith("#")
        }
        reconciles = samples["kubetune_reconcile_duration_seconds_count"]
        result = {
            "jobs": args.jobs,
            "latency_p50_s": round(statistics.median(latency), 3),
            "latency_p99_s": round(percentile(latency, 0.99), 3),
            "peer_job_p50_s": round(statistics.median(peer), 3),
            "peer_job_p99_s": round(percentile(peer, 0.99), 3),
            "p99_ratio_to_target_1s": round(percentile(latency, 0.99) / 1.0, 2),
            "p50_ratio_to_peer": round(statistics.median(latency) / max(statistics.median(peer), 1e-3), 1),
            "jobs_per_second": round(args.jobs / elapsed, 1),
            "jobs_per_second_ratio_to_target_40": round(args.jobs / elapsed / 40, 2),
            "seconds_to_create_all": round(creating, 1),
            "reconciles": int(reconciles),
            "reconcile_mean_ms": round(1000 * samples["kubetune_reconcile_duration_seconds_sum"] / reconciles, 1),
            "operator_rss_mb": round(rss, 1),
            "rss_ratio_to_target_250mb": round(rss / 250, 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        if operator is not None:
            operator.stop()
        cluster.down(home, progress=lambda _line: None)


if __name__ == "__main__":
    main()
