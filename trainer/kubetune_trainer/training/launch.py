"""``kubetune train``: validate and prepare once per node, then train in this process or under torchrun.

The operator runs, in each pod of the gang, ``kubetune train --config /etc/kubetune/config.json
--nnodes N --node-rank R --nproc-per-node P --master-addr ADDR --master-port PORT``; a person runs
the same command on a workstation. With more than one process in all, this command starts
torchrun (static rendezvous, gloo on CPUs and NCCL on GPUs) for the workers and stays as the pod's
main process, so that it can turn the workers' fate into the exit code the operator acts on:

- 0: trained; the adapter or model and ``summary.json`` are in the output folder.
- 2: permanent (bad config, bad data, an unsupported combination): retrying cannot help.
- 1: anything else (a lost peer, out of memory…): the operator restarts the gang from the last checkpoint.

torchrun itself exits 1 whatever its workers died of, so each worker writes why it failed to a
folder the launcher names (``KUBETUNE_FAILURE_DIR``), and the launcher reads it back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

from kubetune_api import TrainerConfig
from kubetune_trainer.config_file import load_config
from kubetune_trainer.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PermanentError,
    one_paragraph,
    write_termination_message,
)
from kubetune_trainer.process import WORK_DIR_ENV, setup_logging

log = logging.getLogger("kubetune.train")

#: Env var naming the folder where workers record why they failed (one JSON file per rank).
FAILURE_DIR_ENV: Final = "KUBETUNE_FAILURE_DIR"


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this process sits in the gang."""

    nnodes: int
    """Pods (nodes) in the gang."""
    node_rank: int
    """This node's index, 0 to nnodes - 1."""
    nproc_per_node: int
    """Training processes per node."""
    master_addr: str
    """Address of node 0, where the rendezvous is."""
    master_port: int
    """Port of the rendezvous on node 0."""

    @property
    def world_size(self) -> int:
        """Training processes in all."""
        return self.nnodes * self.nproc_per_node


def _topology(args: argparse.Namespace, config: TrainerConfig) -> Topology:
    distributed = config.spec.distributed
    nproc = args.nproc_per_node or distributed.processes_per_node or _gpu_count() or 1
    nnodes = args.nnodes or 1
    if args.nnodes is None and distributed.nodes > 1:
        log.info("the spec asks for %d nodes; this run uses one (pass --nnodes to join a gang)", distributed.nodes)
    problems = []
    if nnodes < 1:
        problems.append(("--nnodes", "must be at least 1"))
    if not 0 <= args.node_rank < max(nnodes, 1):
        problems.append(("--node-rank", f"must be between 0 and {nnodes - 1}"))
    if nproc < 1:
        problems.append(("--nproc-per-node", "must be at least 1"))
    if problems:
        from kubetune_api.problems import Problem  # noqa: PLC0415

        raise PermanentError([Problem(f, m) for f, m in problems], summary="the command line is inconsistent")
    return Topology(nnodes, args.node_rank, nproc, args.master_addr, args.master_port or distributed.master_port)


def _gpu_count() -> int:
    try:
        import torch  # noqa: PLC0415

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


def _cpu_threads(nproc_per_node: int) -> int:
    """CPU threads per worker: this pod's CPUs (affinity and cgroup quota) shared among its workers."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus // nproc_per_node)


def main(args: argparse.Namespace) -> int:
    """Run ``kubetune train``; return its exit code."""
    setup_logging()
    work: Path | None = None
    try:
        config = load_config(
            Path(args.config), output=Path(args.output) if args.output else None, metrics_port=args.metrics_port
        )
        topology = _topology(args, config)
        import torch  # noqa: PLC0415 - after the config is known to be good

        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(_cpu_threads(topology.nproc_per_node))
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from kubetune_trainer.training.prepare import prepare_run  # noqa: PLC0415

        Path(config.mounts.output).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="kubetune-prepared-", dir=os.environ.get(WORK_DIR_ENV)))
        prepared = prepare_run(config, work, cuda=cuda)
        if topology.world_size == 1:
            from kubetune_trainer.training.train import run  # noqa: PLC0415

            run(config, prepared)
            return EXIT_OK
        return _launch_workers(topology, prepared.folder)
    except PermanentError as exc:
        log.error("%s", exc)
        write_termination_message(exc.paragraph())
        return EXIT_PERMANENT
    except KeyboardInterrupt:
        log.error("interrupted")
        write_termination_message("training was interrupted")
        return EXIT_RETRYABLE
    except Exception as exc:  # anything unexpected is worth a retry, with its reason recorded
        log.error("training failed: %s", "".join(traceback.format_exception(exc)).rstrip())
        write_termination_message(f"training failed ({type(exc).__name__}): {exc}")
        return EXIT_RETRYABLE
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _launch_workers(topology: Topology, prepared: Path) -> int:
    failures = prepared / "failures"
    failures.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={topology.nnodes}",
        f"--node-rank={topology.node_rank}",
        f"--nproc-per-node={topology.nproc_per_node}",
        "--rdzv-backend=static",
        f"--master-addr={topology.master_addr}",
        f"--master-port={topology.master_port}",
        "--max-restarts=0",
        "-m",
        "kubetune_trainer.training.worker",
        "--prepared",
        str(prepared),
    ]
    log.info(
        "launch: node %d of %d, %d process%s here, %d in all; rendezvous at %s:%d",
        topology.node_rank,
        topology.nnodes,
        topology.nproc_per_node,
        "es" if topology.nproc_per_node > 1 else "",
        topology.world_size,
        topology.master_addr,
        topology.master_port,
    )
    env = {**os.environ, FAILURE_DIR_ENV: str(failures)}
    process = subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        return EXIT_OK
    return _report_failure(failures, code)


def _report_failure(failures: Path, code: int) -> int:
    records = []
    for file in sorted(failures.glob("rank-*.json")):
        try:
            records.append(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    permanent = [r for r in records if r.get("permanent")]
    chosen = permanent or records
    if chosen:
        first = min(chosen, key=lambda r: r.get("rank", 0))
        reason = f"rank {first.get('rank')}: {first.get('message')}"
    else:
        reason = f"a training process exited with code {code} without saying why (killed, or out of memory?)"
    log.error("launch: training failed: %s", reason)
    write_termination_message(one_paragraph(reason))
    return EXIT_PERMANENT if permanent else EXIT_RETRYABLE
