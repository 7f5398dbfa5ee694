"""The training recipe, run by every training process: setup → train → save → cleanup.

It reads a prepared run (see :mod:`.prepare`: sources fetched, data tokenized)
and hands the work to transformers' Trainer, which brings DeepSpeed ZeRO, DDP, mixed precision,
gradient accumulation, checkpoints with optimizer and RNG state, and resumption with the same
data order. What this file adds is what a cluster job needs around it: the DeepSpeed config from
the spec, resuming from the newest *complete* checkpoint on the shared volume, a metrics endpoint
on rank 0, throughput in real (not padding) tokens, the experiment trackers of training.reportTo
(TensorBoard, MLflow; see :mod:`.tracking`), and the outputs in the places the operator publishes
from: ``adapter/`` or ``model/``, ``merged/``, and ``summary.json``.

Tokens per optimizer step = batchSizePerDevice × gradientAccumulationSteps × world size × the
mean tokens per row (at most maxSeqLength); the log's first line shows these numbers.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from datasets import load_from_disk
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from kubetune_api import METRICS_ADDRESS_ENV, TrainerConfig
from kubetune_trainer.training.data.collate import Collator
from kubetune_trainer.training.deepspeed_config import deepspeed_config
from kubetune_trainer.training.metrics import Throughput, TrainingMetrics, is_tty, peak_memory_bytes, progress_line
from kubetune_trainer.training.model import load_model, load_tokenizer, parameter_counts, resolve_precision
from kubetune_trainer.training.prepare import PreparedRun
from kubetune_trainer.training.tracking import run_name, trackers

log = logging.getLogger("kubetune.train")

CHECKPOINTS: Final = "checkpoints"
#: Written into a checkpoint folder once every process has finished writing its part.
COMPLETE_MARKER: Final = "kubetune-complete.json"
_CHECKPOINT_RE: Final = re.compile(r"^checkpoint-(\d+)$")
_OPTIMIZERS: Final = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit"}


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` that every process finished writing, if any.

    A pod killed while saving leaves a partial ``checkpoint-N``; resuming from it would fail on
    every restart, so such folders are skipped (an older complete one is used).
    """
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in found:
        if (path / COMPLETE_MARKER).exists():
            return path
    return None


def _world() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def run(config: TrainerConfig, prepared: PreparedRun) -> dict[str, Any]:  # noqa: PLR0912, PLR0915 - a recipe reads best in one piece
    """Train as one process of the gang (or alone) and return the summary (also written by rank 0)."""
    # ------------------------------------------------------------------------------------ setup
    started = time.time()
    rank, local_rank, world_size = _world()
    spec = config.spec
    output = Path(config.mounts.output)

    cuda = torch.cuda.is_available()
    precision = resolve_precision(spec.training.precision, cuda=cuda)
    if precision.note and rank == 0:
        log.warning("precision: %s", precision.note)
    deepspeed = spec.distributed.deepspeed.used_with(world_size)
    backend = "nccl" if cuda else "gloo"
    if deepspeed:
        _init_deepspeed(backend, cuda=cuda)
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    training = spec.training
    has_eval = prepared.eval_dir is not None
    # TrainingArguments come before the model: under ZeRO-3 they make from_pretrained load the
    # weights straight into their shards.
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=training.batch_size_per_device,
        per_device_eval_batch_size=training.batch_size_per_device,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=training.weight_decay,
        optim=_OPTIMIZERS[training.optimizer],
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        max_grad_norm=training.max_grad_norm,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        activation_checkpointing=training.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=training.seed,
        data_seed=training.seed,
        save_strategy="steps",
        save_steps=training.checkpoint_every_steps,
        save_total_limit=training.keep_checkpoints,
        eval_strategy=("steps" if training.eval_every_steps else "epoch") if has_eval else "no",
        eval_steps=training.eval_every_steps,
        logging_strategy="steps",
        logging_steps=training.logging_every_steps,
        logging_first_step=True,
        # The trackers of training.reportTo: the Trainer adds transformers' stock callbacks, which
        # Trackers.install replaces by those of .tracking (rank 0 only, the spec's directory and server).
        report_to=list(training.report_to),
        run_name=run_name(config),
        disable_tqdm=not (is_tty() and rank == 0),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_backend=backend if world_size > 1 else None,
        ddp_find_unused_parameters=False,
        deepspeed=deepspeed_config(spec, accelerator="cuda" if cuda else "cpu") if deepspeed else None,
        log_level="warning",
        log_level_replica="error",
    )

    tokenizer = load_tokenizer(prepared.model_dir, spec)
    set_seed(training.seed)  # the adapter's initial weights, the same on every rank and every attempt
    model = load_model(prepared.model_dir, spec, precision, device=device, sharded=deepspeed)
    trainable, total = parameter_counts(model)
    train_rows = load_from_disk(str(prepared.train_dir))
    eval_rows = load_from_disk(str(prepared.eval_dir)) if prepared.eval_dir else None
    rows_per_step = training.batch_size_per_device * training.gradient_accumulation_steps * world_size
    if rank == 0:
        stats = prepared.stats
        log.info(
            "train: %s %s on %d process%s (%s, %s%s); %s of %s parameters trainable (%.2f%%)",
            spec.method.type,
            prepared.model_dir.name,
            world_size,
            "es" if world_size > 1 else "",
            "cuda" if cuda else "cpu",
            precision.name,
            f", DeepSpeed ZeRO-{spec.distributed.deepspeed.zero_stage}" if deepspeed else "",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
        )
        log.info(
            "train: rows per step = %d per device × %d accumulation × %d processes = %d; ≈ %s tokens per step "
            "(mean %.0f tokens per row, maxSeqLength %d)",
            training.batch_size_per_device,
            training.gradient_accumulation_steps,
            world_size,
            rows_per_step,
            f"{rows_per_step * stats.train_tokens / max(stats.train_rows, 1):,.0f}",
            stats.train_tokens / max(stats.train_rows, 1),
            spec.dataset.max_seq_length,
        )

    metrics = TrainingMetrics() if rank == 0 else None
    if metrics is not None:
        # The pod's own address when the operator gives it (KUBETUNE_METRICS_ADDRESS from status.podIP):
        # pods that share a network namespace (the local runtime's) then never answer for one another.
        metrics.serve(config.metrics_port, address=os.environ.get(METRICS_ADDRESS_ENV) or "0.0.0.0")  # noqa: S104
    throughput = Throughput()
    progress = PublishProgress(metrics, throughput, rank=rank)

    trainer = KubetuneTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else None),
        processing_class=tokenizer,
        callbacks=[progress, CheckpointMarker(rank=rank)],
        throughput=throughput,
    )
    reporting = trackers(config, rank=rank, params=tracking_params(config, world_size, precision.name))
    reporting.install(trainer)
    trainer.remove_callback(PrinterCallback)
    if args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)

    # ------------------------------------------------------------------------------------ train
    resume = latest_checkpoint(output / CHECKPOINTS)
    if resume is not None and rank == 0:
        log.info("train: resuming from %s", resume)
    train_started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_seconds = time.time() - train_started
        eval_loss: float | None = None
        if eval_rows is not None:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            if metrics is not None:
                metrics.set("kubetune_train_eval_loss", eval_loss)
    except BaseException:
        reporting.finish({}, trainer.state.global_step, failed=True)
        raise

    # ------------------------------------------------------------------------------------- save
    target = output / spec.method.result_folder
    trainer.save_model(str(target))
    if rank == 0:
        log.info("train: saved the %s to %s", spec.method.result_folder, target)
    state = trainer.state
    summary: dict[str, Any] = {
        "job": config.job_name,
        "namespace": config.namespace,
        "attempt": config.attempt,
        "method": spec.method.type,
        "precision": precision.name,
        "precision_note": precision.note,
        "world_size": world_size,
        "deepspeed_zero_stage": spec.distributed.deepspeed.zero_stage if deepspeed else None,
        "resumed_from_step": _step_of(resume),
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": state.epoch,
        "tokens": int(state.num_input_tokens_seen),
        "tokens_per_second": progress.session_tokens / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds,
        "duration_seconds": time.time() - started,
        "train_loss": float(result.training_loss),
        "losses": [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e],
        "eval_loss": eval_loss,
        "eval_losses": [{"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e],
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable_parameters": trainable,
        "parameters": total,
        "data": prepared.stats.as_dict(),
        "output": str(target),
    }
    reporting.finish(
        {
            "tokens": float(summary["tokens"]),
            "tokens_per_second": summary["tokens_per_second"],
            "train_seconds": train_seconds,
            "peak_memory_bytes": float(summary["peak_memory_bytes"] or 0),
        },
        state.global_step,
    )
    if reporting.callbacks:
        summary["tracking"] = reporting.describe()

    # ---------------------------------------------------------------------------------- cleanup
    del trainer, model
    gc.collect()
    _barrier()
    if rank == 0:
        if spec.output.merge and spec.method.type != "full":
            summary["merged"] = str(
                merge_adapter(prepared.model_dir, target, output / "merged", spec.model.trust_remote_code)
            )
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        log.info(
            "train: done: %d steps, loss %s → %s, %s tokens at %.0f tokens/s in %.1fs; summary in %s",
            summary["steps"],
            f"{summary['losses'][0]['loss']:.4f}" if summary["losses"] else "-",
            f"{summary['losses'][-1]['loss']:.4f}" if summary["losses"] else "-",
            f"{summary['tokens']:,}",
            summary["tokens_per_second"],
            summary["duration_seconds"],
            output / "summary.json",
        )
    if metrics is not None:
        metrics.close()
    _destroy_process_group()
    return summary


def tracking_params(config: TrainerConfig, world_size: int, precision: str) -> dict[str, str]:
    """The ``kubetune.*`` params of an MLflow run: what the spec says beyond transformers' TrainingArguments.

    Source URIs are logged without their query string (a presigned URL's signature stays out).
    """
    spec = config.spec
    params = {
        "kubetune.method": spec.method.type,
        "kubetune.model": spec.model.source.split("?", 1)[0],
        "kubetune.dataset": spec.dataset.source.split("?", 1)[0],
        "kubetune.dataset_format": spec.dataset.format,
        "kubetune.max_seq_length": str(spec.dataset.max_seq_length),
        "kubetune.packing": str(spec.dataset.packing),
        "kubetune.precision": precision,
        "kubetune.world_size": str(world_size),
        "kubetune.nodes": str(spec.distributed.nodes),
        "kubetune.deepspeed_zero_stage": (
            str(spec.distributed.deepspeed.zero_stage) if spec.distributed.deepspeed.used_with(world_size) else "off"
        ),
    }
    lora = spec.method.effective_lora
    if lora is not None:
        params |= {
            "kubetune.lora_r": str(lora.r),
            "kubetune.lora_alpha": f"{lora.alpha:g}",
            "kubetune.lora_dropout": f"{lora.dropout:g}",
        }
    quantization = spec.method.effective_quantization
    if quantization is not None:
        params["kubetune.quantization_bits"] = str(quantization.bits)
    return params


def merge_adapter(model_dir: Path, adapter: Path, target: Path, trust_remote_code: bool) -> Path:
    """Fold the adapter into a full-precision copy of the base model and save it (with the tokenizer) to ``target``."""
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=trust_remote_code, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("train: merged the adapter into %s", target)
    return target


def _step_of(checkpoint: Path | None) -> int | None:
    match = _CHECKPOINT_RE.match(checkpoint.name) if checkpoint else None
    return int(match.group(1)) if match else None


def _init_deepspeed(backend: str, *, cuda: bool) -> None:
    import deepspeed  # noqa: PLC0415

    if not cuda:
        # DeepSpeed compiles a shared-memory all-reduce with g++ on every CPU start (30 s, and it fails
        # where there is no compiler or the root filesystem is read-only). The op only serves inference
        # all-reduce, so it is turned off; `__compatible_ops__` is the cache build_shm_op() consults.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "LOCAL_RANK" not in os.environ:
        # One process without torchrun (one device with offload): DeepSpeed needs a process group and,
        # missing torchrun's variables, looks for MPI instead (mpi4py); a world of one on loopback will do.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # accelerate would set up torch.distributed but not deepspeed.comm, and ZeRO-3's zero.Init would
    # then see a world of one; initialising DeepSpeed's comm first makes both share one process group.
    deepspeed.init_distributed(dist_backend=backend)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_sum(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


class PublishProgress(TrainerCallback):
    """Publishes progress to the gauges and the log; counts tokens across processes."""

    def __init__(self, metrics: TrainingMetrics | None, throughput: Throughput, *, rank: int) -> None:
        self.metrics = metrics
        self.throughput = throughput
        self.rank = rank
        self.session_tokens = 0.0
        self.session_start_step = 0
        self.session_start = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session_start_step = state.global_step
        self.session_start = time.monotonic()
        self.throughput.reset()
        self._set("kubetune_train_total_steps", state.max_steps)
        self._set("kubetune_train_step", state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._set("kubetune_train_step", state.global_step)
        self._set("kubetune_train_epoch", state.epoch or 0.0)
        self._set("kubetune_train_eta_seconds", self._eta(state))

    def _eta(self, state: Any) -> float:
        done = state.global_step - self.session_start_step
        if done <= 0:
            return math.inf
        return float((state.max_steps - state.global_step) * (time.monotonic() - self.session_start) / done)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return
        tokens_per_s = 0.0
        if "loss" in logs:
            # Every process calls on_log at the same step (the Trainer gathers the loss first), so this
            # collective is matched on all ranks.
            elapsed = max(time.monotonic() - self.throughput.since, 1e-9)
            tokens, examples = _all_reduce_sum([float(self.throughput.tokens), float(self.throughput.examples)])
            self.throughput.reset()
            self.session_tokens += tokens
            state.num_input_tokens_seen += int(tokens)
            tokens_per_s = tokens / elapsed
            self._set("kubetune_train_tokens_per_second", tokens_per_s)
            self._set("kubetune_train_samples_per_second", examples / elapsed)
            self._set("kubetune_train_loss", logs["loss"])
            self._set("kubetune_train_learning_rate", logs.get("learning_rate", math.nan))
            self._set("kubetune_train_grad_norm", logs.get("grad_norm", math.nan))
            self._set("kubetune_train_peak_memory_bytes", peak_memory_bytes())
        if "eval_loss" in logs:
            self._set("kubetune_train_eval_loss", logs["eval_loss"])
        if self.rank == 0:
            log.info(progress_line(state.global_step, state.max_steps, logs, tokens_per_s, self._eta(state)))

    def _set(self, name: str, value: float) -> None:
        if self.metrics is not None:
            self.metrics.set(name, float(value))


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part."""

    def __init__(self, *, rank: int) -> None:
        self.rank = rank

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()
        if self.rank == 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step, "time": time.time()}))


class KubetuneTrainer(Trainer):
    """transformers' Trainer, counting the real tokens and examples of each training batch.

    The collator adds ``num_tokens`` and ``num_examples`` to each batch; they are taken out here,
    before the model sees the batch.
    """

    def __init__(self, *args: Any, throughput: Throughput, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.throughput = throughput

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        tokens, examples = inputs.pop("num_tokens", None), inputs.pop("num_examples", None)
        if model.training and tokens is not None:
            self.throughput.tokens += int(tokens)
            self.throughput.examples += int(examples) if examples is not None else 0
        return super().compute_loss(model, inputs, *args, **kwargs)
