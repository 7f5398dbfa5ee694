"""The Argo CD health check of a FineTuneJob, run for real in Lua (lupa).

Argo CD runs health scripts in gopher-lua, a Lua 5.1 where every number is a float; the script is
run here under Lua 5.1 with float numbers, as Argo CD would, and under the newest Lua with integers.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.unit

ARGOCD = REPO / "deploy" / "argocd"
SCRIPT = (ARGOCD / "finetunejob-health.lua").read_text(encoding="utf-8")
KEY = "resource.customizations.health.kubetune.io_FineTuneJob"
LUAS = ["lupa.lua51", "lupa"]


def as_floats(value: Any) -> Any:
    """``value`` with every int as a float, the way gopher-lua sees a JSON number."""
    if isinstance(value, dict):
        return {k: as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_floats(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def health(obj: dict[str, Any], module: str = "lupa", *, floats: bool = False) -> tuple[str, str]:
    """Run the script with ``obj`` as Argo CD does and return its ``(status, message)``."""
    runtime = importlib.import_module(module).LuaRuntime()
    # Dicts and lists become Lua tables all the way down (lists 1-based, as ipairs needs).
    runtime.globals().obj = runtime.table_from(as_floats(obj) if floats else obj, recursive=True)
    result = runtime.execute(SCRIPT)
    assert result is not None, "the script returned nothing"
    return str(result["status"]), str(result["message"])


def job(phase: str | None = None, *, generation: int = 3, observed: int | None = 3, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-bot", "namespace": "ml", "generation": generation},
        "spec": {"model": {"source": "hf://org/model"}, "dataset": {"source": "hf://org/data"}},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, **status}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


def cond(kind: str, status: str = "True", reason: str = "Because", message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }


@pytest.fixture(
    params=[(m, f) for m in LUAS for f in (False, True)], ids=lambda p: f"{p[0]}-{'float' if p[1] else 'int'}"
)
def run(request: pytest.FixtureRequest) -> Any:
    module, floats = request.param

    def _run(obj: dict[str, Any]) -> tuple[str, str]:
        return health(obj, module, floats=floats)

    return _run


def test_no_status_waits_for_the_operator(run: Any) -> None:
    assert run(job()) == ("Progressing", "waiting for the operator")


def test_status_of_an_older_generation_waits_for_the_operator(run: Any) -> None:
    assert run(job("Complete", generation=4, observed=3, conditions=[cond("Complete")])) == (
        "Progressing",
        "waiting for the operator",
    )
    assert run(job("Complete", observed=None)) == ("Progressing", "waiting for the operator")


def test_failed_is_degraded_with_the_reason_and_message(run: Any) -> None:
    obj = job(
        "Failed",
        conditions=[
            cond("NodesReady", "True", "NodesReady", "2 nodes ready"),
            cond("Failed", "True", "InsufficientCapacity", "no Standard_NC24ads_A100_v4 in westeurope"),
        ],
    )
    assert run(obj) == ("Degraded", "InsufficientCapacity: no Standard_NC24ads_A100_v4 in westeurope")


def test_failed_without_its_condition_is_still_degraded(run: Any) -> None:
    assert run(job("Failed")) == ("Degraded", "Failed")
    assert run(job("Failed", conditions=[cond("Failed", reason="OOMKilled")])) == ("Degraded", "OOMKilled")


def test_complete_is_healthy(run: Any) -> None:
    status, _ = run(job("Complete", conditions=[cond("Complete", message="adapter published to oci://r/a:1")]))
    assert status == "Healthy"
    assert run(job("Complete")) == ("Healthy", "Complete")


def test_serving_and_ready_is_healthy_with_the_endpoint(run: Any) -> None:
    obj = job(
        "Serving",
        conditions=[cond("Complete"), cond("ServingReady", "True", "Available", "1/1 replicas ready")],
        endpoint={"url": "http://support-bot-serve.ml:8000/v1", "modelName": "support-bot"},
    )
    assert run(obj) == ("Healthy", "serving http://support-bot-serve.ml:8000/v1")
    assert run(job("Serving", conditions=[cond("ServingReady")])) == ("Healthy", "serving")


def test_serving_not_ready_is_progressing_with_its_message(run: Any) -> None:
    obj = job(
        "Serving",
        conditions=[cond("ServingReady", "False", "Unavailable", "0/2 replicas ready")],
        endpoint={"url": "http://x:8000/v1", "modelName": "x"},
    )
    assert run(obj) == ("Progressing", "0/2 replicas ready")
    unknown = job("Serving", conditions=[cond("ServingReady", "Unknown", "Pending", "waiting for the Deployment")])
    assert run(unknown) == ("Progressing", "waiting for the Deployment")
    assert run(job("Serving")) == ("Progressing", "waiting for the server to be ready")


def test_suspended_is_suspended(run: Any) -> None:
    obj = job("Suspended", conditions=[cond("Suspended", "True", "Suspended", "spec.runPolicy.suspend is true")])
    assert run(obj) == ("Suspended", "spec.runPolicy.suspend is true")
    assert run(job("Suspended")) == ("Suspended", "Suspended")


def test_training_shows_step_percent_and_loss(run: Any) -> None:
    obj = job("Training", progress={"step": 150, "totalSteps": 600, "percent": 25, "loss": 1.23456, "epoch": 0.5})
    assert run(obj) == ("Progressing", "step 150/600 (25%), loss 1.235")


def test_training_with_partial_or_no_progress(run: Any) -> None:
    assert run(job("Training", progress={"step": 0, "totalSteps": 600, "percent": 0})) == (
        "Progressing",
        "step 0/600 (0%)",
    )
    assert run(job("Training", progress={"step": 7})) == ("Progressing", "step 7")
    assert run(job("Training")) == ("Progressing", "Training")


def test_provisioning_shows_the_nodes_ready_condition(run: Any) -> None:
    obj = job("Provisioning", conditions=[cond("NodesReady", "False", "Provisioning", "1/2 NodeClaims ready")])
    assert run(obj) == ("Progressing", "1/2 NodeClaims ready")
    assert run(job("Provisioning")) == ("Progressing", "Provisioning")


def test_the_preflight_shows_what_it_checks(run: Any) -> None:
    message = "checking the sources, the model and the whole dataset on a CPU before provisioning"
    obj = job("Preflight", conditions=[cond("PreflightPassed", "False", "PreflightRunning", message)])
    assert run(obj) == ("Progressing", message)
    assert run(job("Preflight")) == ("Progressing", "Preflight")


def test_a_queued_job_says_why_kueue_has_not_admitted_it(run: Any) -> None:
    message = "waiting for Kueue to admit it from queue team-a: QuotaReserved False, Pending: insufficient unused quota"
    obj = job("Queued", conditions=[cond("Training", "False", "Queued", message)])
    assert run(obj) == ("Progressing", message)
    assert run(job("Queued")) == ("Progressing", "Queued")


@pytest.mark.parametrize("phase", ["Pending", "Initializing", "Publishing", "SomethingNew"])
def test_other_phases_are_progressing_with_the_phase(run: Any, phase: str) -> None:
    assert run(job(phase)) == ("Progressing", phase)


def test_a_status_without_generations_is_read_as_is() -> None:
    obj = job("Complete")
    del obj["metadata"]["generation"]
    assert health(obj) == ("Healthy", "Complete")


def test_lists_become_one_based_lua_tables() -> None:
    # The conditions are found with ipairs: a 0-based table would skip the first one.
    obj = job("Failed", conditions=[cond("Failed", reason="Only")])
    assert health(obj, "lupa.lua51", floats=True) == ("Degraded", "Only")


def test_the_config_map_embeds_the_same_lua() -> None:
    manifest = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text(encoding="utf-8"))
    assert manifest["kind"] == "ConfigMap"
    assert manifest["metadata"]["name"] == "argocd-cm"
    assert manifest["data"][KEY] == SCRIPT


def test_the_readme_names_the_key_and_the_files() -> None:
    readme = (ARGOCD / "README.md").read_text(encoding="utf-8")
    assert 3 <= len(readme.strip().splitlines()) <= 10
    assert "finetunejob-health.lua" in readme
    assert "argocd-cm.yaml" in readme
    assert KEY in readme


MODEL_SERVER_SCRIPT = (ARGOCD / "modelserver-health.lua").read_text(encoding="utf-8")


@pytest.mark.parametrize("module", LUAS)
@pytest.mark.parametrize(
    ("status", "spec", "expected"),
    [
        (None, {}, ("Progressing", "waiting for the kubetune operator")),
        (
            {"phase": "Ready", "observedGeneration": 2, "conditions": [cond("Ready", message="2/2 ready")]},
            {},
            ("Healthy", "2/2 ready"),
        ),
        (
            {"phase": "Ready", "observedGeneration": 1},
            {},
            ("Progressing", "the operator has not seen the latest spec yet"),
        ),
        (
            {
                "phase": "NotReady",
                "observedGeneration": 2,
                "conditions": [cond("Ready", "False", message="adapters still loading: a")],
            },
            {},
            ("Progressing", "adapters still loading: a"),
        ),
        ({"phase": "Pending", "observedGeneration": 2}, {"replicas": 0}, ("Suspended", "spec.replicas is 0")),
    ],
)
def test_model_server_health(
    module: str, status: dict[str, Any] | None, spec: dict[str, Any], expected: tuple[str, str]
) -> None:
    obj: dict[str, Any] = {"metadata": {"name": "shared", "generation": 2}, "spec": spec}
    if status is not None:
        obj["status"] = status
    runtime = importlib.import_module(module).LuaRuntime()
    runtime.globals().obj = runtime.table_from(as_floats(obj), recursive=True)
    result = runtime.execute(MODEL_SERVER_SCRIPT)
    assert (str(result["status"]), str(result["message"])) == expected


def test_the_config_map_holds_the_model_server_script() -> None:
    manifest = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text(encoding="utf-8"))
    assert manifest["data"]["resource.customizations.health.kubetune.io_ModelServer"] == MODEL_SERVER_SCRIPT
