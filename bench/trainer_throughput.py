"""Trainer throughput: ``kubetune train`` against a plain transformers Trainer + peft script, and packing.

1. Overhead. The same toy Llama, data and settings are trained by ``kubetune train`` and by
   :data:`bench.runs.PLAIN_SCRIPT`, a plain script a person would write with transformers' Trainer and peft;
   each in its own process, alternately, ``--rounds`` times. Tokens/s is real (non-padding)
   tokens over the time of ``trainer.train()``; the best of each side is compared. Target ≥ 1.0×.
2. Packing. ``kubetune train`` on short examples of varied length (8 to 64 tokens, rows of 128) with
   ``packing: false`` and ``true``, same settings otherwise. Target ≥ 1.5×.

Both print a ratio against the peer measured in the same run (DESIGN §7).

    .venv/bin/python -m bench.trainer_throughput [--rounds 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from bench.runs import RunError, run_plain, run_train
from kubetune_trainer.toy import NUMBERS, ToySize, build_model, build_tokenizer, write_jsonl

BENCH_SIZE = ToySize(hidden=256, layers=4, intermediate=704, heads=8)


def _env() -> dict[str, str]:
    # One thread, as on a pod whose CPUs are shared by several workers; the same for both sides.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}


def make_model(folder: Path) -> Path:
    model_dir = folder / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer()
        build_model(tokenizer, BENCH_SIZE).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir


def prompt_completion_data(folder: Path, count: int = 2000) -> Path:
    rng = random.Random(0)
    records = []
    for _ in range(count):
        prompt = " ".join(rng.choice(NUMBERS) for _ in range(rng.randrange(8, 40)))
        completion = " " + " ".join(rng.choice(NUMBERS) for _ in range(rng.randrange(4, 24)))
        records.append({"prompt": prompt, "completion": completion})
    return write_jsonl(records, folder / "pc.jsonl")


def short_text_data(folder: Path, count: int = 4000) -> Path:
    rng = random.Random(1)
    records = [{"text": " ".join(rng.choice(NUMBERS) for _ in range(rng.randrange(6, 62)))} for _ in range(count)]
    return write_jsonl(records, folder / "short.jsonl")


def kubetune_run(
    folder: Path, name: str, model: Path, data: Path, *, steps: int, batch: int, packing: bool, seq: int
) -> dict[str, Any]:
    spec = {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "maxSeqLength": seq, "packing": packing},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {
            "maxSteps": steps,
            "learningRate": 1e-3,
            "lrScheduler": "constant",
            "warmupRatio": 0,
            "batchSizePerDevice": batch,
            "precision": "fp32",
            "gradientCheckpointing": False,
            "checkpointEverySteps": 100000,
            "loggingEverySteps": 10,
        },
    }
    try:
        return run_train(folder, name, spec, env=_env())
    except RunError as exc:
        raise SystemExit(str(exc)) from None


def plain_run(folder: Path, name: str, model: Path, data: Path, *, steps: int, batch: int) -> dict[str, Any]:
    settings = {
        "steps": steps,
        "batch": batch,
        "seq": 128,
        "precision": "fp32",
        "lr": 1e-3,
        "r": 16,
        "alpha": 32,
        "logging_steps": 10,
    }
    try:
        return run_plain(folder, name, model, data, settings, env=_env())
    except RunError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (best one counts)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    model = make_model(folder)

    data = prompt_completion_data(folder)
    ours, theirs = [], []
    for round_ in range(args.rounds):
        ours.append(
            kubetune_run(
                folder, f"ours{round_}", model, data, steps=args.steps, batch=args.batch, packing=False, seq=128
            )["tokens_per_second"]
        )
        theirs.append(
            plain_run(folder, f"plain{round_}", model, data, steps=args.steps, batch=args.batch)["tokens_per_second"]
        )
    print(f"overhead: kubetune train {max(ours):,.0f} tokens/s (runs {', '.join(f'{t:,.0f}' for t in ours)})")
    print(f"          plain Trainer+peft {max(theirs):,.0f} tokens/s (runs {', '.join(f'{t:,.0f}' for t in theirs)})")
    print(f"          ratio {max(ours) / max(theirs):.2f}× (target ≥ 1.0×)")

    short = short_text_data(folder)
    plain_rates: list[float] = []
    packed_rates: list[float] = []
    for round_ in range(args.rounds):
        for rates, name, packing in ((plain_rates, "nopack", False), (packed_rates, "pack", True)):
            run = kubetune_run(
                folder, f"{name}{round_}", model, short, steps=args.steps, batch=args.batch, packing=packing, seq=128
            )
            rates.append(run["tokens_per_second"])
    print(f"packing:  off {max(plain_rates):,.0f} tokens/s, on {max(packed_rates):,.0f} tokens/s")
    print(f"          ratio {max(packed_rates) / max(plain_rates):.2f}× (target ≥ 1.5×)")


if __name__ == "__main__":
    main()
