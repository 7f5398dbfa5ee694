"""Find or build the control-plane binaries: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kubectl and helm.

No Docker and no prebuilt downloads: each binary is compiled from its Go module through the
module proxy. Kubernetes is built from a small wrapper module that requires
``k8s.io/kubernetes`` and replaces each staging module (read from that release's own go.mod)
with its published ``v0.<minor>.<patch>`` release. Results are cached outside the repository,
keyed by version; binaries in ``KUBEBUILDER_ASSETS`` are used instead of building.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

K8S_VERSION: Final = "v1.35.4"
"""Kubernetes release; v1.35 builds with Go 1.26 (newer releases may need a newer toolchain)."""
ETCD_VERSION: Final = "v3.6.16"
"""etcd release supported by that apiserver."""
HELM_VERSION: Final = "v3.20.2"
"""Helm release for the chart tests."""

KUBERNETES_BINARIES: Final = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_BINARIES: Final = (*KUBERNETES_BINARIES, "etcd", "helm")

_ETCD_MAIN: Final = """package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

// The etcd binary's main package lives in the root module, which is not published for every
// release; etcdmain.Main is the whole of it.
func main() { etcdmain.Main(os.Args) }
"""

Progress = Callable[[str], None]


def cache_root() -> Path:
    """Where built binaries are kept: ``$KUBETUNE_CACHE`` or ``~/.cache/kubetune``."""
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "k8s"


def cache_dir(version: str = K8S_VERSION) -> Path:
    return cache_root() / version / "bin"


class BuildError(RuntimeError):
    """A ``go`` step failed; the message carries the tail of its output."""


@dataclass(frozen=True, slots=True)
class Binaries:
    """Absolute paths of the control-plane binaries."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    helm: Path | None

    @property
    def directory(self) -> Path:
        return self.kube_apiserver.parent


def _candidates(name: str, version: str) -> list[Path]:
    """Where to look, in order: KUBEBUILDER_ASSETS, then this version's cache.

    PATH is not searched: a machine's own kubectl is often another release (a cloud SDK's
    dispatcher, say), and the runtime wants one consistent set matching its apiserver.
    """
    found: list[Path] = []
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found.append(Path(assets) / name)
    found.append(cache_dir(version) / name)
    return found


def locate(name: str, version: str = K8S_VERSION) -> Path | None:
    """The first executable ``name`` from KUBEBUILDER_ASSETS, then the cache."""
    for path in _candidates(name, version):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def ensure_binaries(
    version: str = K8S_VERSION, *, with_helm: bool = True, progress: Progress | None = None
) -> Binaries:
    """Locate every binary, building the missing ones into the cache (minutes the first time)."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    wanted = ALL_BINARIES if with_helm else ALL_BINARIES[:-1]
    missing = [name for name in wanted if locate(name, version) is None]
    if missing:
        say(f"building {', '.join(missing)} from Go modules into {cache_dir(version)} (first run only: ~10 min)")
        started = time.monotonic()
        _Builder(version, say).build(missing)
        say(f"built {len(missing)} binaries in {time.monotonic() - started:.0f}s")
    paths = {name: locate(name, version) for name in wanted}
    absent = [name for name, path in paths.items() if path is None]
    if absent:
        raise BuildError(f"still missing after the build: {', '.join(absent)}")

    def must(name: str) -> Path:
        path = paths[name]
        assert path is not None
        return path

    return Binaries(
        etcd=must("etcd"),
        kube_apiserver=must("kube-apiserver"),
        kube_controller_manager=must("kube-controller-manager"),
        kube_scheduler=must("kube-scheduler"),
        kubectl=must("kubectl"),
        helm=paths.get("helm"),
    )


def go_env() -> dict[str, str]:
    """The environment of every ``go`` step: the installed toolchain (no automatic download of
    another), static binaries, and go.mod files completed from the module proxy as needed."""
    return {
        **os.environ,
        "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "local"),
        "CGO_ENABLED": "0",
        "GOFLAGS": "-buildvcs=false -mod=mod",
    }


def run_go(what: str, args: list[str], *, cwd: Path, env: dict[str, str], say: Progress) -> str:
    """Run ``go args`` in ``cwd``; say a line every 30 s; raise BuildError with the output's tail on failure."""
    started = time.monotonic()
    say(f"  {what} ...")
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(["go", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(30):
                say(f"  {what}: still running ({time.monotonic() - started:.0f}s)")

        ticker = threading.Thread(target=heartbeat, daemon=True)
        ticker.start()
        code = process.wait()
        stop.set()
        log.seek(0)
        output = log.read()
    if code != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise BuildError(f"`go {' '.join(args[:3])} …` failed while {what} (exit {code}):\n{tail}")
    say(f"  {what}: {time.monotonic() - started:.0f}s")
    return output


def go_module(module: str, version: str, workdir: Path, *, env: dict[str, str]) -> Path:
    """``module@version``'s folder in the Go module cache, downloaded through the proxy when needed."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        check=False,
    )
    info = json.loads(result.stdout or "{}")
    if "Dir" not in info:
        raise BuildError(f"cannot fetch {module}@{version}: {info.get('Error') or result.stderr}")
    return Path(info["Dir"])


def build_wrapper(
    name: str,
    *,
    module: str,
    version: str,
    main_go: str,
    target: Path,
    work: Path,
    ldflags: str = "",
    say: Progress,
) -> None:
    """Build ``target`` from a generated wrapper module: ``main_go`` as its only file, requiring
    ``module@version``, its ``go`` line copied from that module's go.mod, the rest resolved by
    ``go mod tidy``. The binary is written beside ``target`` and renamed into place when complete."""
    env = go_env()
    upstream = go_module(module, version, work, env=env)
    declared = json.loads(subprocess.check_output(["go", "mod", "edit", "-json", str(upstream / "go.mod")], env=env))
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(f"module kubetune.local/build/{name}\n\ngo {declared['Go']}\n", encoding="utf-8")
    (work / "main.go").write_text(main_go, encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{name}.tmp"
    run_go(f"requiring {module}@{version}", ["mod", "edit", f"-require={module}@{version}"], cwd=work, env=env, say=say)
    run_go(f"downloading the modules {name} needs", ["mod", "tidy"], cwd=work, env=env, say=say)
    run_go(
        f"building {name}",
        ["build", "-trimpath", f"-ldflags=-s -w {ldflags}".strip(), "-o", str(temporary), "."],
        cwd=work,
        env=env,
        say=say,
    )
    temporary.replace(target)


class _Builder:
    """Runs the ``go`` commands, with a heartbeat on long steps and the output kept on failure."""

    def __init__(self, version: str, say: Progress) -> None:
        if shutil.which("go") is None:
            raise BuildError("the `go` command is not on PATH; install Go 1.26 or set KUBEBUILDER_ASSETS")
        self.version = version
        self.say = say
        self.out = cache_dir(version)
        self.work = cache_root() / version / "build"
        self.env = go_env()

    def build(self, missing: list[str]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        kubernetes = [name for name in missing if name in KUBERNETES_BINARIES]
        if kubernetes:
            self._kubernetes(kubernetes)
        if "etcd" in missing:
            self._etcd()
        if "helm" in missing:
            self._helm()

    # ------------------------------------------------------------------------- plumbing

    def _go(self, what: str, args: list[str], cwd: Path) -> str:
        return run_go(what, args, cwd=cwd, env=self.env, say=self.say)

    def _module(self, module: str, version: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(
            self._go(f"fetching {module}@{version}", ["mod", "download", "-json", f"{module}@{version}"], self.out)
        )
        return info

    def _wrapper(self, name: str, upstream_gomod: Path) -> Path:
        """A fresh wrapper module whose go and godebug lines mirror the upstream go.mod."""
        directory = self.work / name
        directory.mkdir(parents=True, exist_ok=True)
        upstream = json.loads(subprocess.check_output(["go", "mod", "edit", "-json", str(upstream_gomod)]))
        lines = [f"module kubetune.local/build/{name}", "", f"go {upstream['Go']}"]
        godebug = upstream.get("Godebug") or upstream.get("GoDebug") or []
        if godebug:
            lines += ["", "godebug (", *(f"\t{g['Key']}={g['Value']}" for g in godebug), ")"]
        (directory / "go.mod").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return directory

    @staticmethod
    def _local_replaces(gomod: Path, prefix: str) -> list[str]:
        """Modules that upstream replaces with a local directory starting with ``prefix``."""
        data = json.loads(subprocess.check_output(["go", "mod", "edit", "-json", str(gomod)]))
        return [r["Old"]["Path"] for r in data.get("Replace") or [] if r["New"]["Path"].startswith(prefix)]

    def _compile(self, name: str, package: str, cwd: Path, ldflags: str) -> None:
        temporary = self.out / f".{name}.tmp"
        self._go(
            f"building {name}",
            ["build", "-trimpath", f"-ldflags=-s -w {ldflags}", "-o", str(temporary), package],
            cwd,
        )
        temporary.replace(self.out / name)

    # ----------------------------------------------------------------------------- builds

    def _kubernetes(self, names: list[str]) -> None:
        info = self._module("k8s.io/kubernetes", self.version)
        gomod = Path(info["GoMod"])
        staging = self._local_replaces(gomod, "./staging/src/")
        if not staging:
            raise BuildError(f"no staging modules found in {gomod}")
        staging_version = "v0." + self.version.removeprefix("v1.")
        directory = self._wrapper("kubernetes", gomod)
        edits = [f"-require=k8s.io/kubernetes@{self.version}"]
        edits += [f"-replace={m}={m}@{staging_version}" for m in staging]
        subprocess.run(["go", "mod", "edit", *edits], cwd=directory, env=self.env, check=True)
        self._go(
            f"downloading Kubernetes modules ({len(staging)} staging modules at {staging_version})",
            ["get", *(f"k8s.io/kubernetes/cmd/{n}@{self.version}" for n in names)],
            directory,
        )
        minor = self.version.removeprefix("v1.").split(".")[0]
        stamp = {
            "gitVersion": self.version,
            "gitMajor": "1",
            "gitMinor": minor,
            "gitTreeState": "clean",
            "gitCommit": str((info.get("Origin") or {}).get("Hash", "")),
        }
        ldflags = " ".join(
            f"-X {package}.{key}={value}"
            for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
            for key, value in stamp.items()
            if value
        )
        for name in names:
            self._compile(name, f"k8s.io/kubernetes/cmd/{name}", directory, ldflags)

    def _etcd(self) -> None:
        info = self._module("go.etcd.io/etcd/server/v3", ETCD_VERSION)
        gomod = Path(info["GoMod"])
        siblings = self._local_replaces(gomod, "../")
        directory = self._wrapper("etcd", gomod)
        edits = [f"-require=go.etcd.io/etcd/server/v3@{ETCD_VERSION}"]
        edits += [f"-replace={m}={m}@{ETCD_VERSION}" for m in siblings]
        subprocess.run(["go", "mod", "edit", *edits], cwd=directory, env=self.env, check=True)
        (directory / "main.go").write_text(_ETCD_MAIN, encoding="utf-8")
        self._go("downloading etcd modules", ["mod", "tidy"], directory)
        self._compile("etcd", ".", directory, "")

    def _helm(self) -> None:
        info = self._module("helm.sh/helm/v3", HELM_VERSION)
        directory = self._wrapper("helm", Path(info["GoMod"]))
        subprocess.run(["go", "mod", "edit", f"-require=helm.sh/helm/v3@{HELM_VERSION}"], cwd=directory, check=True)
        self._go("downloading helm modules", ["get", f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"], directory)
        client_go = subprocess.check_output(
            ["go", "list", "-m", "-f", "{{.Version}}", "k8s.io/client-go"], cwd=directory, env=self.env, text=True
        ).strip()
        minor = client_go.removeprefix("v0.").split(".")[0]
        ldflags = " ".join(
            [
                f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
                "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
                "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor}",
                "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
                f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}",
            ]
        )
        self._compile("helm", "helm.sh/helm/v3/cmd/helm", directory, ldflags)


KARPENTER_VERSION: Final = "v1.13.0"
"""sigs.k8s.io/karpenter release whose CRDs the local runtime installs (newer ones need Go > 1.26.8)."""
KARPENTER_CRDS: Final = ("karpenter.sh_nodeclaims.yaml", "karpenter.sh_nodepools.yaml")


def karpenter_crds(progress: Progress | None = None) -> list[Path]:
    """Karpenter's own CRD files, taken from its Go module and cached beside the binaries."""
    target = cache_root().parent / "karpenter" / KARPENTER_VERSION
    paths = [target / name for name in KARPENTER_CRDS]
    if all(p.exists() for p in paths):
        return paths
    if shutil.which("go") is None:
        raise BuildError("the `go` command is needed once to fetch Karpenter's CRDs (sigs.k8s.io/karpenter)")
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"fetching Karpenter {KARPENTER_VERSION} CRDs from sigs.k8s.io/karpenter")
    module = karpenter_module(target, env={**os.environ, "GOFLAGS": "-mod=mod"})
    for path in paths:
        shutil.copyfile(module / "pkg" / "apis" / "crds" / path.name, path)
    return paths


def karpenter_module(workdir: Path, *, env: dict[str, str]) -> Path:
    """The sigs.k8s.io/karpenter module's folder in the Go module cache, downloaded when needed."""
    return go_module("sigs.k8s.io/karpenter", KARPENTER_VERSION, workdir, env=env)
