"""Deleting a job while one of its passes is in flight: the release waits for the pass, and no pass
acts afterwards (a pass that listed its Jobs while garbage collection removed them would otherwise
apply a NodePool after the finalizer released it: cluster-scoped, they would never go away)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kubetune_operator import names
from kubetune_operator.controller import Controller
from kubetune_operator.settings import OperatorSettings
from tests.conftest import REPO, load_yaml

TRAIN_POOL = names.node_pool("ml", "support-bot", names.ROLE_TRAINER)

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


class SlowKube:
    """Stands in for the API module: the first list of Jobs blocks until the test lets it go."""

    def __init__(self) -> None:
        self.listing = threading.Event()
        self.go_on = threading.Event()
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.pools: dict[str, Obj] = {}

    def installed(self, api_version: str, kind: str) -> bool:
        return True

    def list(
        self, api_version: str, kind: str, *, namespace: str | None = None, labels: str | None = None
    ) -> list[Obj]:
        if kind == "Job" and not self.listing.is_set():
            self.listing.set()
            assert self.go_on.wait(10)
        if kind == "NodePool":
            return list(self.pools.values())
        return []

    def create(self, manifest: Obj) -> bool:
        self.created.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        return True

    def apply(self, manifest: Obj) -> Obj:
        self.created.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        if manifest["kind"] == "NodePool":
            self.pools[manifest["metadata"]["name"]] = manifest
        return manifest

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        self.deleted.append(f"{kind}/{name}")
        self.pools.pop(name, None)

    def merge_patch(self, obj: Obj, patch: Obj) -> None:
        pass

    def write_status(self, namespace: str, name: str, status: Obj) -> None:
        pass

    def event(self, involved: Obj, event_type: str, reason: str, message: str) -> None:
        pass


def test_release_waits_for_the_pass_in_flight_and_no_pass_acts_after_it() -> None:
    kube = SlowKube()
    controller = Controller(kube, OperatorSettings())  # type: ignore[arg-type]
    obj = load_yaml(REPO / "examples" / "karpenter-aks.yaml")
    obj["metadata"].update(uid="uid-1", generation=1, creationTimestamp="2026-11-29T10:00:00Z", resourceVersion="1")
    obj["spec"]["preflight"] = {"enabled": False}  # straight to the NodePool
    obj["spec"]["runPolicy"].pop("queueName")  # no Kueue to wait for

    in_flight = threading.Thread(target=controller.reconcile, args=(obj,))
    in_flight.start()
    assert kube.listing.wait(10), "the pass started"
    released: list[int] = []
    release = threading.Thread(target=lambda: released.append(controller.release("ml", "support-bot", "uid-1")))
    release.start()
    time.sleep(0.3)
    assert not released, "the release waits for the pass in flight"
    kube.go_on.set()
    in_flight.join(10)
    release.join(10)
    assert f"NodePool/{TRAIN_POOL}" in kube.created, "the pass in flight applied its pool"
    assert [d for d in kube.deleted if d.startswith("NodePool/")] == [f"NodePool/{TRAIN_POOL}"], (
        "and the release removed it"
    )
    assert released == [0], "nothing left"
    before = list(kube.created)
    assert controller.reconcile(obj) is None
    assert kube.created == before, "no pass acts once the deletion began"


class ReleaseKube:
    """A job with a running gang on its pool's nodes: what the finalizer's release does to it."""

    def __init__(self) -> None:
        self.pools = [{"metadata": {"name": TRAIN_POOL}}]
        self.claims = [{"metadata": {"name": f"{TRAIN_POOL}-abcde"}}]
        running = {"metadata": {"name": "support-bot-train-0"}, "spec": {}, "status": {"active": 2}}
        done = {
            "metadata": {"name": "support-bot-preflight"},
            "spec": {},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]},
        }
        self.jobs = [running, done]
        self.patched: list[tuple[str, Obj]] = []
        self.deleted: list[str] = []

    def installed(self, api_version: str, kind: str) -> bool:
        return True

    def list(
        self, api_version: str, kind: str, *, namespace: str | None = None, labels: str | None = None
    ) -> list[Obj]:
        found: dict[str, list[Obj]] = {"NodePool": self.pools, "NodeClaim": self.claims, "Job": self.jobs}
        return found[kind]

    def merge_patch(self, obj: Obj, patch: Obj) -> None:
        self.patched.append((f"{obj['kind']}/{obj['metadata']['namespace']}/{obj['metadata']['name']}", patch))

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        self.deleted.append(f"{kind}/{name}")
        self.pools = []


def test_release_deletes_the_pools_stops_the_gang_and_counts_what_remains() -> None:
    kube = ReleaseKube()
    controller = Controller(kube, OperatorSettings())  # type: ignore[arg-type]
    assert controller.release("ml", "support-bot", "uid-1") == 1, "the claim is still draining"
    assert kube.deleted == [f"NodePool/{TRAIN_POOL}"]
    # Karpenter never evicts a running do-not-disrupt pod: the gang is stopped so that the node drains.
    assert kube.patched == [("Job/ml/support-bot-train-0", {"spec": {"suspend": True}})]
    kube.claims = []
    assert controller.release("ml", "support-bot", "uid-1") == 0
