"""Batches for the training processes: rows padded to the longest (or a multiple), with token counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kubetune_trainer.training.data.tokenize import IGNORE_INDEX


class Collator:
    """Pads a list of rows into a batch; packed rows get position ids and no attention mask.

    Besides the model's inputs the batch carries ``num_tokens`` and ``num_examples`` (real tokens
    and examples in it), which the trainer pops for its throughput numbers.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch  # noqa: PLC0415 - collation runs in the training processes only

        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]

        def padded(key: str, fill: int | Callable[[int], list[int]]) -> torch.Tensor:
            out = []
            for r in rows:
                missing = longest - len(r[key])
                out.append(list(r[key]) + (fill(missing) if callable(fill) else [fill] * missing))
            return torch.tensor(out, dtype=torch.long)

        batch: dict[str, Any] = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if packed:
            # The padding forms one more "example" of its own, so no real token attends to it.
            batch["position_ids"] = padded("position_ids", lambda n: list(range(n)))
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows], dtype=torch.long
            )
        batch["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        batch["num_examples"] = torch.tensor(sum(int(r.get("num_examples", 1)) for r in rows))
        return batch
