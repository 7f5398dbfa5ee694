"""Training runs as separate processes, for the benchmarks: ``kubetune train`` and a plain Trainer + peft script.

Both sides run the same model, data and settings in their own process, so one side's memory,
threads or CUDA state never colours the other's numbers, and a crash is a failed run, not a
failed benchmark. Nothing here needs more than ``PYTHONPATH`` (no console script, no editable
install, no test dependencies): the GPU proof runs it on a machine that has only wheels.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

PLAIN_SCRIPT = textwrap.dedent(
    '''
    """A plain LoRA fine-tuning script: transformers' Trainer and peft, prompt-completion data."""
    import json, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    model_dir, data_path, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    seq, bf16, cuda = settings["seq"], settings["precision"] == "bf16", torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in open(data_path)]

    def encode(r):
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id] + prompt + completion + [tokenizer.eos_token_id]
        labels = [-100] * (1 + len(prompt)) + completion + [tokenizer.eos_token_id]
        return {"input_ids": ids[:seq], "attention_mask": [1] * len(ids[:seq]), "labels": labels[:seq]}

    dataset = Dataset.from_list([encode(r) for r in records])
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=settings["batch"], learning_rate=settings["lr"], lr_scheduler_type="constant",
        max_steps=settings["steps"], logging_steps=settings["logging_steps"], save_strategy="no", report_to=[], use_cpu=not cuda,
        bf16=bf16, seed=42, data_seed=42, disable_tqdm=True, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8 if cuda else None))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    print(json.dumps({"steps": trainer.state.global_step, "tokens": trainer.state.num_input_tokens_seen, "seconds": seconds,
                      "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                      "losses": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
                      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}))
    '''
)


class RunError(Exception):
    """A run exited non-zero; the message ends with the tail of its output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def kubetune_command(*args: str) -> list[str]:
    """``kubetune ARGS`` as this interpreter runs it (``python -m kubetune_cli.main``: no console script needed)."""
    return [sys.executable, "-m", "kubetune_cli.main", *args]


def train_command(config: Path, output: Path, *args: str) -> list[str]:
    """``kubetune train --config CONFIG --output OUTPUT ARGS`` as this interpreter runs it."""
    return kubetune_command("train", "--config", str(config), "--output", str(output), *args)


def finetunejob(spec: dict[str, Any], name: str = "bench") -> dict[str, Any]:
    """A FineTuneJob manifest around ``spec`` (local paths allowed, as ``kubetune train`` takes them)."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def run_train(
    folder: Path, name: str, spec: dict[str, Any], *, env: dict[str, str], timeout: float | None = None
) -> dict[str, Any]:
    """Run ``kubetune train`` on the FineTuneJob ``spec`` in ``folder/name`` and return its ``summary.json``."""
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump(finetunejob(spec)), encoding="utf-8")
    output = folder / name
    result = subprocess.run(
        train_command(config, output, "--metrics-port", str(free_port())),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    (folder / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RunError(f"kubetune train exited {result.returncode}:\n{result.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads((output / "summary.json").read_text())
    return summary


def run_plain(
    folder: Path,
    name: str,
    model: Path,
    data: Path,
    settings: dict[str, Any],
    *,
    env: dict[str, str],
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run :data:`PLAIN_SCRIPT` and return what it prints: steps, tokens, seconds, tokens_per_second, losses, peak memory.

    ``settings``: steps, batch, seq, precision (bf16 or fp32), lr, r, alpha, logging_steps.
    """
    script = folder / "plain_script.py"
    script.write_text(PLAIN_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), str(model), str(data), str(folder / name), json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    (folder / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RunError(f"the plain script exited {result.returncode}:\n{result.stderr[-3000:]}")
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found
