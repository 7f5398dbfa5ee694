"""The Dockerfile, checked without a Docker engine: what it copies exists, each target runs non-root,
the operator image holds no ML stack, and its entrypoints are real ``kubetune`` subcommands.

hadolint is not a test dependency; run it by hand: ``hadolint Dockerfile``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kubetune_cli.main import build_parser
from kubetune_operator.children.pod import NON_ROOT_UID
from tests.chart.conftest import CHART
from tests.conftest import REPO, load_yaml

pytestmark = pytest.mark.unit

DOCKERFILE = REPO / "Dockerfile"
TARGETS = ("operator", "trainer")
ML_STACK = {"torch", "transformers", "peft", "deepspeed", "accelerate", "bitsandbytes", "datasets"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    joined: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined]


def stages() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"cannot read FROM {rest}"
            current = Stage(name=match.group(2) or f"stage-{len(found)}", base=match.group(1))
            found[current.name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, rest))
    return found


def chain(name: str, found: dict[str, Stage]) -> list[Stage]:
    """The stage, the stages it is built FROM, and those it COPYs --from, recursively."""
    stage = found[name]
    result = [stage]
    if stage.base in found:
        result += chain(stage.base, found)
    for copy in stage.all("COPY"):
        source = re.search(r"--from=(\S+)", copy)
        if source and source.group(1) in found:
            result += chain(source.group(1), found)
    return result


def inherited(name: str, found: dict[str, Stage], keyword: str) -> str | None:
    """The last value of ``keyword`` in the stage or, if it has none, in the stage it is built FROM."""
    stage = found[name]
    values = stage.all(keyword)
    if values:
        return values[-1]
    return inherited(stage.base, found, keyword) if stage.base in found else None


def exec_form(value: str | None) -> list[str]:
    assert value is not None
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{value} is not the exec (JSON) form"
    return [str(part) for part in parsed]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(Path(candidate).name, pattern[3:])
            ):
                verdict = not negate
    return verdict


@pytest.fixture(scope="module")
def found() -> dict[str, Stage]:
    return stages()


def test_both_targets_exist(found: dict[str, Stage]) -> None:
    assert set(TARGETS) <= set(found)


def test_base_images_are_tagged(found: dict[str, Stage]) -> None:
    for stage in found.values():
        if stage.base not in found:
            assert ":" in stage.base, f"{stage.name}: tag {stage.base}"
            assert not stage.base.endswith(":latest"), f"{stage.name}: pin {stage.base} to a version"


def test_every_copy_source_exists_and_is_in_the_context(found: dict[str, Stage]) -> None:
    copied = []
    for stage in found.values():
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in copy:
                continue
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            copied += words[:-1]
    assert copied, "nothing is copied from the context"
    for source in copied:
        matches = list(REPO.glob(source.rstrip("/")))
        assert matches, f"COPY {source}: not in the repository"
        assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    # pip install . needs the project's metadata and every package folder setuptools looks in.
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"]}
    needed |= set(project["tool"]["setuptools"]["packages"]["find"]["where"])
    assert needed <= {s.rstrip("/") for s in copied}


def test_pip_always_installs_the_pinned_versions(found: dict[str, Stage]) -> None:
    installs = [
        command
        for stage in found.values()
        for run in stage.all("RUN")
        for command in run.split("&&")
        if "pip install" in command
    ]
    assert installs
    for command in installs:
        assert re.search(r"(--constraint|-c)\s+constraints\.txt", command), f"unpinned: {command.strip()}"
        assert "--no-cache-dir" in command


def extras(stages_: list[Stage]) -> set[str]:
    return {
        extra
        for stage in stages_
        for run in stage.all("RUN")
        for group in re.findall(r"\.\[([\w,-]+)\]", run)
        for extra in group.split(",")
    }


def test_operator_image_installs_no_ml_stack(found: dict[str, Stage]) -> None:
    operator = chain("operator", found)
    assert extras(operator) == {"operator"}
    text = " ".join(rest for stage in operator for _, rest in stage.instructions).lower()
    assert not any(re.search(rf"\b{name}\b", text) for name in ML_STACK)
    # ... and nothing in the operator extra pulls the ML stack in, however deep.
    closure = _requirement_closure("kubetune", {"operator"})
    assert not closure & ML_STACK, sorted(closure & ML_STACK)
    assert {"kopf", "kubernetes", "prometheus-client"} <= closure


def test_trainer_image_installs_the_trainer_extra(found: dict[str, Stage]) -> None:
    assert "trainer" in extras(chain("trainer", found))
    assert "torch" in _requirement_closure("kubetune", {"trainer"})


def _requirement_closure(package: str, wanted_extras: set[str]) -> set[str]:
    """Distribution names that ``package[extras]`` installs, from this environment's metadata."""
    seen: set[str] = set()
    pending: list[tuple[str, set[str]]] = [(package, wanted_extras)]
    while pending:
        name, active = pending.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in active | {""}):
                continue
            dependency = re.sub(r"[-_.]+", "-", requirement.name).lower()
            if dependency not in seen:
                seen.add(dependency)
                pending.append((dependency, set(requirement.extras)))
    return seen


@pytest.mark.parametrize("target", TARGETS)
def test_final_stages_run_as_an_unprivileged_numeric_user(found: dict[str, Stage], target: str) -> None:
    user = inherited(target, found, "USER")
    assert user is not None, f"{target} runs as root (no USER)"
    uid = user.split(":")[0]
    # Kubernetes can verify runAsNonRoot only for a numeric user.
    assert uid.isdigit(), f"{target}: USER {user} is not numeric"
    assert int(uid) != 0
    assert int(uid) == NON_ROOT_UID, "the UID the operator gives training pods, and the chart's runAsUser"
    chart_user = load_yaml(CHART / "values.yaml")["securityContext"]["runAsUser"]
    assert int(uid) == chart_user


def test_operator_image_runs_the_operator(found: dict[str, Stage]) -> None:
    entrypoint = exec_form(inherited("operator", found, "ENTRYPOINT"))
    command = exec_form(inherited("operator", found, "CMD"))
    assert entrypoint[0] == "kubetune"
    assert build_parser().parse_args([*entrypoint[1:], *command]).command == "operator"


def test_trainer_image_runs_train(found: dict[str, Stage]) -> None:
    entrypoint = exec_form(inherited("trainer", found, "ENTRYPOINT"))
    assert entrypoint[0] == "kubetune"
    args = build_parser().parse_args([*entrypoint[1:], "train", "--config", "/etc/kubetune/config.json"])
    assert args.command == "train"


def test_trainer_image_alone_prints_the_help(found: dict[str, Stage], capsys: pytest.CaptureFixture[str]) -> None:
    entrypoint = exec_form(inherited("trainer", found, "ENTRYPOINT"))
    command = exec_form(inherited("trainer", found, "CMD"))
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*entrypoint[1:], *command])
    assert exited.value.code == 0
    assert "train" in capsys.readouterr().out


def test_trainer_image_runs_serve() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "serve" in commands.choices


def test_console_script_is_kubetune() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["kubetune"] == "kubetune_cli.main:main"
