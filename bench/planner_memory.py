"""The memory planner against measurement: predicted vs measured peak memory of toy Llamas.

For each toy size and method, the model is loaded by the trainer's own loader and trained for two
steps (forward, backward, AdamW) under torch's MemTracker, which counts every live tensor byte;
its peak is compared with :func:`kubetune_api.plan.estimate` for the same setup on a
CPU (fp32, no CUDA overhead). Target (DESIGN §7): within ±15%.

    .venv/bin/python -m bench.planner_memory
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import ALLOW_LOCAL_PATHS, FineTuneJobSpec
from kubetune_api.plan import ModelShape, Setup, estimate
from kubetune_trainer.toy import ToySize, build_model, build_tokenizer

SIZES: dict[str, ToySize] = {
    "small": ToySize(hidden=128, layers=4, intermediate=352, heads=4, vocab_padding=2000),
    "medium": ToySize(hidden=256, layers=8, intermediate=704, heads=8, vocab_padding=6000),
}


@dataclass(frozen=True)
class Comparison:
    """One setup's predicted and measured peak bytes."""

    size: str
    method: str
    checkpointing: bool
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted - self.measured) / self.measured

    def line(self) -> str:
        """A row of the report."""
        return (
            f"{self.size:<7} {self.method:<5} checkpointing={'on ' if self.checkpointing else 'off'} "
            f"predicted {self.predicted / 2**20:8.1f} MiB  measured {self.measured / 2**20:8.1f} MiB  "
            f"error {self.error:+6.1%}"
        )


def build(folder: Path, size: ToySize) -> Path:
    """Save a toy model of ``size`` under ``folder`` (once)."""
    if not (folder / "config.json").exists():
        tokenizer = build_tokenizer()
        build_model(tokenizer, size).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def job_spec(model_dir: Path, method: str, *, checkpointing: bool, batch: int, seq: int) -> FineTuneJobSpec:
    body: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "dataset": {"source": "/unused", "maxSeqLength": seq},
        "method": {"type": method} if method == "full" else {"type": method, "lora": {"r": 16, "dropout": 0.0}},
        "training": {"batchSizePerDevice": batch, "precision": "fp32", "gradientCheckpointing": checkpointing},
    }
    return FineTuneJobSpec.model_validate(body, context={ALLOW_LOCAL_PATHS: True})


def measure(model_dir: Path, spec: FineTuneJobSpec, *, steps: int = 2) -> float:
    """Peak live tensor bytes of ``steps`` training steps, as the trainer loads and trains the model.

    Every tensor storage that exists (the model's) or is created (activations, gradients, optimizer
    state, temporaries) is counted from its creation until Python frees it.
    """
    import weakref  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415
    from torch.utils._pytree import tree_flatten  # noqa: PLC0415

    from kubetune_trainer.training.model import ResolvedPrecision, load_model  # noqa: PLC0415

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.seen: set[int] = set()
            self.current = 0
            self.peak = 0

        def track(self, tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()
            key = storage.data_ptr() or id(storage)
            if key in self.seen or storage.device.type == "meta":
                return
            size = storage.nbytes()
            self.seen.add(key)
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self.free, key, size)

        def free(self, key: int, size: int) -> None:
            if key in self.seen:
                self.seen.discard(key)
                self.current -= size

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor):
                    self.track(item)
            return out

    torch.manual_seed(0)
    model = load_model(model_dir, spec, ResolvedPrecision("fp32"), device=torch.device("cpu"), sharded=False)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, seq = spec.training.batch_size_per_device, spec.dataset.max_seq_length
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    tracker = LiveBytes()
    for tensor in [*model.parameters(), *model.buffers(), ids]:
        tracker.track(tensor)
    with tracker:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return float(tracker.peak)


def compare(folder: Path, size: str, method: str, *, checkpointing: bool, batch: int = 8, seq: int = 128) -> Comparison:
    """Predicted and measured peak memory of one toy setup."""
    model_dir = build(folder / size, SIZES[size])
    spec = job_spec(model_dir, method, checkpointing=checkpointing, batch=batch, seq=seq)
    import json  # noqa: PLC0415

    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    predicted = estimate(shape, Setup.from_spec(spec, world_size=1, accelerator="cpu", precision_bytes=4)).total
    return Comparison(size, method, checkpointing, predicted, measure(model_dir, spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="where to keep the toy models (a temporary folder by default)")
    args = parser.parse_args()
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="kubetune-planner-"))
    rows = [
        compare(folder, size, method, checkpointing=checkpointing)
        for size in SIZES
        for method in ("full", "lora")
        for checkpointing in (False, True)
    ]
    for row in rows:
        print(row.line())
    worst = max(abs(r.error) for r in rows)
    print(f"worst error {worst:.1%} (target ±15%)")


if __name__ == "__main__":
    main()
