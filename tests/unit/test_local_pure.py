"""Pieces of the local runtime that need no cluster: DNS-name and mount-path rewriting, $(VAR)
expansion, and which processes `down` sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_local.catalog import CATALOG, capacity_of
from kubetune_local.network import AddressBook
from kubetune_local.pods.environment import command_line, environment, expand
from kubetune_local.pods.volumes import rewrite_paths

pytestmark = pytest.mark.unit


class TestAddressBook:
    def test_every_dns_form_of_a_pod_resolves_to_its_address(self) -> None:
        book = AddressBook()
        forms = [
            "job-0.gang",
            "job-0.gang.ml",
            "job-0.gang.ml.svc",
            "job-0.gang.ml.svc.cluster.local",
        ]
        resolved = {book.resolve(f"--master={form}:29500", "ml", {"gang"}) for form in forms}
        assert len(resolved) == 1
        (line,) = resolved
        address = line.removeprefix("--master=").removesuffix(":29500")
        assert address.startswith("127.")
        assert book.address_for_pod("uid-0", "job-0", "gang", "ml") == address, "reserved before the pod started"

    def test_names_in_other_namespaces_and_unknown_subdomains_are_distinct_or_untouched(self) -> None:
        book = AddressBook()
        here = book.resolve("job-0.gang", "ml", {"gang"})
        there = book.resolve("job-0.gang.other", "ml", {"gang"})
        assert here != there
        assert book.resolve("job-0.unknown.ml", "ml", {"gang"}) == "job-0.unknown.ml"
        assert book.resolve("example.org/job-0.gang.ml.example.com", "ml", {"gang"}).endswith("example.com")

    def test_pods_without_subdomain_get_distinct_addresses(self) -> None:
        book = AddressBook()
        assert book.address_for_pod("a", "a", None, "ml") != book.address_for_pod("b", "b", None, "ml")


class TestRewriting:
    def test_mount_paths_are_rewritten_longest_first_at_boundaries(self) -> None:
        mounts = {"/data": Path("/tmp/pvc"), "/data/models": Path("/tmp/models"), "/etc/cfg": Path("/tmp/cfg")}
        assert rewrite_paths("--config=/etc/cfg/config.json", mounts) == "--config=/tmp/cfg/config.json"
        assert rewrite_paths("/data/models/llama /data/out", mounts) == "/tmp/models/llama /tmp/pvc/out"
        assert rewrite_paths("/database /mydata /data", mounts) == "/database /mydata /tmp/pvc"

    def test_variable_expansion(self) -> None:
        env = {"RANK": "1", "HOST": "h"}
        assert expand("--node-rank=$(RANK) $(MISSING) $$(RANK)", env) == "--node-rank=1 $(MISSING) $(RANK)"

    @pytest.mark.parametrize(
        ("text", "expanded"),
        [
            ("a$$b", "a$b"),  # $$ is an escaped $ anywhere, as in Kubernetes
            ("$$$$", "$$"),
            ("$$$(RANK)", "$1"),
            ("price $5", "price $5"),
            ("end$", "end$"),
            ("$(RANK", "$(RANK"),
            ("$()", "$()"),
            ("$(RANK)$(RANK)", "11"),
        ],
    )
    def test_variable_expansion_follows_kubernetes(self, text: str, expanded: str) -> None:
        assert expand(text, {"RANK": "1"}) == expanded


class StubRuntime:
    """What environment() reads of the node runtime."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.apiserver_port = 6443
        self.addresses = AddressBook()

    def subdomains(self, namespace: str) -> set[str]:
        return set()

    def ports_being_released(self, uid: str) -> set[int]:
        return set()


class StubPod:
    """What environment() and command_line() read of a pod."""

    def __init__(self, root: Path) -> None:
        self.runtime = StubRuntime(root / "runtime")
        self.root = root / "pod"
        self.namespace, self.name, self.uid, self.hostname, self.node_name = "ml", "p", "uid-1", "p", "node"
        self.pod: dict[str, Any] = {"metadata": {"name": "p", "namespace": "ml", "uid": "uid-1"}, "spec": {}}
        self.spec: dict[str, Any] = {}


def test_commands_expand_only_the_containers_own_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubelet expands $(VAR) from the container's env, never from its own: the daemon's secrets stay out."""
    monkeypatch.setenv("SOME_VAR", "the-daemons-secret")
    container = {
        "name": "main",
        "command": [
            "serve",
            "leak-$(SOME_VAR)",
            "$(DECLARED)",
            "$$(DECLARED)",
            "$(LATER)",
            "$(KUBERNETES_SERVICE_PORT)",
        ],
        "env": [
            {"name": "DECLARED", "value": "mine"},
            {"name": "LATER", "value": "$(DECLARED)-$(SOME_VAR)"},
        ],
    }
    pod = StubPod(tmp_path)
    env = environment(pod, container, {})  # type: ignore[arg-type]
    argv = command_line(pod, container, env, {})  # type: ignore[arg-type]
    assert argv == ["serve", "leak-$(SOME_VAR)", "mine", "$(DECLARED)", "mine-$(SOME_VAR)", "6443"]


class TestCatalog:
    def test_gpu_types_have_their_gpus_and_the_cpu_type_none(self) -> None:
        assert capacity_of(CATALOG["p4d.24xlarge"])["nvidia.com/gpu"] == "8"
        assert "nvidia.com/gpu" not in capacity_of(CATALOG["local-cpu"])


def test_down_sweeps_marked_processes_but_not_the_users_own(tmp_path: Path) -> None:
    """`kubetune local down` with KUBETUNE_LOCAL_HOME exported must not kill the shell or make that ran it."""
    from kubetune_local.cluster import _ancestors, marked_processes  # noqa: PLC0415 - only here
    from kubetune_local.controlplane import MARK_ENV  # noqa: PLC0415 - only here

    home = tmp_path / "home"
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    pod = subprocess.Popen(sleeper, env={**os.environ, MARK_ENV: str(home)})
    user = subprocess.Popen(sleeper, env={**os.environ, "KUBETUNE_LOCAL_HOME": str(home)})
    try:
        found = marked_processes(home)
        assert pod.pid in found
        assert user.pid not in found
        assert os.getpid() in _ancestors()
        assert os.getppid() in _ancestors()
    finally:
        pod.kill()
        user.kill()
        pod.wait()
        user.wait()


class FlakyCore:
    """The pod-status patch of a busy apiserver: answers with ``failures`` in turn, then takes the write."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)


class LoggedRuntime:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


class StatusPod:
    def __init__(self, core: FlakyCore) -> None:
        self.core, self.runtime, self.name, self.namespace = core, LoggedRuntime(), "p", "ml"


class TestStatusWrites:
    """A kubelet never stops a pod's processes because the apiserver was busy: it writes the status again."""

    def write(self, core: FlakyCore) -> tuple[bool, StatusPod]:
        from kubetune_local.pods.status import write_status  # noqa: PLC0415

        pod = StatusPod(core)
        return write_status(pod, {"phase": "Running"}, pause=0), pod  # type: ignore[arg-type]

    def test_a_busy_apiserver_is_asked_again(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415
        from urllib3.exceptions import ProtocolError  # noqa: PLC0415

        core = FlakyCore(ApiException(status=503, reason="Service Unavailable"), ProtocolError("connection dropped"))
        written, pod = self.write(core)
        assert written
        assert core.calls == 3
        assert pod.runtime.lines == []

    def test_one_that_stays_busy_is_left_for_the_next_report_and_said(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        core = FlakyCore(*(ApiException(status=429, reason="Too Many Requests") for _ in range(5)))
        written, pod = self.write(core)
        assert not written
        assert core.calls == 3
        assert pod.runtime.lines == [
            "pod ml/p: status not written (HTTP 429 Too Many Requests); writing it again later"
        ]

    def test_a_gone_pod_has_nothing_left_to_write_and_a_bad_status_is_a_bug(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        assert self.write(FlakyCore(ApiException(status=404, reason="Not Found")))[0]
        with pytest.raises(ApiException):
            self.write(FlakyCore(ApiException(status=422, reason="Unprocessable Entity")))
