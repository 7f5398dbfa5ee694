"""GPU proof: one run on one borrowed GPU exercises every GPU path end to end and prints one table.

A GPU machine is lent for minutes at a time, with nothing to download from, so this script needs
only ``PYTHONPATH`` and the wheels of ``bench/gpu_wheels.sh``; ``--smoke`` runs it on a CPU with
tiny sizes (``tests/trainer/test_gpu_proof.py``) so that it never rots. Every stage runs in its own
process: one that fails is a FAILED row with its reason, and the others still run.

1. Setup. A Llama of random weights built from a config (no hub): TinyLlama's shape by default,
   hidden 2048, 22 layers, 32 heads with 4 key/value heads, MLP 5632, vocabulary 32,000 (≈1.1B
   parameters), with :func:`kubetune_trainer.toy.build_tokenizer`'s word-level tokenizer. The data
   is chat-shaped prompt-completion records (``<|user|> … <|assistant|>`` then the answer) of a few
   hundred tokens: prompts of ``--prompt-tokens`` and answers of ``--answer-tokens``, all within
   ``--seq``.
2. LoRA, bf16. ``kubetune train`` and :data:`bench.runs.PLAIN_SCRIPT` (transformers' Trainer +
   peft) on the same model, data, batch and steps: tokens/s of each (real tokens over the time of
   ``trainer.train()``), their ratio (target ≥ 1.0) and MFU (target ≥ 40% on the GPU)::

       MFU = F × tokens / seconds / peak,   F = 4·N + 6·N_lora FLOPs per token

   N is the weights of every matrix multiplication on the forward path (the decoder's linear
   layers and the output head; not the embedding lookup nor the norms), N_lora the adapter's
   weights (A and B of every adapted layer). Forward costs 2·N + 2·N_lora, the gradients of the
   activations as much again, and the weight gradients only 2·N_lora since the base is frozen.
   Attention's score and value products are not counted (12·L·d·T per token: ≈4% more at 512
   tokens for this shape), so the MFU is slightly understated; padding tokens are not counted.
   ``peak`` is 989 TFLOP/s, an H200's dense bf16 (``--peak-tflops``). Below either target, or
   with ``--profile on``, torch.profiler runs a few LoRA steps and prints the top kernels.
3. QLoRA (4-bit NF4, bitsandbytes) and DoRA: the loss falls; peak memory (CUDA's max allocated)
   against ``kubetune plan``'s prediction (:func:`kubetune_api.plan.plan_job`), error in %. The
   plan's fixed 1.5 GiB for the CUDA context and the allocator's slack is left out of the compared
   prediction: max allocated counts tensors only. This is true of every "plan" figure of the table.
   On a CPU QLoRA is skipped (bitsandbytes' 4-bit kernels need CUDA) and the measured peak is the
   process's peak RSS (Python and its libraries included), shown but not compared.
4. DeepSpeed ZeRO-3 with the optimizer offloaded to CPU memory, one process, through ``kubetune
   train`` (the operator's path): the loss falls; peak memory against the planner and against the
   same job without offload (``--zero-method lora``: stage 2's run, which one GPU runs without
   DeepSpeed; ``full``: an extra full fine-tuning run).
5. ``kubetune serve`` with stage 2's adapter, over its HTTP API (``/v1/completions``): generated
   tokens/s with 1 and with 8 concurrent clients (ratio: 8 clients against 1).

    python3 -m bench.gpu_proof [--json FILE] [--steps 40] [--profile auto|on|off]   # logs beside FILE, in <name>-logs/
    python3 -m bench.gpu_proof --smoke --json FILE     # tiny sizes on the CPU, for the test
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.runs import RunError, free_port, kubetune_command, run_plain, run_train
from kubetune_api import ALLOW_LOCAL_PATHS, FineTuneJobSpec
from kubetune_api.plan import CUDA_OVERHEAD_BYTES, GiB, ModelShape, Setup, plan_job, trainable_parameters
from kubetune_trainer.toy import NUMBERS, write_jsonl

#: An H200's dense bf16 peak, FLOP/s (NVIDIA's data sheet: 1,979 TFLOP/s with sparsity).
H200_BF16_PEAK: Final = 989e12
MFU_FORMULA: Final = (
    "MFU = (4·N + 6·N_lora) × tokens / seconds / peak; N = weights of the forward path's matmuls "
    "(decoder linears + output head), N_lora = adapter weights; attention scores and padding not counted"
)
TARGET_RATIO: Final = 1.0
TARGET_MFU: Final = 0.40
CUDA_SKIP: Final = "skipped: needs CUDA (bitsandbytes' 4-bit kernels)"

#: Defaults for the GPU and for ``--smoke`` (flags override either).
DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    "gpu": {
        "hidden": 2048,
        "layers": 22,
        "heads": 32,
        "kv_heads": 4,
        "intermediate": 5632,
        "vocab": 32000,
        "seq": 512,
        "batch": 16,
        "steps": 40,
        "prompt_tokens": (150, 350),
        "answer_tokens": (40, 150),
        "precision": "bf16",
        "serve_tokens": 128,
        "stage_timeout": 300,
        "lr": 1e-3,
    },
    "smoke": {
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
        "vocab": 0,
        "seq": 64,
        "batch": 4,
        "steps": 8,
        "prompt_tokens": (10, 30),
        "answer_tokens": (5, 20),
        "precision": "fp32",
        "serve_tokens": 8,
        "stage_timeout": 300,
        "lr": 3e-3,
    },
}


@dataclass
class Row:
    """One stage's line of the table."""

    stage: str
    what: str
    tokens_per_second: float | None = None
    ratio: float | None = None
    mfu: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    peak_gib: float | None = None
    """Measured peak: CUDA's max allocated on a GPU, the process's peak RSS on a CPU (see peak_kind)."""
    peak_kind: str | None = None
    predicted_gib: float | None = None
    """``kubetune plan``'s peak for the same job."""
    status: str = "ok"
    """ok, skipped: REASON, or FAILED."""
    reason: str = ""

    @property
    def planner_error(self) -> float | None:
        """(predicted - measured) / measured, when the measurement is CUDA's (RSS is not comparable)."""
        if self.peak_kind != "cuda" or self.peak_gib is None or self.predicted_gib is None:
            return None
        return (self.predicted_gib - self.peak_gib) / self.peak_gib

    def cells(self) -> list[str]:
        def number(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        loss = "-" if self.loss_first is None else f"{self.loss_first:.3f}→{number(self.loss_last, '.3f')}"
        peak = "-"
        if self.peak_gib is not None or self.predicted_gib is not None:
            measured = number(self.peak_gib, ".2f") + (" RSS" if self.peak_kind == "rss" else "")
            error = self.planner_error
            peak = f"{measured} / {number(self.predicted_gib, '.2f')}" + ("" if error is None else f" ({error:+.0%})")
        lines = [line for line in self.reason.splitlines() if line.strip()]
        status = f"{self.status}: {lines[-1][:160]}" if lines else self.status
        return [
            self.stage,
            self.what,
            number(self.tokens_per_second, ",.0f"),
            number(self.ratio, ".2f"),
            "-" if self.mfu is None else f"{self.mfu:.1%}",
            loss,
            peak,
            status,
        ]


HEADER: Final = ["stage", "what", "tokens/s", "ratio", "MFU", "loss first→last", "peak GiB measured / plan", "status"]


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    lines = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


# ------------------------------------------------------------------------------------------- setup


def chat_records(count: int, prompt_tokens: tuple[int, int], answer_tokens: tuple[int, int]) -> list[dict[str, str]]:
    """Chat-shaped prompt-completion records of the toy vocabulary, lengths drawn from the ranges (tokens)."""
    rng = random.Random(0)

    def words(bounds: tuple[int, int]) -> str:
        return " ".join(rng.choice(NUMBERS) for _ in range(rng.randint(*bounds)))

    return [
        {"prompt": f"<|user|> {words(prompt_tokens)} <|assistant|>", "completion": f" {words(answer_tokens)}"}
        for _ in range(count)
    ]


def build_model_process(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build and save the model in a child process (``--internal build``); return what it reports."""
    command = [
        sys.executable,
        "-m",
        "bench.gpu_proof",
        "--internal",
        "build",
        "--folder",
        str(folder),
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("hidden", "layers", "heads", "kv_heads")),
        *(f"--{k}={getattr(args, k)}" for k in ("intermediate", "vocab", "precision")),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(args), check=False)
    if result.returncode != 0:
        raise SystemExit(f"building the model failed:\n{result.stderr[-3000:]}")
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def internal_build(args: argparse.Namespace) -> None:
    """Write the model and tokenizer to ``folder/model``; print the device and parameter count as JSON."""
    import torch  # noqa: PLC0415

    from kubetune_trainer.toy import ToySize, build_model, build_tokenizer  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer()
    padding = max(0, args.vocab - len(tokenizer)) if args.vocab else 0
    size = ToySize(
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab_padding=padding,
    )
    with torch.device("cuda" if cuda else "cpu"):  # random initialisation of 1B weights is quick on a GPU
        model: Any = build_model(tokenizer, size)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    model_dir = Path(args.folder) / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(
        json.dumps(
            {
                "cuda": cuda,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "parameters": sum(p.numel() for p in model.parameters()),
                "model": str(model_dir),
            }
        )
    )


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """Offline (nothing can be downloaded there); on a CPU one thread per process, as the trainer tests do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------------ the stages


@dataclass
class Context:
    """What every stage shares."""

    args: argparse.Namespace
    folder: Path
    model: Path
    data: Path
    cuda: bool
    model_config: dict[str, Any]

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.args)

    def spec(self, method: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
        """A FineTuneJob spec of this run's model, data and training settings with ``method``."""
        args = self.args
        spec: dict[str, Any] = {
            "model": {"source": str(self.model)},
            "dataset": {"source": str(self.data), "maxSeqLength": args.seq, "format": "prompt-completion"},
            "method": method,
            "training": {
                "maxSteps": args.steps,
                "learningRate": args.lr,
                "lrScheduler": "constant",
                "warmupRatio": 0,
                "batchSizePerDevice": args.batch,
                "precision": args.precision,
                "gradientCheckpointing": False,
                "checkpointEverySteps": 100000,
                "loggingEverySteps": max(1, args.steps // 10),
            },
        }
        return {**spec, **sections}

    def predicted_gib(self, spec: dict[str, Any]) -> float:
        """``kubetune plan``'s peak for ``spec`` on one device of this machine, less the CUDA context (see above)."""
        parsed = FineTuneJobSpec.model_validate(spec, context={ALLOW_LOCAL_PATHS: True})
        result = plan_job(
            parsed, self.model_config, device_gib=None, gpus_per_node=1, accelerator="cuda" if self.cuda else "cpu"
        )
        return (result.total - (CUDA_OVERHEAD_BYTES if self.cuda else 0)) / GiB

    @property
    def peak_kind(self) -> str:
        return "cuda" if self.cuda else "rss"

    def train(self, stage: str, what: str, spec: dict[str, Any]) -> tuple[Row, dict[str, Any]]:
        """Run ``kubetune train`` on ``spec``; the row fails when the loss did not fall."""
        summary = run_train(self.folder, stage.replace(" ", "-"), spec, env=self.env, timeout=self.args.stage_timeout)
        losses = [entry["loss"] for entry in summary["losses"]]
        row = Row(
            stage,
            what,
            tokens_per_second=summary["tokens_per_second"],
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            peak_gib=summary["peak_memory_bytes"] / GiB,
            peak_kind=self.peak_kind,
            predicted_gib=self.predicted_gib(spec),
        )
        check_training(row, summary["steps"], self.args.steps)
        return row, summary


def check_training(row: Row, steps: int, wanted: int) -> None:
    """Mark ``row`` FAILED unless every step ran and the loss fell."""
    if steps != wanted:
        row.status, row.reason = "FAILED", f"{steps} of {wanted} steps ran"
    elif row.loss_first is None or row.loss_last is None or not row.loss_last < row.loss_first:
        row.status, row.reason = "FAILED", "the loss did not fall"


def flops_per_token(context: Context, lora: dict[str, Any]) -> float:
    """4·N + 6·N_lora (see the module's docstring), from the model's config and the LoRA settings."""
    shape = ModelShape.from_config(context.model_config)
    forward_weights = shape.linear_parameters + shape.vocab * shape.hidden  # the output head is a matmul too
    spec = FineTuneJobSpec.model_validate(
        context.spec({"type": "lora", "lora": lora}), context={ALLOW_LOCAL_PATHS: True}
    )
    adapter = trainable_parameters(shape, Setup.from_spec(spec, world_size=1))
    return 4.0 * forward_weights + 6.0 * adapter


def mfu(context: Context, tokens_per_second: float, lora: dict[str, Any]) -> float:
    peak: float = context.args.peak_tflops * 1e12
    return flops_per_token(context, lora) * tokens_per_second / peak


def lora_stages(context: Context) -> tuple[list[Row], dict[str, Any] | None]:
    """Stage 2: ``kubetune train`` and the plain script, same LoRA job; returns the rows and our summary."""
    args = context.args
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}
    spec = context.spec({"type": "lora", "lora": lora})
    rows: list[Row] = []
    ours: dict[str, Any] | None = None
    try:
        row, ours = context.train("lora kubetune", f"kubetune train, LoRA r16 {args.precision}", spec)
        row.mfu = mfu(context, row.tokens_per_second or 0.0, lora)
        rows.append(row)
    except (RunError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
        rows.append(failed("lora kubetune", "kubetune train, LoRA", exc))
    settings = {
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "precision": args.precision,
        "lr": args.lr,
        "r": lora["r"],
        "alpha": lora["alpha"],
        "logging_steps": max(1, args.steps // 10),
    }
    try:
        found = run_plain(
            context.folder, "plain", context.model, context.data, settings, env=context.env, timeout=args.stage_timeout
        )
        losses = [entry["loss"] for entry in found["losses"]]
        peak = found["peak_memory_bytes"]
        plain = Row(
            "lora plain",
            f"transformers Trainer + peft, LoRA r16 {args.precision}",
            tokens_per_second=found["tokens_per_second"],
            mfu=mfu(context, found["tokens_per_second"], lora),
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            peak_gib=None if peak is None else peak / GiB,
            peak_kind="cuda" if peak is not None else None,
            predicted_gib=context.predicted_gib(spec),
        )
        check_training(plain, found["steps"], args.steps)
        rows.append(plain)
        if rows[0].status == "ok" and rows[0].tokens_per_second:
            rows[0].ratio = rows[0].tokens_per_second / found["tokens_per_second"]
    except (RunError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
        rows.append(failed("lora plain", "transformers Trainer + peft, LoRA", exc))
    return rows, ours


def qlora_stage(context: Context) -> Row:
    what = "kubetune train, QLoRA NF4 r16"
    if not context.cuda:
        return Row("qlora", what, status=CUDA_SKIP)
    spec = context.spec({"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}})
    return context.train("qlora", what, spec)[0]


def dora_stage(context: Context) -> Row:
    spec = context.spec({"type": "dora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}})
    return context.train("dora", f"kubetune train, DoRA r16 {context.args.precision}", spec)[0]


def zero_stage(context: Context, baseline: Row | None) -> list[Row]:
    """ZeRO-3 with the optimizer in CPU memory; against ``baseline`` (LoRA) or an extra full run without offload."""
    method: dict[str, Any] = {"type": context.args.zero_method}
    if context.args.zero_method == "lora":
        method["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0}
    rows: list[Row] = []
    offload = context.spec(method, distributed={"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu"}})
    what = f"kubetune train, DeepSpeed ZeRO-3 + offloadOptimizer cpu, {context.args.zero_method}"
    try:
        built = build_cpu_adam(context)
        row = context.train("zero3 offload", f"{what} (CPU Adam built in {built:.0f}s before)", offload)[0]
    except (RunError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
        row = failed("zero3 offload", what, exc)
    rows.append(row)
    if context.args.zero_method == "full":
        what = "kubetune train, full, no offload (no DeepSpeed on one device)"
        try:
            baseline = context.train("full no offload", what, context.spec(method))[0]
        except (RunError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
            baseline = failed("full no offload", what, exc)
        rows.append(baseline)
    if baseline is not None and baseline.peak_gib and row.peak_gib:
        row.ratio = row.peak_gib / baseline.peak_gib
        row.what += f"; ratio = peak memory / {baseline.stage}'s"
    return rows


def build_cpu_adam(context: Context) -> float:
    """Build (or load from torch's extension cache) DeepSpeed's CPU Adam; return the seconds it took.

    DeepSpeed compiles it with the C++ compiler on first use, inside ``trainer.train()``: built
    before, its minutes are not counted as training time, and a failed build says so plainly.
    """
    env = context.env if context.cuda else {**context.env, "DS_ACCELERATOR": "cpu"}  # as kubetune train sets it
    code = (
        "from deepspeed.accelerator import get_accelerator; "
        "get_accelerator().create_op_builder('CPUAdamBuilder').load()"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=context.args.stage_timeout,
        check=False,
    )
    (context.folder / "cpu-adam.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RunError(f"DeepSpeed's CPU Adam did not build (needs g++ and Python's headers):\n{result.stderr[-3000:]}")
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------- serve


def complete(port: int, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST ``body`` to ``/v1/completions``; the answer as JSON."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {raw[:300]!r}")
    answer: dict[str, Any] = json.loads(raw)
    return answer


def ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def measure_clients(port: int, clients: int, body: dict[str, Any], timeout: float) -> tuple[float, int]:
    """``clients`` threads send one request each at once; generated tokens/s over the wall time, and the tokens."""
    tokens: list[int] = []
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            tokens.append(complete(port, {**body, "seed": seed}, timeout)["usage"]["completion_tokens"])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} requests failed: {errors[0]}")
    return sum(tokens) / seconds, sum(tokens)


def serve_stages(context: Context, adapter: Path | None) -> list[Row]:
    """Stage 5: ``kubetune serve`` with the LoRA adapter; 1 and 8 concurrent clients."""
    names = ("serve c=1", "serve c=8")
    if adapter is None:
        return [Row(n, "kubetune serve", status="FAILED", reason="no adapter: 'lora kubetune' failed") for n in names]
    port = free_port()
    log = context.folder / "serve.log"
    command = kubetune_command(
        "serve", "--model", str(context.model), "--adapter", f"proof={adapter}", "--host", "127.0.0.1"
    )
    command += ["--port", str(port)]
    body = {
        "model": "proof",
        "prompt": chat_records(1, context.args.prompt_tokens, (1, 1))[0]["prompt"],
        "max_tokens": context.args.serve_tokens,
        "temperature": 1.0,
    }
    rows: list[Row] = []
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=context.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + context.args.stage_timeout
        while not ready(port):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                reason = (
                    f"kubetune serve {'exited ' + str(server.returncode) if server.poll() is not None else 'not ready'}"
                )
                return [Row(n, "kubetune serve", status="FAILED", reason=f"{reason}:\n{tail}") for n in names]
            time.sleep(1)
        complete(port, body, context.args.stage_timeout)  # warm-up: the first request builds kernels and caches
        single = 0.0
        for clients, name in zip((1, 8), names, strict=True):
            what = f"kubetune serve, {clients} client{'s' if clients > 1 else ''}, max_tokens {body['max_tokens']}"
            try:
                rate, tokens = measure_clients(port, clients, body, context.args.stage_timeout)
            except RuntimeError as exc:
                rows.append(failed(name, what, exc))
                continue
            row = Row(name, f"{what}, {tokens} tokens generated", tokens_per_second=rate)
            if clients == 1:
                single = rate
            elif single:
                row.ratio = rate / single
            rows.append(row)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return rows


# -------------------------------------------------------------------------------------- profile


def profile_stage(context: Context) -> Row:
    """torch.profiler over a few LoRA steps in a child process; prints the top kernels, the row names three."""
    args = context.args
    command = [
        sys.executable,
        "-m",
        "bench.gpu_proof",
        "--internal",
        "profile",
        "--folder",
        str(context.folder),
        f"--seq={args.seq}",
        f"--batch={args.batch}",
        f"--precision={args.precision}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=context.env, timeout=args.stage_timeout, check=False
    )
    (context.folder / "profile.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RunError(f"the profile exited {result.returncode}:\n{result.stderr[-3000:]}")
    print(result.stdout)
    top = json.loads(result.stdout.strip().splitlines()[-1])
    names = ", ".join(f"{k['name'][:40]} {k['share']:.0%}" for k in top[:3])
    return Row("profile", f"torch.profiler, top kernels: {names} (full table above)")


def internal_profile(args: argparse.Namespace) -> None:
    """A few LoRA steps (bf16 base, fp32 adapter, AdamW) under torch.profiler; the top kernels by self time."""
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(Path(args.folder) / "model", dtype=dtype)
    model = model.to(device)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: -getattr(e, key))
    print(json.dumps([{"name": e.key, "share": getattr(e, key) / total} for e in events[:10]]))


# ----------------------------------------------------------------------------------------- main


def failed(stage: str, what: str, exc: BaseException) -> Row:
    """A FAILED row whose reason is the exception's message."""
    text = str(exc).strip() or type(exc).__name__
    return Row(stage, what, status="FAILED", reason=text)


def run_stage(rows: list[Row], stage: str, what: str, body: Callable[[], Row | list[Row]]) -> None:
    """Append ``body``'s rows, or a FAILED row when it raises."""
    try:
        found = body()
    except (RunError, subprocess.TimeoutExpired, OSError, ValueError, KeyError, RuntimeError) as exc:
        rows.append(failed(stage, what, exc))
        return
    rows.extend(found if isinstance(found, list) else [found])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test's mode)")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    parser.add_argument("--folder", help="work folder (default: a new temporary folder)")
    parser.add_argument("--profile", choices=["auto", "on", "off"], default="auto", help="auto: below a target on CUDA")
    parser.add_argument("--zero-method", choices=["lora", "full"], default="lora", help="method of the ZeRO-3 stage")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK / 1e12, help="the MFU's peak (H200 bf16)")
    parser.add_argument(
        "--lr", type=float, help="learning rate of every training stage (default 1e-3, 3e-3 with --smoke)"
    )
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "seq", "batch", "steps"):
        parser.add_argument(f"--{name}", type=int, help="default: the GPU's or --smoke's")
    for name in ("prompt-tokens", "answer-tokens"):
        parser.add_argument(f"--{name}", type=int, nargs=2, metavar=("MIN", "MAX"), help="length range of the data")
    parser.add_argument("--serve-tokens", type=int, help="max_tokens of each serving request")
    parser.add_argument("--stage-timeout", type=float, help="seconds one stage may take")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 (fp32 with --smoke)")
    parser.add_argument("--internal", choices=["build", "profile"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["smoke" if args.smoke else "gpu"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.internal == "build":
        internal_build(args)
        return 0
    if args.internal == "profile":
        internal_profile(args)
        return 0
    started = time.time()
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="kubetune-gpu-proof-"))
    folder.mkdir(parents=True, exist_ok=True)
    built = build_model_process(folder, args)
    model = Path(built["model"])
    model_config: dict[str, Any] = json.loads((model / "config.json").read_text())
    count = max(args.steps * args.batch, 64)
    data = write_jsonl(chat_records(count, args.prompt_tokens, args.answer_tokens), folder / "data.jsonl")
    context = Context(args, folder, model, data, built["cuda"], model_config)
    print(
        f"gpu proof: {built['device']}, model {built['parameters'] / 1e9:.2f}B parameters, {args.steps} steps × "
        f"{args.batch} rows of ≤ {args.seq} tokens, {args.precision}; work folder {folder}",
        flush=True,
    )

    rows: list[Row] = []
    lora_rows, ours = lora_stages(context)
    rows += lora_rows
    run_stage(rows, "qlora", "kubetune train, QLoRA", lambda: qlora_stage(context))
    run_stage(rows, "dora", "kubetune train, DoRA", lambda: dora_stage(context))
    baseline = lora_rows[0] if lora_rows[0].status == "ok" else None
    run_stage(rows, "zero3 offload", "kubetune train, ZeRO-3 offload", lambda: zero_stage(context, baseline))
    adapter = Path(ours["output"]) if ours else None
    run_stage(rows, "serve", "kubetune serve", lambda: serve_stages(context, adapter))

    ours_row = lora_rows[0]
    below = ours_row.status == "ok" and (
        (ours_row.ratio is not None and ours_row.ratio < TARGET_RATIO)
        or (ours_row.mfu is not None and ours_row.mfu < TARGET_MFU)
    )
    if args.profile == "on" or (args.profile == "auto" and context.cuda and below):
        run_stage(rows, "profile", "torch.profiler", lambda: profile_stage(context))
    elif below and context.cuda:
        print("below a target (ratio ≥ 1.0, MFU ≥ 40%): run again with --profile on to see where the time goes")

    print()
    print(table(rows))
    print(f"{MFU_FORMULA}; peak {args.peak_tflops:g} TFLOP/s")
    if context.cuda:
        print("peak memory: CUDA max allocated / kubetune plan's peak less its 1.5 GiB for the CUDA context")
    else:
        print("peak memory: the process's peak RSS (CPU; not compared) / kubetune plan's peak")
    seconds = time.time() - started
    print(f"done in {seconds:.0f}s")
    if args.json:
        report = {
            "device": built["device"],
            "cuda": context.cuda,
            "parameters": built["parameters"],
            "seconds": seconds,
            "mfu_formula": MFU_FORMULA,
            "peak_tflops": args.peak_tflops,
            "settings": {k: v for k, v in vars(args).items() if k != "internal"},
            "rows": [{**asdict(r), "planner_error": r.planner_error} for r in rows],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        # Each stage's output beside the JSON: a borrowed machine's folder is gone once it is given back.
        logs = Path(args.json).with_name(Path(args.json).stem + "-logs")
        logs.mkdir(exist_ok=True)
        for log in folder.glob("*.log"):
            shutil.copyfile(log, logs / log.name)
    return 1 if any(r.status == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
