"""Argument parsing and dispatch for ``kubetune``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

#: Exit code for bad input (an invalid manifest or config): retrying will not help.
EXIT_INVALID = 2


#: Karpenter's pattern for consolidateAfter (its NodePool CRD).
CONSOLIDATE_AFTER = r"([0-9]+(s|m|h))+|Never"


def _crd(args: argparse.Namespace) -> int:
    from kubetune_operator.crd import build_crd, build_model_server_crd, render_crd

    if args.reference:
        from kubetune_operator.reference import render_reference

        text = render_reference(build_model_server_crd() if args.kind == "ModelServer" else build_crd())
    else:
        text = render_crd(args.kind)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from kubetune_api import InvalidManifestError
    from kubetune_api.modelserver import load_model_server
    from kubetune_api.resource import load_job

    failed = 0
    for name in args.files:
        path = Path(name)
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            failed += 1
            continue
        for index, document in enumerate(documents):
            label = f"{path}" if len(documents) == 1 else f"{path} (document {index + 1})"
            if isinstance(document, dict) and document.get("kind") == "PersistentVolumeClaim":
                continue  # the claims examples set up beside a job or a server are Kubernetes' to check
            try:
                if isinstance(document, dict) and document.get("kind") == "ModelServer":
                    what = f"ModelServer {load_model_server(document, source=label).name}"
                else:
                    job = load_job(document, allow_local_paths=args.allow_local_paths, source=label)
                    what = f"FineTuneJob {job.name}"
            except InvalidManifestError as exc:
                print(exc, file=sys.stderr)
                failed += 1
            else:
                print(f"{label}: {what} is valid")
    return EXIT_INVALID if failed else 0


def _local(args: argparse.Namespace) -> int:
    from kubetune_local import cluster
    from kubetune_local.controlplane import default_home
    from kubetune_local.karpenter import KWOK_NODE_CLASS, NODECLASS_NAME

    home = Path(args.home) if args.home else default_home()
    if args.action == "build":
        from kubetune_local.binaries import ensure_binaries, karpenter_crds
        from kubetune_local.karpenter import ensure_binary, nodeclass_crd

        found = ensure_binaries()
        karpenter_crds()
        print(f"control-plane binaries ready in {found.directory}")
        print(f"Karpenter (KWOK provider) ready: {ensure_binary()}")
        nodeclass_crd()
        from kubetune_local import kueue

        if args.kueue or kueue.enabled_by_environment():
            print(f"Kueue {kueue.KUEUE_VERSION} ready: {kueue.ensure_binary()}")
            kueue.manifests()
    elif args.action == "up":
        try:
            started = cluster.up(home, kueue=args.kueue or None)
        except cluster.AlreadyRunning as exc:
            print(exc, file=sys.stderr)
            return 1
        print(
            f"local cluster ready in {started.seconds_to_ready:.1f}s "
            "(node: kubetune-local; Karpenter launches the nodes of NodePools of the KWOK NodeClass "
            f"{KWOK_NODE_CLASS[0]}/{KWOK_NODE_CLASS[1]}/{NODECLASS_NAME}"
            f"{'; Kueue admits queued Jobs' if started.state.kueue else ''})"
        )
        print(f"export KUBECONFIG={started.kubeconfig}")
    elif args.action == "down":
        stopped = cluster.down(home)
        print(
            f"stopped {len(stopped)} processes; nothing of the local cluster runs" if stopped else "nothing was running"
        )
    elif args.action == "status":
        print(cluster.status(home))
    elif args.action == "logs":
        if not args.pod:
            print("kubetune local logs: name a pod", file=sys.stderr)
            return EXIT_INVALID
        sys.stdout.write(cluster.pod_log(home, args.pod, namespace=args.namespace, container=args.container))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kubetune_cli.demo import DemoError, run_demo
    from kubetune_local.controlplane import default_home

    try:
        return run_demo(Path(args.home) if args.home else default_home())
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


def _operator(args: argparse.Namespace) -> int:
    import logging

    from kubetune_api.trainer_config import network
    from kubetune_operator.handlers import run_operator
    from kubetune_operator.settings import NodeClassRef, OperatorSettings

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    group, kind, name = (
        args.node_class.split("/") if args.node_class else ("karpenter.azure.com", "AKSNodeClass", "default")
    )
    try:
        networks = tuple(network(text) for text in args.allow_private_network or ())
    except ValueError as exc:
        print(f"kubetune operator: --allow-private-network: {exc}", file=sys.stderr)
        return 2
    if not re.fullmatch(CONSOLIDATE_AFTER, args.consolidate_after):
        print(
            f"kubetune operator: --consolidate-after {args.consolidate_after!r}: expected a duration such as 30s, "
            "5m or 1h30m, or Never",
            file=sys.stderr,
        )
        return 2
    settings = OperatorSettings(
        trainer_image=args.trainer_image,
        vllm_image=args.vllm_image,
        namespaces=tuple(args.namespace or ()),
        metrics_port=args.metrics_port,
        peering=args.peering,
        peering_priority=args.peering_priority,
        health_port=args.health_port,
        progress_interval_seconds=args.progress_interval,
        node_class=NodeClassRef(group=group, kind=kind, name=name),
        consolidate_after=args.consolidate_after,
        private_networks=networks,
        preflight_cpu=args.preflight_cpu,
        preflight_memory=args.preflight_memory,
        preflight_deadline_seconds=args.preflight_deadline,
    )
    run_operator(settings, standalone=args.peering is None)
    return 0


def _train(args: argparse.Namespace) -> int:
    from kubetune_trainer.training.launch import main as train

    return train(args)


def _preflight(args: argparse.Namespace) -> int:
    from kubetune_trainer.training.preflight import main as preflight

    return preflight(args)


def _plan(args: argparse.Namespace) -> int:
    from kubetune_trainer.training.plan_command import main as plan

    return plan(args)


def _serve(args: argparse.Namespace) -> int:
    from kubetune_trainer.serving.serve import main as serve

    return serve(args)


def _publish(args: argparse.Namespace) -> int:
    from kubetune_trainer.publishing.commands import main as publish

    return publish(args)


def _pull(args: argparse.Namespace) -> int:
    from kubetune_trainer.publishing.commands import pull_main

    return pull_main(args)


def _fetch_model(args: argparse.Namespace) -> int:
    from kubetune_trainer.publishing.commands import fetch_model_main

    return fetch_model_main(args)


def _toy_model(args: argparse.Namespace) -> int:
    from kubetune_trainer.toy import ToySize, build_toy

    folder = build_toy(
        Path(args.folder),
        size=ToySize(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads),
        fmt=args.format,
    )
    print(f"wrote {folder}/model (tiny Llama + tokenizer), {folder}/data/train.jsonl and {folder}/finetunejob.yaml")
    print(f"try: kubetune train --config {folder}/finetunejob.yaml --output {folder}/out")
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s flags, declared here so that ``kubetune --help`` needs no ML stack."""
    parser.add_argument("--model", required=True, metavar="PATH", help="folder of the base model and its tokenizer")
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="a PEFT adapter folder, served as model NAME (repeatable)",
    )
    parser.add_argument("--base-name", default="base", help="model name of the base without adapters (default base)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=1024,
        help="the most tokens one request may generate (default 1024; also chat's default max_tokens)",
    )
    parser.add_argument("--device", help="torch device (default cuda when there is a GPU, else cpu)")
    parser.add_argument(
        "--runtime-adapters",
        metavar="DIR",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM), for adapters inside DIR only",
    )
    parser.add_argument(
        "--adapters-file",
        metavar="FILE",
        help="a JSON object {name: path} of adapters (inside --runtime-adapters) loaded before /readyz answers 200",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="the most requests generated together (default 16)")
    parser.add_argument(
        "--max-queued", type=int, default=64, help="the most requests waiting for the batch; more get 429 (default 64)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="requests arriving while more connections are open get 503 (default 1024)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds for a request's headers, and then its body, to arrive (default 10)",
    )
    parser.add_argument(
        "--write-timeout",
        type=float,
        default=30.0,
        help="seconds a streaming client may read nothing before it is dropped (default 30)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds one request's answer may take; then 504 and its generation ends (default 600)",
    )


def _add_trainer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``train``, ``preflight``, ``plan``, ``serve``, ``publish``, ``pull``, ``fetch-model`` and ``toy-model``: the trainer's subcommands."""
    train = commands.add_parser(
        "train",
        help="fine-tune as the config says (one process, or torchrun for several); exit 2 on bad config or data",
    )
    train.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="a TrainerConfig (rendered by the operator) or a FineTuneJob manifest with local paths",
    )
    train.add_argument(
        "--output", metavar="DIR", help="folder for checkpoints, adapter and summary (required with a FineTuneJob)"
    )
    train.add_argument("--nnodes", type=int, help="nodes in the gang (default 1)")
    train.add_argument("--node-rank", type=int, default=0, help="this node's rank (default 0)")
    train.add_argument(
        "--nproc-per-node",
        type=int,
        help="processes per node (default: spec.distributed.processesPerNode, else one per GPU, else 1)",
    )
    train.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    train.add_argument(
        "--master-port", type=int, help="rendezvous port on node 0 (default spec.distributed.masterPort)"
    )
    train.add_argument("--metrics-port", type=int, help="port of rank 0's Prometheus metrics (default: the config's)")
    train.set_defaults(run=_train)

    preflight = commands.add_parser(
        "preflight",
        help="check the sources, the model's layout and the whole dataset on a CPU, as training will; JSON findings last",
    )
    preflight.add_argument(
        "--config", required=True, metavar="FILE", help="a TrainerConfig, or a FineTuneJob manifest with --output"
    )
    preflight.add_argument("--output", metavar="DIR", help="the job's output folder (required with a FineTuneJob)")
    preflight.add_argument(
        "--keep",
        action="store_true",
        help="leave the tokenized data in OUTPUT/.preflight/ for training to reuse (the operator passes it "
        "when the job's volume is shared)",
    )
    preflight.set_defaults(run=_preflight)

    plan = commands.add_parser("plan", help="estimate each device's peak memory for a job and suggest what would fit")
    plan.add_argument("file", metavar="FILE", help="a FineTuneJob manifest or TrainerConfig")
    plan.add_argument(
        "--model-config",
        metavar="CONFIG_JSON",
        help="the model's config.json (default: read from the model source when it is a local folder)",
    )
    plan.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GiB",
        help="memory of one device in GiB (default: resources.gpuMemoryGiB, else one GPU of instanceType when known, else 80)",
    )
    plan.set_defaults(run=_plan)

    serve = commands.add_parser(
        "serve", help="answer OpenAI-style completion and chat calls with a base model and its PEFT adapters"
    )
    _serve_arguments(serve)
    serve.set_defaults(run=_serve)

    publish = commands.add_parser(
        "publish",
        help="publish the trained adapter (or model) to spec.output.destination (pvc:// or oci://); JSON result last",
    )
    publish.add_argument(
        "--config", required=True, metavar="FILE", help="the TrainerConfig, or a FineTuneJob manifest with --output"
    )
    publish.add_argument("--output", metavar="DIR", help="the training's output folder (required with a FineTuneJob)")
    publish.add_argument(
        "--default-uri",
        metavar="URI",
        help="the result's uri when spec.output.destination is unset (the operator's pvc://<claim>/adapter)",
    )
    publish.set_defaults(run=_publish)

    pull = commands.add_parser("pull", help="pull an adapter image (oci://) so that its files land directly in DIR")
    pull.add_argument("reference", metavar="oci://REGISTRY/REPOSITORY:TAG", help="the image or artifact to pull")
    pull.add_argument("folder", metavar="DIR", help="where the adapter's files go (data/ is stripped)")
    pull.add_argument(
        "--docker-config",
        metavar="FILE",
        help="a Docker config.json with credentials (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json)",
    )
    pull.set_defaults(run=_pull)

    fetch = commands.add_parser("fetch-model", help="fetch spec.model.source into DIR (for the serving pod)")
    fetch.add_argument("--config", required=True, metavar="FILE", help="a TrainerConfig or FineTuneJob manifest")
    fetch.add_argument("--into", required=True, metavar="DIR", help="the folder that will hold the model's files")
    fetch.set_defaults(run=_fetch_model)

    toy = commands.add_parser(
        "toy-model", help="write a tiny Llama, its tokenizer and a learnable toy dataset (for demos and tests)"
    )
    toy.add_argument("folder", metavar="DIR", help="where to write model/, data/train.jsonl and finetunejob.yaml")
    toy.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    toy.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    toy.add_argument("--intermediate", type=int, default=128, help="MLP width (default 128)")
    toy.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    toy.add_argument(
        "--format",
        default="prompt-completion",
        choices=["prompt-completion", "text", "instruction", "messages"],
        help="record format of the toy data (default prompt-completion)",
    )
    toy.set_defaults(run=_toy_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = commands.add_parser("crd", help="print the FineTuneJob (or ModelServer) CustomResourceDefinition")
    crd.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    crd.add_argument(
        "--reference", action="store_true", help="print the resource's reference (Markdown) rendered from the CRD"
    )
    crd.add_argument(
        "--kind", choices=("FineTuneJob", "ModelServer"), default="FineTuneJob", help="which resource (FineTuneJob)"
    )
    crd.set_defaults(run=_crd)

    validate = commands.add_parser(
        "validate", help="check FineTuneJob and ModelServer manifests offline and list every problem with its field"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files, one or more documents each")
    validate.add_argument(
        "--allow-local-paths",
        action="store_true",
        help="accept absolute paths and file:// sources (for a workstation run; a cluster refuses them)",
    )
    validate.set_defaults(run=_validate)

    local = commands.add_parser(
        "local", help="a real Kubernetes control plane with process-backed nodes on this machine (no Docker)"
    )
    local.add_argument(
        "action",
        choices=["build", "up", "down", "status", "logs"],
        help="build: compile the binaries and Karpenter once (up does it too); up/down: start/stop the cluster; status; logs POD",
    )
    local.add_argument("pod", nargs="?", help="for logs: the pod")
    local.add_argument("-n", "--namespace", default="default", help="for logs: the pod's namespace")
    local.add_argument("-c", "--container", help="for logs: the container (the first one by default)")
    local.add_argument("--home", help="state folder (default $KUBETUNE_LOCAL_HOME or ~/.kubetune/local)")
    local.add_argument(
        "--kueue",
        action="store_true",
        help="for up/build: also run real Kueue (v0.17.0: admits Jobs labelled kueue.x-k8s.io/queue-name; "
        "built once, ~13 min); default $KUBETUNE_LOCAL_KUEUE=1 or off",
    )
    local.set_defaults(run=_local)

    demo = commands.add_parser(
        "demo",
        help="start the local runtime, run the operator, train examples/local.yaml, serve it and ask it (make demo)",
    )
    demo.add_argument("--home", help="state folder (default $KUBETUNE_LOCAL_HOME or ~/.kubetune/local)")
    demo.set_defaults(run=_demo)

    from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE, DEFAULT_VLLM_IMAGE

    operator = commands.add_parser(
        "operator", help="run the operator (kopf) against the current kubeconfig or in-cluster"
    )
    operator.add_argument("--namespace", action="append", help="watch only this namespace (repeatable); all by default")
    operator.add_argument(
        "--trainer-image",
        default=DEFAULT_TRAINER_IMAGE,
        help="image of the training, publish and built-in serving pods",
    )
    operator.add_argument("--vllm-image", default=DEFAULT_VLLM_IMAGE, help="image of serving pods with runtime vllm")
    operator.add_argument("--metrics-port", type=int, default=8080, help="port of the operator's /metrics")
    operator.add_argument("--peering", help="kopf peering name for several replicas (one active); standalone if unset")
    operator.add_argument(
        "--peering-priority",
        type=int,
        help="this replica's peering priority (the highest live one works); random by default",
    )
    operator.add_argument(
        "--health-port", type=int, default=8081, help="port of kopf's /healthz liveness endpoint; 0 for none"
    )
    operator.add_argument(
        "--progress-interval",
        type=float,
        default=5.0,
        help="seconds between reads of a training job's rank-0 metrics into status.progress",
    )
    operator.add_argument(
        "--node-class", help="Karpenter NodeClass as GROUP/KIND/NAME (default karpenter.azure.com/AKSNodeClass/default)"
    )
    operator.add_argument(
        "--consolidate-after",
        default="5m",
        help="consolidateAfter of the jobs' dynamic NodePools: how long an empty node stays (a suspended job, "
        "between attempts) before Karpenter removes it; a duration (30s, 5m, 1h30m) or Never (default 5m)",
    )
    operator.add_argument(
        "--allow-private-network",
        action="append",
        metavar="CIDR",
        help="a private network http(s) sources may reach, such as an in-cluster data server's (repeatable); "
        "non-public addresses are refused otherwise",
    )
    operator.add_argument("--preflight-cpu", default="1", help="CPU request of each pre-flight pod (default 1)")
    operator.add_argument(
        "--preflight-memory",
        default="4Gi",
        help="memory request and limit of each pre-flight pod, which tokenizes the whole dataset (default 4Gi)",
    )
    operator.add_argument(
        "--preflight-deadline", type=int, default=3600, metavar="SECONDS", help="a pre-flight fails after this long"
    )
    operator.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    operator.set_defaults(run=_operator)
    _add_trainer_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
